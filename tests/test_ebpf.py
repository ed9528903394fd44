"""The eBPF source against real traffic between network namespaces made here.

Two "pods" A and B joined by two veth pairs (eth0: default network, IPv4 +
IPv6; net1: a secondary network, IPv4), a pod C with only eth0, and a
hostNetwork pod that must not be attached. Neighbour entries are permanent
and IPv6 is off except on eth0 so the interfaces stay quiet; a round of
traffic is still retried when the kernel's own counters show noise
(router solicitations, DAD probes).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.model import Attachment, InterfaceView, Link, Pod, PodView
from collector.registry import Config, Snapshot
from exporters.exposition import render
from kernel.nsenter import in_netns

pytestmark = pytest.mark.ebpf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 25                      # packets per round
PAYLOAD = b"x" * 100
NETWORKS = {"eth0": ("default", "management"), "net1": ("pwtebpf/signal", "signaling")}
ADDR = {  # (pod, interface) -> (ipv4, ipv6, mac)
    ("a", "eth0"): ("10.250.1.1", "fd00:250::1", "02:50:00:01:00:01"),
    ("b", "eth0"): ("10.250.1.2", "fd00:250::2", "02:50:00:01:00:02"),
    ("a", "net1"): ("10.250.2.1", None, "02:50:00:02:00:01"),
    ("b", "net1"): ("10.250.2.2", None, "02:50:00:02:00:02"),
    ("c", "eth0"): ("10.250.3.2", None, "02:50:00:03:00:02"),
    ("a", "net2"): ("10.250.3.1", None, "02:50:00:03:00:01"),
}
QUIET_SYSCTLS = ("net.ipv6.conf.default.disable_ipv6=1", "net.ipv4.conf.all.rp_filter=0",
                 "net.ipv4.conf.default.rp_filter=0", "net.ipv6.conf.default.accept_ra=0",
                 "net.ipv6.conf.default.router_solicitations=0", "net.ipv6.conf.default.dad_transmits=0")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def need_root_and_objects() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_BPF, network namespaces)")
    build = subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "ebpf")], capture_output=True, text=True)
    if build.returncode:
        pytest.skip(f"BPF objects cannot be built: {build.stderr.strip()[-300:]}")


# --- the lab -----------------------------------------------------------------------------

class Lab:
    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = {p: f"pwtebpf-{tag}-{p}" for p in "abc"}
        self.ifindex: dict[tuple[str, str], int] = {}
        self.peers: dict[tuple[str, str], tuple[str, str]] = {}

    def path(self, pod: str) -> str:
        return f"/run/netns/{self.ns[pod]}"

    def ip(self, pod: str, *args: str) -> str:
        return sh("ip", "-n", self.ns[pod], *args)

    def sysctl(self, pod: str, *settings: str) -> None:
        sh("ip", "netns", "exec", self.ns[pod], "sysctl", "-q", "-w", *settings)

    def build(self) -> None:
        for pod in "abc":
            sh("ip", "netns", "add", self.ns[pod])
            self.sysctl(pod, *QUIET_SYSCTLS)
            self.ip(pod, "link", "set", "lo", "up")
        self.veth(("a", "eth0"), ("b", "eth0"))
        self.veth(("a", "net1"), ("b", "net1"))
        self.veth(("a", "net2"), ("c", "eth0"))
        for pod in "ab":    # IPv6 on eth0 only, without RS/DAD chatter
            self.sysctl(pod, "net.ipv6.conf.eth0.disable_ipv6=0")
        for (pod, dev), (v4, v6, _) in ADDR.items():
            self.ip(pod, "addr", "add", f"{v4}/24", "dev", dev)
            if v6:
                self.ip(pod, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            self.ip(pod, "link", "set", dev, "up")
        for (pod, dev), (peer_pod, peer_dev) in self.peers.items():
            v4, v6, mac = ADDR[(peer_pod, peer_dev)]
            for addr in filter(None, (v4, v6)):
                self.ip(pod, "neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent")
        for (pod, dev) in ADDR:
            self.ifindex[(pod, dev)] = json.loads(self.ip(pod, "-j", "link", "show", dev))[0]["ifindex"]
        self.inode = {pod: os.stat(self.path(pod)).st_ino for pod in "abc"}

    def veth(self, end: tuple[str, str], other: tuple[str, str]) -> None:
        self.ip(end[0], "link", "add", end[1], "address", ADDR[end][2], "type", "veth",
                "peer", "name", other[1], "address", ADDR[other][2], "netns", self.ns[other[0]])
        self.peers[end], self.peers[other] = other, end

    def destroy(self) -> None:
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def kernel_counters(self) -> dict[tuple[str, str, str], int]:
        """(pod, interface, rx|tx + _packets|_bytes) -> value, from `ip -s -j link`."""
        out = {}
        for (pod, dev) in ADDR:
            stats = json.loads(self.ip(pod, "-s", "-j", "link", "show", dev))[0]["stats64"]
            for d in ("rx", "tx"):
                out[(pod, dev, f"{d}_packets")] = stats[d]["packets"]
                out[(pod, dev, f"{d}_bytes")] = stats[d]["bytes"]
        return out

    def snapshot(self, pods: str = "abc") -> Snapshot:
        views = [self.pod_view(p) for p in pods]
        host = Pod("kube-system", "host-agent", "uid-host", host_network=True)
        link = Link(1, "lo")
        views.append(PodView(host, "/proc/self/ns/net", os.stat("/proc/self/ns/net").st_ino, "test",
                             (InterfaceView(Attachment("kube-system", "host-agent", "uid-host", "default", "lo"), link),)))
        return Snapshot(tuple(views))

    def pod_view(self, pod: str) -> PodView:
        name = f"pod-{pod}"
        interfaces = []
        for (p, dev) in ADDR:
            if p != pod or dev == "net2":       # A's net2 is C's peer, not an attachment
                continue
            network, plane = NETWORKS[dev]
            att = Attachment("pwtebpf", name, f"uid-{pod}", network, dev, plane=plane)
            interfaces.append(InterfaceView(att, Link(self.ifindex[(pod, dev)], dev)))
        return PodView(Pod("pwtebpf", name, f"uid-{pod}"), self.path(pod), self.inode[pod], "test",
                       tuple(interfaces))


@pytest.fixture(scope="module")
def lab():
    need_root_and_objects()
    lab = Lab()
    try:
        lab.build()
        yield lab
    finally:
        lab.destroy()


@pytest.fixture(scope="module")
def source(lab):
    from collector.sources.ebpf import EbpfSource
    src = EbpfSource(Config())
    try:
        yield src
    finally:
        src.close()


def scrape(source, snapshot) -> dict[tuple, float]:
    """(metric, frozenset(labels)) -> value, through the real exposition."""
    source.reconcile(snapshot)          # what the server's background loop does
    text = render(source.collect(snapshot)).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(series: dict, name: str, **labels) -> float:
    """Sum of the series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and want <= ls)


# --- traffic --------------------------------------------------------------------------

def udp_socket(lab: Lab, pod: str, family=socket.AF_INET, bind=None) -> socket.socket:
    with in_netns(lab.path(pod)):
        s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(bind or ("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    s.settimeout(2)
    return s


def send_udp(lab, pod, dest, n=N, src=None, family=socket.AF_INET) -> None:
    with udp_socket(lab, pod, family, src) as s:
        for _ in range(n):
            s.sendto(PAYLOAD, dest)
    time.sleep(0.1)


@contextmanager
def echo_server(lab: Lab, pod: str, address: tuple, family=socket.AF_INET):
    """Bound to one address so replies keep it as their source (a wildcard
    socket would answer from the address of the route back)."""
    server = udp_socket(lab, pod, family, address)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(2048)
            except socket.timeout:
                continue
            server.sendto(data, peer)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        server.close()


def echo(lab, pod, src, dest, n=N, family=socket.AF_INET) -> None:
    with udp_socket(lab, pod, family, src) as s:
        for _ in range(n):
            s.sendto(PAYLOAD, dest)
            assert s.recv(2048) == PAYLOAD
    time.sleep(0.1)


def quiet_round(lab, source, snapshot, send, expected: dict, attempts=6):
    """Send, and return (kernel deltas, scraped before, scraped after) from a round
    where the kernel's counters moved exactly as `expected` (else retry)."""
    for _ in range(attempts):
        k0, m0 = lab.kernel_counters(), scrape(source, snapshot)
        send()
        m1, k1 = scrape(source, snapshot), lab.kernel_counters()
        kd = {k: k1[k] - k0[k] for k in k0}
        if all(kd[k] == v for k, v in expected.items()):
            return kd, m0, m1
        time.sleep(1)
    pytest.fail(f"kernel counters never matched {expected} (background traffic?): {kd}")


# --- tests ---------------------------------------------------------------------------

def test_attaches_pod_interfaces_and_not_host_network(lab, source):
    m = scrape(source, lab.snapshot())
    assert value(m, "planewatch_ebpf_up") == 1
    hooks = set(source.loader.hooks)
    expected = {(lab.inode[p], lab.ifindex[(p, d)]) for p, d in ADDR if d != "net2"}
    assert hooks == expected
    assert value(m, "planewatch_ebpf_attached_interfaces") == len(expected)
    # pod C (eth0 only) is exported at 0 before any traffic
    assert ("planewatch_ebpf_interface_receive_packets_total",
            frozenset({"namespace": "pwtebpf", "pod": "pod-c", "network": "default",
                       "interface": "eth0", "plane": "management"}.items())) in m


@pytest.mark.parametrize("family,dev", [(socket.AF_INET, "net1"), (socket.AF_INET6, "eth0")])
def test_counters_match_sent_packets_and_ip_link(lab, source, family, dev):
    snapshot = lab.snapshot()
    v4, v6, _ = ADDR[("b", dev)]
    dest = (v6 if family == socket.AF_INET6 else v4, 7100)
    server = udp_socket(lab, "b", family, dest)     # a listener, so nothing is dropped
    try:
        frame = 14 + (40 if family == socket.AF_INET6 else 20) + 8 + len(PAYLOAD)
        expected = {("a", dev, "tx_packets"): N, ("b", dev, "rx_packets"): N,
                    ("a", dev, "rx_packets"): 0, ("b", dev, "tx_packets"): 0}
        kd, m0, m1 = quiet_round(lab, source, snapshot,
                                 lambda: send_udp(lab, "a", dest, family=family), expected)
    finally:
        server.close()
    assert kd[("a", dev, "tx_bytes")] == N * frame
    for pod in "ab":
        labels = {"pod": f"pod-{pod}", "interface": dev}
        for direction, short in (("receive", "rx"), ("transmit", "tx")):
            for unit in ("packets", "bytes"):
                name = f"planewatch_ebpf_interface_{direction}_{unit}_total"
                got = value(m1, name, **labels) - value(m0, name, **labels)
                assert got == kd[(pod, dev, f"{short}_{unit}")], (name, pod)


def drops(m, pod, dev, reason):
    return value(m, "planewatch_packet_drops_total", pod=f"pod-{pod}", interface=dev, reason=reason)


def test_netfilter_drop(lab, source):
    snapshot = lab.snapshot()
    rules = ("table inet pwtebpf_drop {\n chain input {\n type filter hook input priority 0;\n"
             " udp dport 7001 drop\n }\n}\n")
    subprocess.run(["ip", "netns", "exec", lab.ns["b"], "nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        m0 = scrape(source, snapshot)
        send_udp(lab, "a", (ADDR[("b", "net1")][0], 7001))
        m1 = scrape(source, snapshot)
    finally:
        sh("ip", "netns", "exec", lab.ns["b"], "nft", "delete", "table", "inet", "pwtebpf_drop")
    assert drops(m1, "b", "net1", "NETFILTER_DROP") - drops(m0, "b", "net1", "NETFILTER_DROP") == N
    assert drops(m1, "b", "eth0", "NETFILTER_DROP") == drops(m0, "b", "eth0", "NETFILTER_DROP")


def test_closed_port_is_no_socket(lab, source):
    snapshot = lab.snapshot()
    m0 = scrape(source, snapshot)
    send_udp(lab, "a", (ADDR[("b", "net1")][0], 7002))
    m1 = scrape(source, snapshot)
    assert drops(m1, "b", "net1", "NO_SOCKET") - drops(m0, "b", "net1", "NO_SOCKET") == N
    assert drops(m1, "b", "eth0", "NO_SOCKET") == drops(m0, "b", "eth0", "NO_SOCKET")


def test_strict_rp_filter_with_asymmetric_route(lab, source):
    snapshot = lab.snapshot()
    # from A's eth0 address out of net1: B's route back to it is eth0, so strict rp_filter drops
    lab.sysctl("b", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.net1.rp_filter=1")
    try:
        m0 = scrape(source, snapshot)
        send_udp(lab, "a", (ADDR[("b", "net1")][0], 7003), src=(ADDR[("a", "eth0")][0], 0))
        m1 = scrape(source, snapshot)
    finally:
        lab.sysctl("b", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.net1.rp_filter=0")
    assert drops(m1, "b", "net1", "IP_RPFILTER") - drops(m0, "b", "net1", "IP_RPFILTER") == N


def test_host_drops_are_not_counted(lab, source):
    scrape(source, lab.snapshot())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:      # host netns, closed port
        for _ in range(5):
            s.sendto(b"x", ("127.0.0.1", 9))
    time.sleep(0.1)
    assert source.loader.packet_drops()
    assert {k[:2] for k in source.loader.packet_drops()} <= set(source.loader.hooks)


def asymmetric(m, pod, ingress, egress):
    return value(m, "planewatch_asymmetric_packets_total", pod=f"pod-{pod}", interface=ingress,
                 ingress_interface=ingress, egress_interface=egress)


def test_asymmetric_route_is_counted(lab, source):
    snapshot = lab.snapshot()
    # A asks B's net1 address from its eth0 address: the request goes in by B's
    # net1, B's reply to A's eth0 address leaves by B's eth0.
    server = (ADDR[("b", "net1")][0], 7010)
    with echo_server(lab, "b", server):
        m0 = scrape(source, snapshot)
        echo(lab, "a", (ADDR[("a", "eth0")][0], 0), server)
        m1 = scrape(source, snapshot)
    assert asymmetric(m1, "b", "net1", "eth0") - asymmetric(m0, "b", "net1", "eth0") == N
    # A sees its own asymmetry from the second request on (reply came in by eth0)
    assert asymmetric(m1, "a", "eth0", "net1") - asymmetric(m0, "a", "eth0", "net1") == N - 1
    labels = dict(next(ls for (n, ls) in m1 if n == "planewatch_asymmetric_packets_total"
                       and ("pod", "pod-b") in ls))
    assert (labels["network"], labels["plane"]) == NETWORKS["net1"]

    top = source.top_asymmetric_flows(5)
    flow = next(f for f in top if f.get("pod") == "pod-b" and f["source_port"] == 7010)
    assert (flow["protocol"], flow["source"], flow["destination"]) == ("udp", ADDR[("b", "net1")][0],
                                                                       ADDR[("a", "eth0")][0])
    assert (flow["ingress_interface"], flow["egress_interface"], flow["packets"]) == ("net1", "eth0", N)
    assert abs(flow["last_seen"] - time.time()) < 30
    assert len(source.top_asymmetric_flows(1)) == 1
    assert top == sorted(top, key=lambda f: -f["packets"])


@pytest.mark.parametrize("family,dev", [(socket.AF_INET, "net1"), (socket.AF_INET6, "eth0")])
def test_symmetric_traffic_is_not_counted(lab, source, family, dev):
    snapshot = lab.snapshot()
    a, b = ADDR[("a", dev)], ADDR[("b", dev)]
    index = 1 if family == socket.AF_INET6 else 0
    with echo_server(lab, "b", (b[index], 7020), family):
        m0 = scrape(source, snapshot)
        echo(lab, "a", (a[index], 0), (b[index], 7020), family=family)
        m1 = scrape(source, snapshot)
    assert value(m1, "planewatch_ebpf_interface_transmit_packets_total", pod="pod-b", interface=dev) \
        - value(m0, "planewatch_ebpf_interface_transmit_packets_total", pod="pod-b", interface=dev) >= N
    assert value(m1, "planewatch_asymmetric_packets_total") == value(m0, "planewatch_asymmetric_packets_total")
    # the flows were tracked (parsed, same interface both ways), just not asymmetric
    replies = [f for f in tracked_flows(source) if f.netns == lab.inode["b"] and f.source_port == 7020
               and f.source == b[index]]
    assert replies and all(f.egress_ifindex == lab.ifindex[("b", dev)] and f.asymmetric_packets == 0
                           for f in replies)


def tracked_flows(source):
    from ebpf import maps
    entries = maps.read_entries(source.loader.fds["flows"], maps.FLOWS, 1)
    return [maps.decode_flow(k, v) for k, v in entries]


def test_vanished_pod_is_detached_and_reattached(lab, source):
    b_keys = {(lab.inode["b"], lab.ifindex[("b", d)]) for d in ("eth0", "net1")}
    m = scrape(source, lab.snapshot("ac"))
    assert not b_keys & set(source.loader.hooks)
    assert value(m, "planewatch_ebpf_interface_receive_packets_total", pod="pod-b") == 0
    assert not [k for k in m if ("pod", "pod-b") in k[1]]
    scrape(source, lab.snapshot())
    assert b_keys <= set(source.loader.hooks)


def test_planes_outside_flow_planes_get_no_program_but_their_drops(lab, source):
    """--collector.ebpf.flow-planes=signaling: eth0 (management) loses its tc
    programs (nothing runs per packet there) but stays watched for drops; back
    to "*", it gets them again."""
    from collector.planes import PlaneSelector
    snapshot = lab.snapshot()
    key = {(p, d): (lab.inode[p], lab.ifindex[(p, d)]) for p, d in ADDR if d != "net2"}
    signaling = {k for (p, d), k in key.items() if d == "net1"}
    source.with_programs = PlaneSelector("signaling")
    try:
        m0 = scrape(source, snapshot)
        assert set(source.loader.hooks) == signaling
        assert source.loader.watch_only == set(key.values()) - signaling
        assert value(m0, "planewatch_ebpf_attached_interfaces") == 2
        assert value(m0, "planewatch_ebpf_watched_interfaces") == 5
        assert not [ls for (n, ls) in m0 if n.startswith("planewatch_ebpf_interface_")
                    and ("interface", "eth0") in ls]
        assert value(m0, "planewatch_ebpf_interface_receive_packets_total", pod="pod-b", interface="net1") >= 0
        assert len([ls for (n, ls) in m0 if n == "planewatch_ebpf_interface_receive_packets_total"]) == 2

        send_udp(lab, "a", (ADDR[("b", "eth0")][0], 7030))      # closed port: dropped in B
        m1 = scrape(source, snapshot)
        assert drops(m1, "b", "eth0", "NO_SOCKET") - drops(m0, "b", "eth0", "NO_SOCKET") == N
        counted = source.loader.interface_counters()
        assert key[("b", "eth0")] not in counted and key[("a", "eth0")] not in counted
    finally:
        source.with_programs = PlaneSelector("*")
    m2 = scrape(source, snapshot)
    assert set(source.loader.hooks) == set(key.values()) and not source.loader.watch_only
    assert value(m2, "planewatch_ebpf_attached_interfaces") == value(m2, "planewatch_ebpf_watched_interfaces") == 5
    with echo_server(lab, "b", (ADDR[("b", "eth0")][0], 7031)):
        echo(lab, "a", (ADDR[("a", "eth0")][0], 0), (ADDR[("b", "eth0")][0], 7031))
    m3 = scrape(source, snapshot)
    assert value(m3, "planewatch_ebpf_interface_receive_packets_total", pod="pod-b", interface="eth0") >= N


def test_a_reused_key_of_another_pod_starts_from_zero(lab, source):
    """Another pod's interface under a watched (netns inode, ifindex) (the inode
    and ifindex reused between two reconciles): detached and attached afresh, so
    the old interface's drops are not carried into the new pod's series."""
    snapshot = lab.snapshot()
    m0 = scrape(source, snapshot)
    send_udp(lab, "a", (ADDR[("b", "net1")][0], 7032))          # closed port: dropped in B's net1
    m1 = scrape(source, snapshot)
    assert drops(m1, "b", "net1", "NO_SOCKET") - drops(m0, "b", "net1", "NO_SOCKET") == N
    b = lab.pod_view("b")
    reborn = PodView(Pod("pwtebpf", "pod-b2", "uid-b2"), b.netns_path, b.netns_inode, "test",
                     tuple(InterfaceView(Attachment("pwtebpf", "pod-b2", "uid-b2", v.attachment.network,
                                                    v.attachment.interface, plane=v.attachment.plane), v.link)
                           for v in b.interfaces))
    other = Snapshot((lab.pod_view("a"), reborn, lab.pod_view("c")))
    m2 = scrape(source, other)
    assert drops(m2, "b2", "net1", "NO_SOCKET") == 0
    assert not [ls for (n, ls) in m2 if ("pod", "pod-b") in ls]
    scrape(source, snapshot)
