"""Pod namespaces shaped as real CNIs leave them, on real namespaces (root):
KubeVirt's bridge binding, ipvlan's shared MAC, a DPDK VF listed without a
netdev, and pods whose annotations claim someone else's namespace.

This kernel may lack the `dummy` and `ipvlan` link kinds: the shapes are built
with what it has (a veth stands in for KubeVirt's dummy: what matters is a link
under the annotated name that is no bridge port; veths given one MAC stand in
for ipvlan slaves, which carry their master's MAC), and the test says so."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from collector.model import Attachment, DeviceInfo, Pod
from collector.netns import Resolver
from collector.registry import Config, Snapshot
from collector.sources.netlink import NetlinkSource
from exporters.exposition import render
from tests.conftest import parse_metrics, series, unique_prefix

NO_PROCFS = "/nonexistent-procfs"


def sh(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def kernel_has(kind: str) -> bool:
    name = unique_prefix("pwk")
    ok = subprocess.run(["ip", "link", "add", name, "type", kind], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    return ok


@pytest.fixture
def netns_factory(root):
    made = []

    def make(suffix: str) -> str:
        ns = f"{unique_prefix('pwrw')}-{suffix}"
        sh("ip", "netns", "add", ns)
        made.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns
    try:
        yield make
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def uid(i: int) -> str:
    return f"5eed0000-0000-4000-8000-{i:012d}"


def pod(i: int, *atts: Attachment) -> Pod:
    return Pod("vms", f"pod{i}", uid(i), attachments=atts)


def att(i: int, network: str, interface: str, *, mac="", ips=(), default=False, device=None) -> Attachment:
    return Attachment("vms", f"pod{i}", uid(i), network, interface, default=default, mac=mac, ips=tuple(ips),
                      device=device or DeviceInfo())


def annotated_stand_in(ns: str, name: str, mac: str) -> str:
    """The link KubeVirt leaves under the annotated name: a dummy where the kernel
    has them, else a veth (its peer stays in the namespace, down)."""
    if kernel_has("dummy"):
        sh("ip", "-n", ns, "link", "add", name, "address", mac, "type", "dummy")
        return "dummy"
    print(f"kernel has no dummy link kind: a veth stands in for {name}")
    sh("ip", "-n", ns, "link", "add", name, "address", mac, "type", "veth", "peer", "name", f"{name[:10]}-p")
    return "veth"


def bridge_binding(ns: str, peer: str, annotated: str, mac: str, address: str, peer_address: str) -> None:
    """virt-launcher's bridge binding: `<base>-nic` (the pod's real link) a port of
    `k6t-<base>` with a tap, and the annotated name left on a link that is no port."""
    base = annotated[3:] if annotated.startswith("pod") else annotated
    nic, bridge, tap = f"{base}-nic", f"k6t-{base}", f"tap{base}"[:15]
    sh("ip", "-n", ns, "link", "add", bridge, "type", "bridge")
    sh("ip", "-n", ns, "link", "add", nic, "type", "veth", "peer", "name", "outside", "netns", peer)
    sh("ip", "-n", ns, "link", "set", nic, "master", bridge)
    sh("ip", "-n", ns, "tuntap", "add", tap, "mode", "tap")
    sh("ip", "-n", ns, "link", "set", tap, "master", bridge)
    annotated_stand_in(ns, annotated, mac)
    # The bridge answers for the VM here (the VM itself would sit behind the tap).
    sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", bridge)
    for link in (bridge, nic, tap, annotated):
        sh("ip", "-n", ns, "link", "set", link, "up")
    sh("ip", "-n", peer, "addr", "add", f"{peer_address}/24", "dev", "outside")
    sh("ip", "-n", peer, "link", "set", "outside", "up")


def scrape_counters(resolver: Resolver, pods: list[Pod]) -> dict:
    views = resolver.resolve(pods)
    text = render(NetlinkSource(Config()).collect(Snapshot(tuple(views), netns=resolver.pool))).decode()
    return views, parse_metrics(text)


@pytest.mark.parametrize("annotated", ["pod5f3a9c0d21e", "eth0"])
def test_kubevirt_bridge_binding_counts_the_nic_not_the_dummy(netns_factory, annotated):
    ns, peer = netns_factory("vm"), netns_factory("pr")
    mac = "02:6b:00:00:00:07"
    bridge_binding(ns, peer, annotated, mac, "10.251.7.1", "10.251.7.2")
    p = pod(1, att(1, "vms/vmnet", annotated, mac=mac, ips=["10.251.7.99"]))
    r = Resolver("/run/netns", NO_PROCFS)
    try:
        views, _ = scrape_counters(r, [p])
        (iv,) = views[0].interfaces
        base = annotated[3:] if annotated.startswith("pod") else annotated
        assert views[0].netns_path == f"/run/netns/{ns}"             # the stand-in's MAC found it
        assert iv.link.name == f"{base}-nic" and iv.link.master       # the port that carries traffic
        assert iv.interface == annotated                               # the series keeps the annotated name
        sh("ip", "netns", "exec", peer, "ping", "-c", "5", "-i", "0.2", "-W", "1", "10.251.7.1")
        _, metrics = scrape_counters(r, [p])
        rx = series(metrics, "planewatch_interface_receive_packets_total", interface=annotated)
        (value,) = rx.values()
        assert value >= 5                                              # the dummy would read 0
    finally:
        r.close()


def test_named_link_that_is_itself_a_bridge_port_is_kept(netns_factory):
    """No bridge binding: a link under the annotated name that is itself a port
    (e.g. a bond or bridge member the CNI made) stays the one counted."""
    ns, peer = netns_factory("np"), netns_factory("nq")
    sh("ip", "-n", ns, "link", "add", "br9", "type", "bridge")
    sh("ip", "-n", ns, "link", "add", "net1", "address", "02:6b:00:00:01:01", "type", "veth",
       "peer", "name", "o1", "netns", peer)
    sh("ip", "-n", ns, "link", "set", "net1", "master", "br9")
    sh("ip", "-n", ns, "link", "add", "net1-nic", "type", "veth", "peer", "name", "o2", "netns", peer)
    sh("ip", "-n", ns, "link", "set", "net1-nic", "master", "br9")
    r = Resolver("/run/netns", NO_PROCFS)
    try:
        views = r.resolve([pod(2, att(2, "vms/x", "net1", mac="02:6b:00:00:01:01"))])
        assert views[0].interfaces[0].link.name == "net1"
    finally:
        r.close()


def ipvlan_like(ns: str, i: int, shared_mac: str, eth0_mac: str) -> None:
    """eth0 (own MAC) and net1 carrying the master's MAC, as every ipvlan slave does."""
    if kernel_has("ipvlan"):
        print("kernel has ipvlan; the shape is still built with veths so both kernels test the same thing")
    else:
        print("kernel has no ipvlan link kind: veths with one MAC stand in for ipvlan slaves")
    sh("ip", "-n", ns, "link", "add", "eth0", "address", eth0_mac, "type", "veth", "peer", "name", "p0")
    sh("ip", "-n", ns, "link", "add", "net1", "address", shared_mac, "type", "veth", "peer", "name", "p1")
    sh("ip", "-n", ns, "addr", "add", f"10.252.0.{10 + i}/24", "dev", "eth0")
    sh("ip", "-n", ns, "addr", "add", f"192.168.251.{10 + i}/24", "dev", "net1")
    for link in ("eth0", "net1"):
        sh("ip", "-n", ns, "link", "set", link, "up")


@pytest.mark.parametrize("eth0_mac_annotated", [True, False], ids=["eth0-mac", "calico-style-no-mac"])
def test_ipvlan_shared_mac_resolves_each_pod_to_its_own_namespace(netns_factory, eth0_mac_annotated):
    shared = "3c:fd:fe:77:00:01"
    made = []
    for i in range(3):
        ns = netns_factory(f"iv{i}")
        ipvlan_like(ns, i, shared, f"0a:58:0a:fc:00:{10 + i:02x}")
        made.append(ns)
    pods = [pod(10 + i,
                att(10 + i, "k8s-pod-network", "eth0", default=True, ips=[f"10.252.0.{10 + i}"],
                    mac=f"0a:58:0a:fc:00:{10 + i:02x}" if eth0_mac_annotated else ""),
                att(10 + i, "vms/ipvlan-net", "net1", mac=shared, ips=[f"192.168.251.{10 + i}"]))
            for i in range(3)]
    r = Resolver("/run/netns", NO_PROCFS)
    try:
        views = r.resolve(pods)
        assert [v.netns_path for v in views] == [f"/run/netns/{ns}" for ns in made]
        assert len({v.netns_inode for v in views}) == 3                   # never two pods on one namespace
        assert all(v.conflicts == () for v in views)
    finally:
        r.close()


def test_ipvlan_pods_with_nothing_unique_stay_unresolved(netns_factory):
    """Only the shared MAC and no IP: nothing tells the pods apart, nobody is guessed."""
    shared = "3c:fd:fe:77:00:02"
    for i in range(2):
        ipvlan_like(netns_factory(f"iz{i}"), i, shared, f"0a:58:0a:fd:00:{i:02x}")
    pods = [pod(20 + i, att(20 + i, "vms/ipvlan-net", "net1", mac=shared)) for i in range(2)]
    r = Resolver("/run/netns", NO_PROCFS)
    try:
        assert [v.netns_inode for v in r.resolve(pods)] == [0, 0]
    finally:
        r.close()


def victim_and_impostor(netns_factory):
    ns = netns_factory("vi")
    sh("ip", "-n", ns, "link", "add", "eth0", "address", "02:76:00:00:00:01", "type", "veth", "peer", "name", "p0")
    sh("ip", "-n", ns, "addr", "add", "10.249.0.5/24", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    own = netns_factory("im")
    sh("ip", "-n", own, "link", "add", "eth0", "address", "02:76:00:00:00:99", "type", "veth", "peer", "name", "p0")
    victim = pod(30, att(30, "k8s-pod-network", "eth0", default=True, mac="02:76:00:00:00:01", ips=["10.249.0.5"]))
    # The impostor's annotation copies the victim's MAC and IP.
    impostor = pod(31, att(31, "k8s-pod-network", "eth0", default=True, mac="02:76:00:00:00:01",
                           ips=["10.249.0.5"]))
    return ns, victim, impostor


def test_copied_mac_gives_the_namespace_to_no_one_visibly(netns_factory):
    ns, victim, impostor = victim_and_impostor(netns_factory)
    r = Resolver("/run/netns", NO_PROCFS)
    try:
        views = r.resolve([victim, impostor])
        assert [v.netns_inode for v in views] == [0, 0]
        assert [v.conflicts for v in views] == [(("netns", ns),)] * 2
    finally:
        r.close()


def test_impostor_that_came_first_loses_the_namespace_when_the_victim_arrives(netns_factory):
    now = [100.0]
    ns, victim, impostor = victim_and_impostor(netns_factory)
    r = Resolver("/run/netns", NO_PROCFS, clock=lambda: now[0])
    try:
        (alone,) = r.resolve([impostor])
        assert alone.netns_path == f"/run/netns/{ns}"          # nothing to tell it from, yet
        views = r.resolve([impostor, victim])
        assert [v.netns_inode for v in views] == [0, 0]
        assert all(v.conflicts == (("netns", ns),) for v in views)
    finally:
        r.close()


def test_cgroup_owner_wins_over_any_annotation(netns_factory, tmp_path):
    """The runtime gives the pod UID of the namespace's processes: the victim is
    resolved by it and the impostor's copied MAC reaches nothing."""
    ns, victim, impostor = victim_and_impostor(netns_factory)
    procfs = tmp_path / "proc"
    (procfs / "4711" / "ns").mkdir(parents=True)
    (procfs / "4711" / "cgroup").write_text(f"0::/kubepods/besteffort/pod{victim.uid}/c0ffee\n")
    os.symlink(f"/run/netns/{ns}", procfs / "4711" / "ns" / "net")
    r = Resolver("/run/netns", str(procfs))
    try:
        views = r.resolve([impostor, victim])       # the impostor listed first on purpose
        by = {v.pod.name: v for v in views}
        assert by[victim.name].resolved_by == "cgroup"
        assert by[victim.name].netns_path.endswith(f"/{ns}") or by[victim.name].netns_inode == \
            os.stat(f"/run/netns/{ns}").st_ino
        assert by[impostor.name].netns_inode == 0
    finally:
        r.close()


def test_cgroup_owner_revokes_an_annotation_match(netns_factory, tmp_path):
    now = [100.0]
    ns, victim, impostor = victim_and_impostor(netns_factory)
    procfs = tmp_path / "proc"
    procfs.mkdir()
    r = Resolver("/run/netns", str(procfs), clock=lambda: now[0])
    try:
        assert r.resolve([impostor])[0].netns_path == f"/run/netns/{ns}"
        (procfs / "4712" / "ns").mkdir(parents=True)
        (procfs / "4712" / "cgroup").write_text(f"0::/kubepods/pod{victim.uid}/c0ffee\n")
        os.symlink(f"/run/netns/{ns}", procfs / "4712" / "ns" / "net")
        views = r.resolve([impostor, victim])
        assert [v.netns_inode != 0 for v in views] == [False, True]
        assert views[1].resolved_by == "cgroup"
    finally:
        r.close()


def test_dpdk_vf_listed_as_net1_does_not_reread_links_every_scrape(netns_factory):
    ns = netns_factory("dp")
    sh("ip", "-n", ns, "link", "add", "eth0", "address", "02:44:00:00:00:01", "type", "veth", "peer", "name", "p0")
    p = pod(40, att(40, "k8s-pod-network", "eth0", default=True, mac="02:44:00:00:00:01"),
            att(40, "vms/dpdk", "net1", device=DeviceInfo(type="pci", pci_address="0000:3b:02.1")))
    now = [100.0]
    r = Resolver("/run/netns", NO_PROCFS, clock=lambda: now[0])
    try:
        r.resolve([p])
        inode = r.resolve([p])[0].netns_inode
        ns_obj = r.pool.get(inode)
        reads = []
        original = ns_obj.refresh
        ns_obj.refresh = lambda t: (reads.append(t), original(t))
        for _ in range(10):
            now[0] += 2.0
            view = r.resolve([p])[0]
        assert len(reads) <= 1
        assert view.interfaces[1].link is None
        # A link that does appear is announced by the kernel and read at once.
        sh("ip", "-n", ns, "link", "add", "net1", "type", "veth", "peer", "name", "p1")
        time.sleep(0.05)
        now[0] += 2.0
        assert r.resolve([p])[0].interfaces[1].link.name == "net1"
    finally:
        r.close()


def test_an_ip_reused_elsewhere_does_not_contest_a_resolved_pod(netns_factory):
    """A pod of an isolated network reusing the victim's IP (no MAC in its
    annotation, its own namespace not on this node) must not take or blind it."""
    ns, victim, _ = victim_and_impostor(netns_factory)
    reuser = pod(32, att(32, "k8s-pod-network", "eth0", default=True, ips=["10.249.0.5"]))
    now = [100.0]
    r = Resolver("/run/netns", NO_PROCFS, clock=lambda: now[0])
    try:
        assert r.resolve([victim])[0].netns_path == f"/run/netns/{ns}"
        views = r.resolve([victim, reuser])
        assert views[0].netns_path == f"/run/netns/{ns}" and views[0].conflicts == ()
        assert views[1].netns_inode == 0
    finally:
        r.close()
