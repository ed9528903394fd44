"""Plane reachability on the real lab, read by a real Prometheus with the project's rules.

The signaling pods route a service prefix via the signaling peer (lab/scenarios.py
`signaling_via_peer`); no traffic flows. Then the peer stops answering ARP
(`gateway_blackhole`) and each pod tries once to send through it, as any client
retry does: the pods' neighbour entries for the peer go FAILED, on /metrics for
the signaling plane only, and PlanewatchPlaneUnreachable fires for signaling only.
When the peer answers again and the pods send again, the entries are reachable
and the alert clears.

Active probes run for the management plane only (--collector.neighbours.probe-planes):
probe counters and RTT histograms appear for management attachments and no other,
and the ARP requests seen on the gateway's side stay within the per-node rate.
"""
from __future__ import annotations

import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests import prom
from tests.conftest import REPO, Collector, parse_metrics, series, wait_for

pytestmark = [pytest.mark.prometheus, pytest.mark.lab]

RULES = Path(REPO) / "deploy" / "rules" / "planewatch-rules.yaml"
PROBE_RATE = 4.0            # packets/s for the node: below what 4 gateways every 0.5 s ask for
PROBE_INTERVAL = 0.5
SIG_GATEWAY = "10.71.255.254"


def rules_firing_at_once(text: str) -> str:
    document = yaml.safe_load(text)
    for group in document["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
    return yaml.safe_dump(document, sort_keys=False)


@pytest.fixture(scope="module")
def reach(lab):
    from lab import scenarios
    from lab.objects import NODE_NAME, write_pods_file
    if prom.PROMETHEUS is None:
        pytest.skip("needs Debian's prometheus")
    workdir = Path(tempfile.mkdtemp(prefix="planewatch-reach-"))
    routed = scenarios.signaling_via_peer(lab)
    collector = prometheus = None
    try:
        write_pods_file(lab, str(workdir / "pods.json"))
        collector = Collector("--pods-file", str(workdir / "pods.json"), "--node-name", NODE_NAME,
                              "--no-collector.ebpf", "--collector.neighbours.probe-planes", "management",
                              "--collector.neighbours.probe-rate", str(PROBE_RATE),
                              "--collector.neighbours.probe-interval", str(PROBE_INTERVAL))
        collector.wait_ready()
        rules = workdir / "rules.yaml"
        rules.write_text(rules_firing_at_once(RULES.read_text()))
        (workdir / "prometheus").mkdir()
        prometheus = prom.Prometheus(workdir / "prometheus",
                                     prom.config([f"127.0.0.1:{collector.port}"], [rules], node=NODE_NAME))
        yield lab, collector, prometheus, routed
    finally:
        if prometheus:
            prometheus.stop()
        if collector:
            collector.stop()
        routed.revert()
        shutil.rmtree(workdir, ignore_errors=True)


def gateway_states(collector) -> dict[tuple[str, str, str], str]:
    """(pod, plane, gateway) -> the state whose series is 1."""
    out = {}
    for labels, value in series(parse_metrics(collector.metrics()), "planewatch_gateway_neighbour_state").items():
        lab = dict(labels)
        if value == 1:
            out[(f"{lab['namespace']}/{lab['pod']}", lab["plane"], lab["gateway"])] = lab["state"]
    return out


def firing(p, name: str) -> list[dict]:
    return [a["labels"] for a in p.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]


def test_blackholed_gateway_fails_its_plane_only_and_clears(reach):
    from lab import scenarios
    lab, collector, p, _ = reach
    sig_pods = scenarios.signaling_pods(lab)
    assert len(sig_pods) == 3

    # Routed, idle: the peer is a gateway of every signaling pod (a route next hop),
    # never resolved yet. Nothing is unreachable.
    states = gateway_states(collector)
    assert {k: v for k, v in states.items() if k[1] == "signaling"} == \
        {(pod, "signaling", SIG_GATEWAY): "none" for pod in sig_pods}
    p.wait_for('plane:planewatch_gateway_unreachable:ratio{plane="signaling"} == 0', timeout=30)
    assert firing(p, "PlanewatchPlaneUnreachable") == []

    with scenarios.applied(scenarios.gateway_blackhole(lab)):
        for pod in sig_pods:
            scenarios.send_once(lab.pod_ns[pod], "10.99.0.1")

        def failed() -> dict:
            now = gateway_states(collector)
            return now if all(now.get((pod, "signaling", SIG_GATEWAY)) == "failed" for pod in sig_pods) else {}
        states = wait_for(failed, timeout=20, what="signaling gateway failed in every signaling pod")
        assert {k for k, v in states.items() if v in ("failed", "incomplete")} == \
            {(pod, "signaling", SIG_GATEWAY) for pod in sig_pods}

        alerts = p.wait_for(lambda: firing(p, "PlanewatchPlaneUnreachable"), timeout=30,
                            what="PlanewatchPlaneUnreachable")
        assert [a["plane"] for a in alerts] == ["signaling"]
        # a plane outage is one alert, not one per pod
        assert firing(p, "PlanewatchPodGatewayUnreachable") == []

    # The peer answers again; the pods send again (the next retry).
    for pod in sig_pods:
        scenarios.send_once(lab.pod_ns[pod], "10.99.0.1")

    def reachable() -> dict:
        now = gateway_states(collector)
        return now if all(now.get((pod, "signaling", SIG_GATEWAY)) == "reachable" for pod in sig_pods) else {}
    wait_for(reachable, timeout=20, what="signaling gateway reachable again")
    p.wait_for(lambda: not firing(p, "PlanewatchPlaneUnreachable"), timeout=30, what="the alert clears")
    assert p.query('plane:planewatch_gateway_unreachable:ratio{plane="signaling"} == 0')


def arp_requests_to(lab, netns: str, dev: str, target: str, seconds: float) -> int:
    """ARP requests for `target` arriving on `dev` in `netns` during `seconds`."""
    from kernel.nsenter import in_netns
    with in_netns(f"/run/netns/{netns}"):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0806))
    with sock:
        sock.bind((dev, 0x0806))
        sock.settimeout(0.2)
        want = socket.inet_aton(target)
        count, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                payload = sock.recv(2048)
            except socket.timeout:
                continue
            if len(payload) >= 28 and struct.unpack_from("!H", payload, 6)[0] == 1 and payload[24:28] == want:
                count += 1
        return count


def test_probes_only_the_opted_in_plane_within_the_rate(reach):
    lab, collector, p, _ = reach
    gateway = "10.70.255.254"       # the default network's gateway: br0 in the node namespace

    def probed() -> dict:
        parsed = parse_metrics(collector.metrics())
        answered = series(parsed, "planewatch_gateway_probe_rtt_seconds_count")
        return parsed if len(answered) == len(lab.pod_ns) and all(v > 0 for v in answered.values()) else {}
    parsed = wait_for(probed, timeout=30, what="an answered probe per management attachment")
    for name in ("planewatch_gateway_probes_total", "planewatch_gateway_probe_failures_total",
                 "planewatch_gateway_probe_rtt_seconds_count", "planewatch_gateway_probe_rtt_seconds_bucket"):
        planes = {dict(lbl)["plane"] for lbl in series(parsed, name)}
        assert planes == {"management"}, name
        assert {dict(lbl)["gateway"] for lbl in series(parsed, name)} == {gateway}, name
    assert set(series(parsed, "planewatch_gateway_probe_failures_total").values()) == {0}
    rtt_sum = sum(series(parsed, "planewatch_gateway_probe_rtt_seconds_sum").values())
    rtt_n = sum(series(parsed, "planewatch_gateway_probe_rtt_seconds_count").values())
    print(f"\nmean ARP RTT to the management gateway: {rtt_sum / rtt_n * 1e6:.0f} us over {rtt_n:.0f} probes")
    assert 0 < rtt_sum / rtt_n < 0.1

    # The bound, counted where it matters: the gateway's side.
    before = sum(series(parse_metrics(collector.metrics()), "planewatch_gateway_probes_total").values())
    window = 6.0
    seen = arp_requests_to(lab, lab.node_ns, "br0", gateway, window)
    after = sum(series(parse_metrics(collector.metrics()), "planewatch_gateway_probes_total").values())
    print(f"ARP requests for the gateway in {window:.0f}s: {seen} (bound {PROBE_RATE:.0f}/s, "
          f"demand {len(lab.pod_ns) / PROBE_INTERVAL:.0f}/s); probes counted {after - before:.0f}")
    assert seen <= PROBE_RATE * window + PROBE_RATE      # the rate plus one burst
    assert seen >= PROBE_RATE * window / 2                # and it does probe at about that rate
    delayed = series(parse_metrics(collector.metrics()), "planewatch_gateway_probes_delayed_total")
    assert list(delayed.values())[0] > 0                  # demand above the bound: probes waited
