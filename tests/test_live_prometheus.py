"""The operator surface on the real lab.

Debian's Prometheus (1 s scrape and evaluation) scrapes `planewatch serve`, all
collectors on, running on the lab: the demo pods plus the DPDK pod whose VFs live
in the SR-IOV fixture sysfs tree (`--path.sysfs`). It loads the project's
recording and alerting rules. With traffic on every plane, some kernel drops
(NO_SOCKET, IP_RPFILTER), an asymmetric flow and a route mismatch:

- every dashboard panel and template query returns data (NO_DATA_IN_LAB lists
  the exceptions, with why);
- PlanewatchNetworkAttachmentMissing fires for smf-d (it asks for telco/storage,
  which the lab never attaches);
- nothing loss-related fires; then, with interface drops provoked on the data
  plane, PlanewatchPlanePacketLoss fires for plane="data" and no other plane.

Rule rewrite: Prometheus loads a temp copy of deploy/rules/planewatch-rules.yaml
in which every alert's `for:` is 0s, so an alert fires at the first evaluation
where its expression holds instead of 5-30 minutes later. The `[5m]` windows stay:
rate() answers as soon as a window holds two samples.

How the data plane loses packets: the node-side veth peer of upf-a's net2 gets
MTU 1000 while upf-a sends 1200-byte datagrams over net2 (MTU 1500). veth refuses
frames longer than the peer's MTU (is_skb_forwardable) and counts each as
tx_dropped on the sender, upf-a's net2: an MTU mismatch, as on a real data plane.
Setting that peer down instead moved tx_dropped by 3 for 50 datagrams (measured
with `ip -s -j link`): with the carrier off the datagrams were held, and sent
when the peer came back.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dashboards.generate import all_queries, to_promql
from tests import prom
from tests.conftest import REPO, Collector, parse_metrics, series, unique_prefix, wait_for

pytestmark = [pytest.mark.prometheus, pytest.mark.lab]

RULES = Path(REPO) / "deploy" / "rules" / "planewatch-rules.yaml"
NODE = "lab-node"
LAB_PLANES = {"management", "signaling", "data"}    # the demo pods attach no storage
LOSS_GROUP = "planewatch-loss"
DROPPED = 200                                         # oversized datagrams on the data plane
CLOSED_PORT = 40999

# Dashboard queries (dashboard uid, panel title) with no data in the lab, and why.
NO_DATA_IN_LAB: dict[tuple[str, str], str] = {
    ("planewatch-sriov", "VF configuration"):
        "IFLA_VFINFO_LIST needs a PF with VFs in the host netns; this kernel has no SR-IOV "
        "(tests/test_vfinfo.py feeds the source uapi-built messages instead)",
    ("planewatch-sriov", "Device reads failing or refused"):
        "the lab's sysfs tree reads cleanly and its pods' device-info is valid "
        "(tests/test_sriov_hostile.py and the golden lab's extra objects show the series)",
}


# --------------------------------------------------------------------------- pure helpers

def rules_firing_at_once(text: str) -> str:
    """The rule file with every alert's `for:` set to 0s (see the module docstring)."""
    document = yaml.safe_load(text)
    for group in document["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
    return yaml.safe_dump(document, sort_keys=False)


def alert_names(group: str) -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"] for g in groups if g["name"] == group for r in g["rules"] if "alert" in r}


def active(alerts: list[dict], name: str, state: str = "firing") -> list[dict]:
    return [a["labels"] for a in alerts if a["labels"]["alertname"] == name and a["state"] == state]


# --------------------------------------------------------------------------- the lab, poked

def ip_json(ns: str, *args: str) -> list[dict]:
    out = subprocess.run(["ip", "-n", ns, "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def tx_dropped(ns: str, dev: str) -> int:
    return ip_json(ns, "-s", "link", "show", dev)[0]["stats64"]["tx"]["dropped"]


def moved_loss_counters(p) -> list:
    """(metric, pod, interface, values of the last 2 minutes) of every drop and error
    series that changed: what a loss alert on an unexpected pod was made of."""
    out = []
    for name in ("receive_drops", "transmit_drops", "receive_errors", "transmit_errors"):
        for s in p.query(f"planewatch_interface_{name}_total[2m]"):
            values = [float(v) for _, v in s["values"]]
            if len(set(values)) > 1:
                out.append((name, s["metric"].get("pod"), s["metric"].get("interface"), values))
    return out


def scraped_tx_drops(collector) -> list[float]:
    return list(series(parse_metrics(collector.metrics()), "planewatch_interface_transmit_drops_total",
                       pod="upf-a", interface="net2").values())


def veth_peer(lab, pod_ns: str, dev: str) -> str:
    """The node-side name of a pod veth, found by ifindex rather than by naming rule."""
    peer_index = ip_json(pod_ns, "link", "show", dev)[0]["link_index"]
    return next(link["ifname"] for link in ip_json(lab.node_ns, "link", "show")
                if link["ifindex"] == peer_index)


def addr(lab, pod: str, dev: str) -> str:
    return lab.addresses[f"telco/{pod}"][dev][0]


def pin_neighbour(lab, pod: str, dev: str, peer: str, peer_dev: str, via_address: str = "") -> None:
    """A permanent neighbour entry, so that an off-subnet source (which the peer's
    strict rp_filter refuses to answer ARP for) still gets its frames out."""
    target = via_address or addr(lab, peer, peer_dev)
    subprocess.run(["ip", "-n", lab.pod_ns[f"telco/{pod}"], "neigh", "replace", target, "lladdr",
                    lab.macs[f"telco/{peer}"][peer_dev], "dev", dev, "nud", "permanent"], check=True)


def udp_socket(lab, pod: str, bind: tuple[str, int]) -> socket.socket:
    from kernel.nsenter import in_netns
    with in_netns(f"/run/netns/{lab.pod_ns[f'telco/{pod}']}"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(bind)
    s.settimeout(2)
    return s


def asymmetric_exchange(lab, n: int = 20) -> None:
    """upf-a asks upf-b's signaling address from its management address: the request
    enters upf-b by net1, upf-b's reply to the management subnet leaves by eth0."""
    with udp_socket(lab, "upf-b", (addr(lab, "upf-b", "net1"), 7010)) as server, \
            udp_socket(lab, "upf-a", (addr(lab, "upf-a", "eth0"), 0)) as client:
        for _ in range(n):
            client.sendto(b"q" * 64, server.getsockname())
            data, peer = server.recvfrom(2048)
            server.sendto(data, peer)
            assert client.recv(2048) == data


def strict_rp_filter_drops(lab, n: int = 20) -> None:
    """The same off-subnet request towards smf-d, whose net1 has strict rp_filter."""
    with udp_socket(lab, "upf-a", (addr(lab, "upf-a", "eth0"), 0)) as client:
        for _ in range(n):
            client.sendto(b"r" * 64, (addr(lab, "smf-d", "net1"), 7003))


def closed_port_drops(lab, n: int = 20) -> None:
    from lab.traffic import udp_send
    udp_send(lab.pod_ns["telco/upf-b"], addr(lab, "upf-a", "eth0"), n, port=CLOSED_PORT)


def misroute_signaling_peer(lab) -> None:
    """smf-d reaches upf-b's signaling address by a /32 via the default network."""
    subprocess.run(["ip", "-n", lab.pod_ns["telco/smf-d"], "route", "add",
                    f"{addr(lab, 'upf-b', 'net1')}/32", "via", "10.70.255.254", "dev", "eth0"], check=True)


def set_strict_rp_filter(lab, pod: str, dev: str) -> None:
    subprocess.run(["ip", "netns", "exec", lab.pod_ns[f"telco/{pod}"], "sysctl", "-qw",
                    f"net.ipv4.conf.{dev}.rp_filter=1"], check=True)


VF_TRAFFIC_KEYS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_broadcast", "rx_multicast")


def advance_vf_counters(sysfs: str, vfs: list[dict], packets: int) -> None:
    """Traffic on the fixture VFs (the lab has no SR-IOV NIC): add to their packet,
    byte, broadcast and multicast counters. Drops, errors and spoofed stay put, so
    the VF alerts have no reason to fire."""
    for vf in vfs:
        stats = os.path.join(sysfs, "bus/pci/devices", vf["pf_pci_address"], "sriov", str(vf["vf"]), "stats")
        step = {k: packets * (100 if k.endswith("bytes") else 1) for k in VF_TRAFFIC_KEYS}
        if os.path.isdir(stats):                       # Intel: one value a file
            for key, add in step.items():
                path = os.path.join(stats, key)
                if os.path.exists(path):
                    Path(path).write_text(f"{int(Path(path).read_text()) + add}\n")
        elif os.path.isfile(stats):                    # Mellanox: `key : value` lines
            text = Path(stats).read_text()
            for key, add in step.items():
                text = re.sub(rf"^({key}\s*:\s*)(\d+)$", lambda m, add=add: f"{m[1]}{int(m[2]) + add}", text, flags=re.M)
            Path(stats).write_text(text)


def traffic_round(lab, sysfs) -> None:
    from lab.topology import warm_up
    assert warm_up(lab, 20) > 0               # every plane: eth0, net1 and net2 towards upf-a
    asymmetric_exchange(lab)
    strict_rp_filter_drops(lab)
    closed_port_drops(lab)
    advance_vf_counters(sysfs.root, sysfs.vfs, 1000)


# --------------------------------------------------------------------------- the fixture

def build_ebpf_or_skip() -> None:
    build = subprocess.run(["make", "-s", "-C", os.path.join(REPO, "ebpf")], capture_output=True, text=True)
    if build.returncode:
        pytest.skip(f"BPF objects cannot be built: {build.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def surface():
    """Lab + collector + Prometheus with the rules, a first scrape, then two rounds of
    traffic (so that series born in the first round grow in the second)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    if prom.PROMETHEUS is None:
        pytest.skip("needs Debian's prometheus")
    build_ebpf_or_skip()
    from lab import topology
    from lab.objects import NODE_NAME, write_pods_file
    from lab.sriov_fixture import write_sriov_fixture

    prefix = unique_prefix("pwlp")
    workdir = Path(tempfile.mkdtemp(prefix="planewatch-live-"))
    collector = prometheus = None
    topology.down(prefix)                     # a leftover from a killed run of the same pid
    try:
        lab = topology.up(prefix, topology.demo_pods() + topology.sriov_pods())
        fixture = write_sriov_fixture(str(workdir / "sysfs"))
        sysfs = SimpleNamespace(root=fixture["sysfs"], vfs=fixture["vfs"])
        write_pods_file(lab, str(workdir / "pods.json"))
        collector = Collector("--pods-file", str(workdir / "pods.json"), "--node-name", NODE_NAME,
                              "--path.sysfs", sysfs.root,
                              # probes on one plane, so the probe panels have data
                              "--collector.neighbours.probe-planes", "management")
        collector.wait_ready()
        rules = workdir / "rules.yaml"
        rules.write_text(rules_firing_at_once(RULES.read_text()))
        (workdir / "prometheus").mkdir()
        prometheus = prom.Prometheus(workdir / "prometheus",
                                     prom.config([f"127.0.0.1:{collector.port}"], [rules], node=NODE))
        # BPF attaches in the background after the collector's first scrape (ebpf_up is
        # 1 at load already): traffic only once every pod interface is hooked
        hookable = sum(len(ifaces) for ifaces in lab.addresses.values())
        prometheus.wait_for(f"planewatch_ebpf_attached_interfaces == {hookable}", timeout=30)
        pin_neighbour(lab, "upf-a", "net1", "upf-b", "net1")
        pin_neighbour(lab, "upf-a", "net1", "smf-d", "net1")
        pin_neighbour(lab, "upf-b", "eth0", "upf-a", "eth0")
        set_strict_rp_filter(lab, "smf-d", "net1")
        misroute_signaling_peer(lab)
        for _ in range(2):
            traffic_round(lab, sysfs)
            time.sleep(1.5)
        yield SimpleNamespace(lab=lab, collector=collector, prom=prometheus, sysfs=sysfs)
    finally:
        if prometheus:
            prometheus.stop()
        if collector:
            collector.stop()
        topology.down(prefix)
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- tests

def test_rules_load_with_for_zero_and_evaluate_cleanly_on_real_data(surface):
    groups = surface.prom.api("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    source = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) == len(source)
    assert {r["name"]: r["duration"] for r in rules if r["type"] == "alerting"} == \
        {r["alert"]: 0 for r in source if "alert" in r}
    # runtime errors (many-to-many matching on real label sets) pass promtool check
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


def test_network_attachment_missing_fires_for_smf_d(surface):
    firing = surface.prom.wait_for(
        lambda: active(surface.prom.alerts(), "PlanewatchNetworkAttachmentMissing"), timeout=10)
    assert [(a["namespace"], a["pod"], a["network"], a["node"]) for a in firing] == \
        [("telco", "smf-d", "telco/storage", NODE)]


def test_every_dashboard_query_returns_data(surface):
    queries = all_queries()

    def without_data() -> list:
        return [(q.dashboard, q.panel, to_promql(q.expr)) for q in queries
                if not surface.prom.query(to_promql(q.expr))]

    deadline = time.monotonic() + 20          # rates need a second sample after the traffic
    while True:
        empty = without_data()
        unexpected = [e for e in empty if e[:2] not in NO_DATA_IN_LAB]
        if not unexpected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert unexpected == []
    # an allow-list entry whose query has data now is stale
    assert sorted({e[:2] for e in empty}) == sorted(NO_DATA_IN_LAB)
    print(f"\n{len(queries) - len(empty)} of {len(queries)} dashboard queries returned data")


def test_plane_packet_loss_fires_for_the_data_plane_only(surface):
    p, lab = surface.prom, surface.lab
    loss_alerts = alert_names(LOSS_GROUP)
    assert "PlanewatchPlanePacketLoss" in loss_alerts

    # Before: a loss ratio for every plane of the lab, at 0, and no loss alert.
    ratio = "plane:planewatch_interface_loss:ratio_rate5m"
    p.wait_for(lambda: {s["metric"]["plane"] for s in p.query(ratio)} >= LAB_PLANES, timeout=20,
               what=f"{ratio} for {sorted(LAB_PLANES)}")
    time.sleep(2.5)                           # two more evaluations of the alert groups
    assert {s["metric"]["plane"]: float(s["value"][1]) for s in p.query(ratio)} == dict.fromkeys(LAB_PLANES, 0.0)
    assert [a["labels"] for a in p.alerts() if a["labels"]["alertname"] in loss_alerts] == []

    upf_a = lab.pod_ns["telco/upf-a"]
    peer = veth_peer(lab, upf_a, "net2")
    before = tx_dropped(upf_a, "net2")
    subprocess.run(["ip", "-n", lab.node_ns, "link", "set", peer, "mtu", "1000"], check=True)
    try:
        from lab.traffic import udp_send
        udp_send(upf_a, addr(lab, "upf-b", "net2"), DROPPED, size=1200)
        assert tx_dropped(upf_a, "net2") - before == DROPPED
        # a scrape of ours may join Prometheus's, in flight since before the drops
        wait_for(lambda: list(scraped_tx_drops(surface.collector)) == [tx_dropped(upf_a, "net2")],
                 timeout=5, what="the collector's tx drops of upf-a net2 to equal the kernel's")

        firing = p.wait_for(lambda: active(p.alerts(), "PlanewatchPlanePacketLoss"), timeout=15)
        time.sleep(2.5)                       # any other plane would have fired by now
        alerts = p.alerts()
    finally:
        subprocess.run(["ip", "-n", lab.node_ns, "link", "set", peer, "mtu", "1500"], check=True)
    assert [a["plane"] for a in firing] == ["data"]
    assert [a["plane"] for a in active(alerts, "PlanewatchPlanePacketLoss")] == ["data"]
    assert [(a["plane"], a["node"]) for a in active(alerts, "PlanewatchNodePacketLoss")] == [("data", NODE)]
    pods = [(a["pod"], a["network"]) for a in active(alerts, "PlanewatchPodPacketLoss")]
    assert pods == [("upf-a", "telco/data")], moved_loss_counters(p)
    others = {a["labels"]["alertname"] for a in alerts if a["labels"]["alertname"] in loss_alerts}
    assert others == {"PlanewatchPlanePacketLoss", "PlanewatchNodePacketLoss", "PlanewatchPodPacketLoss"}
    loss = {s["metric"]["plane"]: float(s["value"][1]) for s in p.query(ratio)}
    assert loss["data"] > 0.001 and loss["management"] == loss["signaling"] == 0
