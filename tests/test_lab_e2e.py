"""End to end on the lab: `planewatch serve` on the lab's pods file, real traffic,
counters compared with what the kernel says (`ip -s -j link`) in each pod netns."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from lab.objects import NODE_NAME, write_pods_file
from lab.traffic import udp_exchange
from tests.conftest import parse_metrics, series

pytestmark = pytest.mark.lab

FIELDS = {  # metric suffix -> (ip -s -j key path)
    "receive_packets": ("rx", "packets"), "receive_bytes": ("rx", "bytes"),
    "receive_errors": ("rx", "errors"), "receive_drops": ("rx", "dropped"),
    "transmit_packets": ("tx", "packets"), "transmit_bytes": ("tx", "bytes"),
    "transmit_errors": ("tx", "errors"), "transmit_drops": ("tx", "dropped"),
}


def kernel_stats(netns: str, ifname: str) -> dict[str, int]:
    out = subprocess.run(["ip", "-n", netns, "-s", "-j", "link", "show", ifname],
                         check=True, capture_output=True, text=True).stdout
    stats = json.loads(out)[0]["stats64"]
    return {name: stats[a][b] for name, (a, b) in FIELDS.items()}


@pytest.fixture(scope="module")
def served(lab, tmp_path_factory):
    from tests.conftest import Collector
    path = str(tmp_path_factory.mktemp("lab") / "pods.json")
    write_pods_file(lab, path)
    c = Collector("--pods-file", path, "--node-name", NODE_NAME)
    try:
        c.wait_ready()
        yield lab, c
    finally:
        c.stop()


def test_counters_equal_the_kernel(served):
    lab, collector = served
    pods = list(lab.pod_ns)
    # traffic on every network: each pod sends to the first pod's address on that network
    for src in pods[1:]:
        for ifname in lab.addresses[src]:
            first_ips = lab.addresses[pods[0]].get(ifname)
            if first_ips and ifname in lab.addresses[pods[0]]:
                assert udp_exchange(lab.pod_ns[src], lab.pod_ns[pods[0]], first_ips[0], 25, 200) == 25
    checked = 0
    for key, netns in lab.pod_ns.items():
        ns, name = key.split("/")
        for ifname in lab.addresses[key]:
            for _attempt in range(20):
                before = kernel_stats(netns, ifname)
                parsed = parse_metrics(collector.metrics())
                after = kernel_stats(netns, ifname)
                if before == after:      # no background packet (ARP/ND probe) moved it meanwhile
                    break
                time.sleep(0.3)
            else:
                pytest.fail(f"{key} {ifname}: counters never stable")
            for suffix, want in after.items():
                got = series(parsed, f"planewatch_interface_{suffix}_total", namespace=ns, pod=name,
                             interface=ifname)
                assert list(got.values()) == [want], (key, ifname, suffix, got, want)
            checked += 1
    assert checked == sum(len(v) for v in lab.addresses.values()) == 9
    # and the traffic we sent is in there: upf-a's net2 received 3 pods' worth? only upf-b sends on net2
    parsed = parse_metrics(collector.metrics())
    rx = series(parsed, "planewatch_interface_receive_packets_total", pod="upf-a", interface="net2")
    assert list(rx.values())[0] >= 25


def test_labels_planes_and_networks(served):
    lab, collector = served
    parsed = parse_metrics(collector.metrics())
    up = series(parsed, "planewatch_interface_up")
    got = {(dict(l)["pod"], dict(l)["interface"], dict(l)["network"], dict(l)["plane"]) for l in up}
    assert got == {
        ("upf-a", "eth0", "k8s-pod-network", "management"), ("upf-a", "net1", "telco/signaling", "signaling"),
        ("upf-a", "net2", "telco/data", "data"),
        ("upf-b", "eth0", "k8s-pod-network", "management"), ("upf-b", "net1", "telco/signaling", "signaling"),
        ("upf-b", "net2", "telco/data", "data"),
        ("plain-c", "eth0", "k8s-pod-network", "management"),
        ("smf-d", "eth0", "k8s-pod-network", "management"), ("smf-d", "net1", "telco/signaling", "signaling"),
    }
    assert all(v == 1 for v in up.values())
    # pod C has no secondary network: only eth0, everywhere
    assert {dict(l)["interface"] for l in series(parsed, "planewatch_interface_receive_bytes_total",
                                                  pod="plain-c")} == {"eth0"}
    # the hostNetwork pod is skipped entirely
    assert not [k for k in parsed if ("pod", "node-agent") in k[1]]
    mtu = series(parsed, "planewatch_interface_mtu_bytes", pod="upf-a", interface="net2")
    assert list(mtu.values()) == [1500]
    missing = series(parsed, "planewatch_pod_network_attachment_missing")
    assert {(dict(l)["pod"], dict(l)["network"]) for l in missing} == {("smf-d", "telco/storage")}
    info = series(parsed, "planewatch_pod_interface_info", pod="upf-a", interface="net1")
    labels = dict(next(iter(info)))
    assert labels["mac"] == lab.macs["telco/upf-a"]["net1"] and labels["ips"] == "10.71.0.10"
    ok = series(parsed, "planewatch_scrape_collector_success")
    assert ok[frozenset({("collector", "netlink")})] == 1


def test_debug_attachments_and_health(served):
    lab, collector = served
    status, body = collector.get("/debug/attachments")
    assert status == 200
    doc = json.loads(body)
    pods = {f"{p['namespace']}/{p['pod']}": p for p in doc["pods"]}
    assert set(pods) == set(lab.pod_ns)
    for key, p in pods.items():
        assert p["netns"] == f"/run/netns/{lab.pod_ns[key]}"
        assert p["resolved_by"] == "netns-dir:mac"
        assert all(a["found_in_netns"] for a in p["attachments"])
    assert collector.get("/healthz")[0] == 200
    assert collector.get("/readyz")[0] == 200


def test_pod_namespace_vanishing_between_scrapes(served, tmp_path):
    """A pod whose netns disappears is skipped; the scrape still succeeds."""
    lab, collector = served
    parsed = parse_metrics(collector.metrics())
    assert series(parsed, "planewatch_interface_up", pod="plain-c")
    netns = lab.pod_ns["default/plain-c"]
    subprocess.run(["ip", "netns", "del", netns], check=True)
    try:
        parsed = parse_metrics(collector.metrics())
        assert not series(parsed, "planewatch_interface_up", pod="plain-c")
        assert series(parsed, "planewatch_interface_up", pod="upf-a")
        assert series(parsed, "planewatch_scrape_collector_success", collector="netlink") == {
            frozenset({("collector", "netlink")}): 1}
        assert list(series(parsed, "planewatch_pod_netns_resolved", pod="plain-c").values()) == [0]
    finally:
        # put a namespace back under the recorded name so the lab teardown stays uniform
        subprocess.run(["ip", "netns", "add", netns], check=False, capture_output=True)


@pytest.mark.ebpf
def test_ebpf_attaches_before_the_first_scrape(lab, tmp_path):
    """Pods are attached by the background reconcile, so packets sent before
    Prometheus first scrapes are counted."""
    from tests.conftest import Collector
    path = str(tmp_path / "pods.json")
    write_pods_file(lab, path)
    c = Collector("--pods-file", path, "--node-name", NODE_NAME, "--no-collector.sriov")
    try:
        c.wait_ready()
        src, dst = lab.pod_ns["telco/upf-b"], lab.pod_ns["telco/upf-a"]

        from exporters.http import RECONCILE_SECONDS
        time.sleep(RECONCILE_SECONDS + 3)       # no /metrics read yet: only the reconcile attaches
        assert udp_exchange(src, dst, "10.72.0.10", 40, 100) == 40
        parsed = parse_metrics(collector_text := c.metrics())
        rx = series(parsed, "planewatch_ebpf_interface_receive_packets_total", pod="upf-a", interface="net2")
        assert list(rx.values())[0] >= 40, collector_text[:500]
    finally:
        c.stop()


def test_state_and_mtu_changes_show_at_the_next_scrape(served):
    """Link attributes are re-read when the kernel announces a change."""
    lab, collector = served
    netns = lab.pod_ns["telco/upf-b"]
    sel = dict(pod="upf-b", interface="net2")
    assert list(series(parse_metrics(collector.metrics()), "planewatch_interface_mtu_bytes", **sel).values()) == [1500]
    subprocess.run(["ip", "-n", netns, "link", "set", "net2", "mtu", "1400"], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "net2", "down"], check=True)
    try:
        parsed = parse_metrics(collector.metrics())
        assert list(series(parsed, "planewatch_interface_mtu_bytes", **sel).values()) == [1400]
        assert list(series(parsed, "planewatch_interface_up", **sel).values()) == [0]
    finally:
        subprocess.run(["ip", "-n", netns, "link", "set", "net2", "mtu", "1500", "up"], check=True)
    parsed = parse_metrics(collector.metrics())
    assert list(series(parsed, "planewatch_interface_mtu_bytes", **sel).values()) == [1500]
    assert list(series(parsed, "planewatch_interface_up", **sel).values()) == [1]
