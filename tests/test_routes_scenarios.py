"""Asymmetric routing on the lab (lab/scenarios.py), seen by the real collector
(/metrics, /debug/attachments, /debug/asymmetric) with real UDP packets.

Each scenario checks that its finding appears while applied and is absent
before and after. The collector reads a private netns directory holding only
this lab's pods: every lab on the machine uses the same addresses, and a
resolver scanning /run/netns could match a pod to another lab's namespace.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest

from lab import scenarios
from lab.objects import NODE_NAME, lab_objects, write_pods_file
from tests.conftest import Collector, parse_metrics, series, wait_for

pytestmark = pytest.mark.lab

UPF_A, UPF_B, SMF_D = "telco/upf-a", "telco/upf-b", "telco/smf-d"
REQUESTS = 20


@pytest.fixture(scope="module")
def netns_dir(lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("netns")
    for name in lab.pod_ns.values():
        os.symlink(f"/run/netns/{name}", d / name)
    return str(d)


@pytest.fixture(scope="module")
def served(lab, netns_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("routes") / "pods.json")
    write_pods_file(lab, path)
    c = Collector("--pods-file", path, "--node-name", NODE_NAME, "--path.netns", netns_dir)
    try:
        c.wait_ready()
        ebpf_usable(c, lab)      # BPF on every interface before any test sends traffic
        yield lab, c
    finally:
        c.stop()


def scrape(c: Collector) -> dict:
    return parse_metrics(c.metrics())


def total(parsed: dict, name: str, **labels) -> float:
    return sum(series(parsed, name, **labels).values())


def pod_labels(key: str) -> dict:
    ns, name = key.split("/")
    return {"namespace": ns, "pod": name}


def findings(c: Collector, *pods: str) -> set[tuple[str, str, str]]:
    """(namespace/pod, interface, kind) of every finding, for the given pods (all when none)."""
    status, body = c.get("/debug/attachments")
    assert status == 200
    got = {(f"{f['namespace']}/{f['pod']}", f["interface"], f["kind"]) for f in json.loads(body)["findings"]}
    return {f for f in got if not pods or f[0] in pods}


def finding_texts(c: Collector, pod: str) -> list[dict]:
    body = json.loads(c.get("/debug/attachments")[1])
    return [f for f in body["findings"] if f"{f['namespace']}/{f['pod']}" == pod]


def ebpf_usable(c: Collector, lab) -> str:
    """"" when the eBPF source is loaded and attached to every lab interface, else why
    not. ebpf_up is 1 at load; attaching follows in the background: wait for it."""
    parsed = scrape(c)
    if total(parsed, "planewatch_ebpf_up") != 1:
        info = series(parsed, "planewatch_ebpf_info")
        return f"eBPF source not usable here: {[dict(k) for k in info] or 'no ebpf source'}"
    hookable = sum(len(ifaces) for ifaces in lab.addresses.values())
    wait_for(lambda: total(scrape(c), "planewatch_ebpf_attached_interfaces") == hookable,
             what=f"BPF on all {hookable} lab interfaces")
    return ""


def wait_grown(c: Collector, before: dict, name: str, labels: dict, by: int) -> dict:
    """Scrape until counter `name{labels}` grew by at least `by` since `before`; that scrape."""
    def grown():
        parsed = scrape(c)
        return parsed if total(parsed, name, **labels) - total(before, name, **labels) >= by else None
    return wait_for(grown, what=f"{name}{labels} to grow by {by}")


def exchange(lab, client: str, client_ip: str, server: str, server_ip: str) -> tuple[int, int]:
    return scenarios.udp_request_reply(lab.pod_ns[client], client_ip, lab.pod_ns[server], server_ip, REQUESTS)


ASYM_A = dict(**pod_labels(UPF_A), ingress_interface="net1", egress_interface="eth0")
RPF_D = dict(**pod_labels(SMF_D), interface="eth0", reason="IP_RPFILTER")


# --- 1. correct: replies leave by the interface they came in on ----------------------------

def test_1_symmetric_replies_give_no_finding_and_no_count(served):
    lab, c = served
    with scenarios.applied(scenarios.loose_rp_filter(lab)):
        wait_for(lambda: all(total(scrape(c), "planewatch_interface_rp_filter", **pod_labels(p),
                                   interface="net1") == 2 for p in (UPF_A, UPF_B)), what="rp_filter=2 seen")
        before = scrape(c)          # also attaches the BPF programs before the traffic
        served_n, answered = exchange(lab, UPF_B, scenarios.pod_ip(lab, UPF_B, "net1"),
                                      UPF_A, scenarios.pod_ip(lab, UPF_A, "net1"))
        assert (served_n, answered) == (REQUESTS, REQUESTS)
        after = scrape(c)
        assert findings(c, UPF_A, UPF_B) == set()
        assert series(after, "planewatch_route_mismatch") == {}
        assert series(after, "planewatch_subnet_overlap") == {}
        reason = ebpf_usable(c, lab)
        if reason:
            pytest.skip(reason)
        # the programs saw the exchange, and none of it was asymmetric
        rx = "planewatch_ebpf_interface_receive_packets_total"
        assert total(after, rx, **pod_labels(UPF_A), interface="net1") - \
            total(before, rx, **pod_labels(UPF_A), interface="net1") >= REQUESTS
        for pod in (UPF_A, UPF_B):
            assert total(after, "planewatch_asymmetric_packets_total", **pod_labels(pod)) == \
                total(before, "planewatch_asymmetric_packets_total", **pod_labels(pod))


# --- 2. a more specific route via eth0 inside net1's subnet ---------------------------------

def mismatch(parsed: dict, pod: str = UPF_A) -> dict:
    return {(dict(k)["interface"], dict(k)["destination"], dict(k)["egress_interface"]): v
            for k, v in series(parsed, "planewatch_route_mismatch", **pod_labels(pod)).items()}


def test_2_more_specific_route_is_a_route_mismatch_on_net1(served):
    lab, c = served
    assert mismatch(scrape(c)) == {}
    with scenarios.applied(scenarios.more_specific_route(lab)):
        got = wait_for(lambda: mismatch(scrape(c)), what="route_mismatch on upf-a")
        assert got == {("net1", "10.71.5.0/24", "eth0"): 1}
        (finding,) = [f for f in finding_texts(c, UPF_A) if f["kind"] == "route_mismatch"]
        assert finding["interface"] == "net1"
        assert "`10.71.5.0/24 via 10.70.255.254 dev eth0` in table main" in finding["sentence"]
        assert finding["fix"].startswith("ip rule add from 10.71.0.10 table ")
        # the route lives in upf-a only: upf-b, on the same networks, is fine
        assert mismatch(scrape(c), UPF_B) == {}
        assert {f for f in findings(c) if f[2] == "route_mismatch"} == {(UPF_A, "net1", "route_mismatch")}
    wait_for(lambda: not mismatch(scrape(c)), what="route_mismatch gone after revert")
    assert findings(c, UPF_A) == set()


# --- 3. off-subnet request on net1, reply by the default route via eth0 ---------------------

def test_3_off_subnet_peer_counts_asymmetric_packets_and_rpfilter_drops(served):
    lab, c = served
    with scenarios.applied(scenarios.off_subnet_peer(lab, client_rp_filter=1)) as ch:
        # static side: the strict client is a finding; upf-a's routes are not wrong as such
        wait_for(lambda: {(SMF_D, "eth0", "strict_rp_filter"), (SMF_D, "net1", "strict_rp_filter")}
                 <= findings(c, SMF_D), what="strict rp_filter finding on smf-d")
        assert total(scrape(c), "planewatch_interface_rp_filter", **pod_labels(SMF_D), interface="eth0") == 1
        assert mismatch(scrape(c)) == {}
        reason = ebpf_usable(c, lab)
        if reason:
            pytest.skip(reason)
        before = scrape(c)
        served_n, answered = exchange(lab, SMF_D, ch.info["address"], UPF_A, ch.info["server_ip"])
        assert (served_n, answered) == (REQUESTS, 0)     # every reply dropped by the client
        asym = "planewatch_asymmetric_packets_total"
        after = wait_grown(c, before, asym, ASYM_A, REQUESTS)
        assert total(after, asym, **ASYM_A) - total(before, asym, **ASYM_A) == REQUESTS
        assert total(after, asym, **pod_labels(UPF_A), ingress_interface="net1",
                     egress_interface="eth0", interface="net1", network="telco/signaling") > 0
        drops = "planewatch_packet_drops_total"
        assert total(after, drops, **RPF_D) - total(before, drops, **RPF_D) == REQUESTS
        flows = json.loads(c.get("/debug/asymmetric?limit=100")[1])["flows"]
        assert any(f.get("pod") == "upf-a" and f["ingress_interface"] == "net1" and f["egress_interface"] == "eth0"
                   and f["source"] == ch.info["server_ip"] and f["destination"] == ch.info["address"]
                   for f in flows), flows

    # loose rp_filter on the client: the replies arrive, still asymmetric, nothing dropped
    with scenarios.applied(scenarios.off_subnet_peer(lab, client_rp_filter=2)) as ch:
        before = scrape(c)
        assert exchange(lab, SMF_D, ch.info["address"], UPF_A, ch.info["server_ip"]) == (REQUESTS, REQUESTS)
        after = wait_grown(c, before, "planewatch_asymmetric_packets_total", ASYM_A, REQUESTS)
        assert total(after, "planewatch_packet_drops_total", **RPF_D) == \
            total(before, "planewatch_packet_drops_total", **RPF_D)


def test_3b_strict_rp_filter_on_the_server_drops_off_subnet_requests(served):
    lab, c = served
    reason = ebpf_usable(c, lab)
    if reason:
        pytest.skip(reason)
    with scenarios.applied(scenarios.off_subnet_peer(lab, client_rp_filter=2, server_rp_filter=1)) as ch:
        wait_for(lambda: (UPF_A, "net1", "strict_rp_filter") in findings(c, UPF_A), what="strict on upf-a")
        before = scrape(c)
        assert exchange(lab, SMF_D, ch.info["address"], UPF_A, ch.info["server_ip"]) == (0, 0)
        drops = dict(**pod_labels(UPF_A), interface="net1", reason="IP_RPFILTER")
        after = wait_grown(c, before, "planewatch_packet_drops_total", drops, REQUESTS)
        assert total(after, "planewatch_packet_drops_total", **drops) - \
            total(before, "planewatch_packet_drops_total", **drops) == REQUESTS
    wait_for(lambda: not findings(c, UPF_A), what="upf-a findings gone after revert")


# --- 4. overlapping subnets -------------------------------------------------------------------

def overlaps(parsed: dict) -> set[tuple[str, str, str]]:
    return {(dict(k)["pod"], dict(k)["interface"], dict(k)["other_interface"])
            for k in series(parsed, "planewatch_subnet_overlap")}


def test_4_overlapping_subnets_are_a_finding(served):
    lab, c = served
    assert overlaps(scrape(c)) == set()
    try:
        with scenarios.applied(scenarios.overlapping_subnet(lab)):
            write_pods_file(lab, lab.pods_file)      # Multus would annotate the second address
            got = wait_for(lambda: overlaps(scrape(c)), what="subnet_overlap on upf-b")
            assert got == {("upf-b", "net1", "net2"), ("upf-b", "net2", "net1")}
            assert {(UPF_B, "net1", "subnet_overlap"), (UPF_B, "net2", "subnet_overlap")} <= findings(c, UPF_B)
            # net1's traffic to the overlap leaves by net2: the overlap's consequence, named
            assert mismatch(scrape(c), UPF_B) == {("net1", "10.71.200.0/24", "net2"): 1}
            assert findings(c, UPF_A) == set()
    finally:
        write_pods_file(lab, lab.pods_file)
    wait_for(lambda: not overlaps(scrape(c)), what="subnet_overlap gone after revert")
    assert findings(c, UPF_B) == set()


# --- 5. the fix: a policy routing table for net1 ----------------------------------------------

def test_5_policy_routing_table_per_interface_fixes_it(served):
    lab, c = served
    ebpf_reason = ebpf_usable(c, lab)
    with scenarios.applied(scenarios.more_specific_route(lab)), \
            scenarios.applied(scenarios.off_subnet_peer(lab, client_rp_filter=1)) as peer:
        wait_for(lambda: (UPF_A, "net1", "route_mismatch") in findings(c, UPF_A), what="mismatch before fix")
        assert total(scrape(c), "planewatch_pod_policy_routing", **pod_labels(UPF_A)) == 0
        args = (lab, SMF_D, peer.info["address"], UPF_A, peer.info["server_ip"])
        assert exchange(*args) == (REQUESTS, 0)
        with scenarios.applied(scenarios.policy_routing_fix(lab)) as fix:
            wait_for(lambda: not findings(c, UPF_A), what="upf-a findings gone with the fix")
            parsed = scrape(c)
            assert mismatch(parsed) == {}
            assert total(parsed, "planewatch_pod_policy_routing", **pod_labels(UPF_A)) == 1
            rules = {(dict(k)["source"], dict(k)["table"]) for k in
                     series(parsed, "planewatch_pod_policy_rule_info", **pod_labels(UPF_A))}
            assert rules == {(f"{fix.info['source']}/32", str(fix.info["table"]))}
            # strict rp_filter on a multi-homed pod stays a finding in itself
            assert (SMF_D, "eth0", "strict_rp_filter") in findings(c, SMF_D)
            before = scrape(c)
            assert exchange(*args) == (REQUESTS, REQUESTS)     # the replies come back by net1 now
            if ebpf_reason:
                pytest.skip(ebpf_reason)
            time.sleep(0.5)
            after = scrape(c)
            for name, labels in (("planewatch_asymmetric_packets_total", ASYM_A),
                                 ("planewatch_packet_drops_total", RPF_D)):
                assert total(after, name, **labels) == total(before, name, **labels), name
            rx = "planewatch_ebpf_interface_transmit_packets_total"
            assert total(after, rx, **pod_labels(UPF_A), interface="net1") - \
                total(before, rx, **pod_labels(UPF_A), interface="net1") >= REQUESTS
    wait_for(lambda: total(scrape(c), "planewatch_pod_policy_routing", **pod_labels(UPF_A)) == 0,
             what="policy routing gone after revert")
    wait_for(lambda: not findings(c, UPF_A), what="no finding after revert")


# --- the cache, in process: served until the kernel or the pod changes ----------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_is_served_until_the_pods_routing_changes(lab, netns_dir, monkeypatch):
    import collector.sources.routes as routes_module
    from collector.discovery import Store
    from collector.netns import Resolver
    from collector.registry import Config
    from collector.sources.routes import RoutesSource
    from exporters.exposition import render
    from exporters.metrics import Scraper

    objects = lab_objects(lab)
    store = Store(NODE_NAME)
    store.replace_pods([o for o in objects if o["kind"] == "Pod"])
    store.replace_networks([o for o in objects if o["kind"] == "NetworkAttachmentDefinition"])
    clock = Clock()
    source = RoutesSource(Config(options={"routes": {"interval": 300, "min_gap": 1, "budget": 10}}), clock=clock)
    scraper = Scraper(store, Resolver(netns_dir, "/proc"), {"routes": source}, "test")
    try:
        snap = scraper.snapshot()
        first = {c.facts.pod: c for c in source.refresh(snap)}
        assert set(first) == {"upf-a", "upf-b", "plain-c", "smf-d"}
        cpu = [c.cpu_seconds for c in first.values()]
        print(f"per-pod analysis: CPU median {statistics.median(cpu) * 1000:.1f} ms, "
              f"wall median {statistics.median(c.seconds for c in first.values()) * 1000:.1f} ms")
        assert max(cpu) < 0.2
        clock.now += 5              # no change in the kernel: the same results, not re-read
        again = {c.facts.pod: c for c in source.refresh(scraper.snapshot())}
        assert all(again[p] is first[p] for p in first)
        # and so are their series: rendered once per analysis
        rendered = []
        real_rows = routes_module.analysis_rows
        monkeypatch.setattr(routes_module, "analysis_rows", lambda a: rendered.append(a.pod) or real_rows(a))
        text = render(source.collect(scraper.snapshot()))
        assert sorted(rendered) == sorted(first)
        assert render(source.collect(scraper.snapshot())) == text and len(rendered) == len(first)
        with scenarios.applied(scenarios.more_specific_route(lab)):
            time.sleep(0.2)             # the route event reaches the watch socket
            # the change is noticed now, analysed once min_gap has passed since the last analysis
            source.min_gap = 10
            noticed = {c.facts.pod: c for c in source.refresh(scraper.snapshot())}
            assert noticed["upf-a"] is first["upf-a"] and noticed["upf-a"].analysis.mismatches == ()
            clock.now += 10
            changed = {c.facts.pod: c for c in source.refresh(scraper.snapshot())}
            assert changed["upf-a"] is not first["upf-a"]
            assert [m.probe.destination for m in changed["upf-a"].analysis.mismatches] == ["10.71.5.0/24"]
            assert all(changed[p] is first[p] for p in ("upf-b", "plain-c", "smf-d"))
            assert b'destination="10.71.5.0/24"' in render(source.collect(scraper.snapshot()))
            assert rendered[len(first):] == ["upf-a"]
        time.sleep(0.2)
        clock.now += 301                # the safety interval re-reads everyone
        late = {c.facts.pod: c for c in source.refresh(scraper.snapshot())}
        assert all(late[p] is not changed[p] for p in late)
        assert late["upf-a"].analysis.mismatches == ()
    finally:
        scraper.close()
