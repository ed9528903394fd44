"""Dashboards: generated JSON is fresh and deterministic, every query parses with
promtool, every variable is defined, the data source is never a bare string, and
(with Debian's prometheus) every query returns data from a Prometheus that scrapes
a synthetic planewatch exposition and evaluates the project's rules."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from dashboards import generate
from tests import prom

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "rules" / "planewatch-rules.yaml"
VARIABLES = {"datasource", "node", "namespace", "pod", "plane"}
PROMTOOL = shutil.which("promtool")


@pytest.fixture(scope="module")
def boards() -> dict[str, dict]:
    return {name: json.loads(text) for name, text in generate.rendered().items()}


def walk(node, path=()):
    """(path, key, value) for every key of every dict in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, path + (key,))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from walk(item, path + (i,))


# ---------------------------------------------------------------- generation

def test_committed_json_equals_a_fresh_generation():
    assert generate.stale_files(generate.rendered()) == [], \
        "stale: run python3 -m dashboards.generate"


def test_generation_is_deterministic():
    assert generate.rendered() == generate.rendered()


def test_stale_files_notices_an_edit_and_an_orphan(tmp_path):
    outputs = generate.rendered()
    for name, text in outputs.items():
        (tmp_path / name).write_text(text)
    assert generate.stale_files(outputs, tmp_path) == []
    first = sorted(outputs)[0]
    (tmp_path / first).write_text(outputs[first].replace('"planewatch"', '"edited"', 1))
    (tmp_path / "old.json").write_text("{}")
    assert generate.stale_files(outputs, tmp_path) == sorted([first, "old.json"])


def test_one_json_per_source_with_unique_uids(boards):
    assert sorted(boards) == sorted(p.name.removesuffix(".dashboard.py") + ".json"
                                    for p in generate.dashboard_sources())
    assert {"planes.json", "pod.json", "sriov.json", "routing.json"} <= set(boards)
    uids = [b["uid"] for b in boards.values()]
    assert len(set(uids)) == len(uids) and all(u.startswith("planewatch-") for u in uids)


def test_panel_ids_are_stable_and_panels_do_not_overlap(boards):
    for name, board in boards.items():
        panels = board["panels"]
        assert [p["id"] for p in panels] == list(range(1, len(panels) + 1)), name
        cells = set()
        for p in panels:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (name, p["title"])
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not area & cells, (name, p["title"])
            cells |= area


def test_every_panel_has_a_query_with_a_ref_id(boards):
    for name, board in boards.items():
        for panel in board["panels"]:
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(set(refs)) == len(refs) and all(refs), (name, panel["title"])


# ---------------------------------------------------------------- variables and data source

def test_every_dashboard_defines_the_five_variables(boards):
    for name, board in boards.items():
        assert {v["name"] for v in board["templating"]["list"]} == VARIABLES, name


def test_every_variable_used_is_defined(boards):
    for name, board in boards.items():
        defined = {v["name"] for v in board["templating"]["list"]}
        for q in generate.queries_of(board):
            assert generate.variables_used(q.expr) <= defined, (name, q.panel, q.expr)


def test_datasource_is_never_a_bare_string(boards):
    for name, board in boards.items():
        sources = [(path, value) for path, key, value in walk(board) if key == "datasource"]
        assert sources, name
        for path, value in sources:
            assert not isinstance(value, str), (name, path, value)
        for panel in board["panels"]:
            assert panel["datasource"] == generate.DATASOURCE, (name, panel["title"])
            assert all(t["datasource"] == generate.DATASOURCE for t in panel["targets"])
        for variable in board["templating"]["list"]:
            # the datasource variable has none (the schema has no null: the key is left out)
            expected = None if variable["type"] == "datasource" else generate.DATASOURCE
            assert variable.get("datasource") == expected, (name, variable["name"])


def test_the_datasource_variable_lists_prometheus_sources(boards):
    for board in boards.values():
        (ds,) = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
        assert (ds["type"], ds["query"]) == ("datasource", "prometheus")


# ---------------------------------------------------------------- queries

@pytest.mark.parametrize("expr, values, expected", [
    ('label_values(planewatch_build_info, node)', None, "count by (node) (planewatch_build_info)"),
    ('label_values(m{node=~"$node"}, pod)', {"node": "n1"}, 'count by (pod) (m{node=~"n1"})'),
    ('rate(m{pod=~"$pod"}[$__rate_interval])', None, 'rate(m{pod=~".*"}[5m])'),
    ('rate(m{pod=~"${pod}"}[${__interval}])', {"pod": "a"}, 'rate(m{pod=~"a"}[5m])'),
    ('label_replace(m, "x", "$1", "y", "(.*)")', None, 'label_replace(m, "x", "$1", "y", "(.*)")'),
])
def test_to_promql(expr, values, expected):
    assert generate.to_promql(expr, values) == expected


def test_variables_used_ignores_grafana_builtins_and_regex_groups():
    assert generate.variables_used('rate(m{a=~"$pod", b="${plane}", c="$1"}[$__rate_interval])') == {"pod", "plane"}


def test_all_queries_covers_targets_and_templates(boards):
    queries = generate.all_queries()
    targets = sum(len(p["targets"]) for b in boards.values() for p in b["panels"])
    templates = sum(v["type"] == "query" for b in boards.values() for v in b["templating"]["list"])
    assert len(queries) == targets + templates
    assert {q.kind for q in queries} == {"target", "template"}


@pytest.mark.skipif(PROMTOOL is None, reason="needs Debian's promtool")
def test_every_query_parses_with_promtool(tmp_path):
    queries = generate.all_queries()
    rules = [{"record": f"dashboard:query_{i}:check", "expr": generate.to_promql(q.expr)}
             for i, q in enumerate(queries)]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_recorded_series_used_by_dashboards_are_recorded():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    used = {name for q in generate.all_queries()
            for name in re.findall(r"\b[a-z_]+:planewatch_[a-z0-9_]+:[a-z0-9_]+\b", q.expr)}
    assert used and used <= recorded, sorted(used - recorded)


# ---------------------------------------------------------------- live Prometheus

def _synthetic_exposition(step: int) -> str:
    """A planewatch /metrics with every family the dashboards read; counters grow
    with `step` so rates are non-zero."""
    lines = []

    def add(name, labels, value):
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {value}")

    interfaces = [
        ("telco", "upf-a", "k8s-pod-network", "eth0", "management", "", ""),
        ("telco", "upf-a", "telco/signaling", "net1", "signaling", "", ""),
        ("telco", "upf-a", "telco/data", "net2", "data", "pci", "0000:3b:02.3"),
        ("telco", "smf-b", "k8s-pod-network", "eth0", "management", "", ""),
        ("telco", "smf-b", "telco/signaling", "net1", "signaling", "", ""),
    ]
    for i, (ns, pod, network, ifname, plane, dtype, pci) in enumerate(interfaces):
        ident = {"namespace": ns, "pod": pod, "network": network, "interface": ifname, "plane": plane}
        for d in ("receive", "transmit"):
            add(f"planewatch_interface_{d}_packets_total", ident, 1000 * step)
            add(f"planewatch_interface_{d}_bytes_total", ident, 1_000_000 * step)
            add(f"planewatch_interface_{d}_drops_total", ident, 3 * step)
            add(f"planewatch_interface_{d}_errors_total", ident, step)
            add(f"planewatch_ebpf_interface_{d}_packets_total", ident, 1000 * step)
            add(f"planewatch_ebpf_interface_{d}_bytes_total", ident, 1_000_000 * step)
        add("planewatch_packet_drops_total", {**ident, "reason": "NO_SOCKET"}, 2 * step)
        add("planewatch_packet_drops_total", {**ident, "reason": "IP_RPFILTER"}, step)
        add("planewatch_interface_up", ident, 1)
        add("planewatch_interface_mtu_bytes", ident, 1500)
        add("planewatch_interface_rp_filter", ident, 1 if ifname == "eth0" else 2)
        add("planewatch_pod_interface_info", {**ident, "mac": f"02:00:00:00:00:0{i}", "ips": f"10.0.{i}.1",
                                              "device_type": dtype, "pci_address": pci}, 1)
        add("planewatch_pod_ip_info", {k: ident[k] for k in ("namespace", "pod", "network", "interface")}
            | {"ip": f"10.0.{i}.1"}, 1)
        gateway = {**ident, "gateway": f"10.0.{i}.254"}
        current = "failed" if plane == "signaling" else "reachable"
        for state in ("none", "incomplete", "reachable", "stale", "delay", "probe", "failed", "noarp",
                      "permanent"):
            add("planewatch_gateway_neighbour_state", {**gateway, "state": state}, int(state == current))
        if plane == "management":       # probed: 10 probes a step, one lost, RTTs of 80 us .. 400 us
            add("planewatch_gateway_probes_total", gateway, 10 * step)
            add("planewatch_gateway_probe_failures_total", gateway, step)
            for le, n in (("5e-05", 0), ("0.0001", 4), ("0.00025", 7), ("0.0005", 9), ("+Inf", 9)):
                add("planewatch_gateway_probe_rtt_seconds_bucket", {**gateway, "le": le}, n * step)
            add("planewatch_gateway_probe_rtt_seconds_sum", gateway, 0.0018 * step)
            add("planewatch_gateway_probe_rtt_seconds_count", gateway, 9 * step)
    vf = {"namespace": "telco", "pod": "upf-a", "network": "telco/data", "interface": "net2", "plane": "data"}
    add("planewatch_vf_info", {**vf, "pf": "ens1f0", "vf": "3", "pci_address": "0000:3b:02.3",
                               "driver": "iavf", "numa_node": "0", "reader": "netlink"}, 1)
    for d in ("receive", "transmit"):
        add(f"planewatch_vf_{d}_packets_total", vf, 2000 * step)
        add(f"planewatch_vf_{d}_bytes_total", vf, 2_000_000 * step)
        add(f"planewatch_vf_{d}_drops_total", vf, 5 * step)
    add("planewatch_vf_receive_broadcast_packets_total", vf, step)
    add("planewatch_vf_receive_multicast_packets_total", vf, step)
    add("planewatch_vf_transmit_errors_total", vf, step)
    add("planewatch_vf_transmit_spoofed_packets_total", vf, step)
    add("planewatch_vf_config_info", {**vf, "mac": "02:00:00:00:00:03", "vlan": "300", "qos": "0",
                                      "vlan_protocol": "802.1Q", "spoof_check": "on", "trust": "off",
                                      "link_state": "auto"}, 1)
    add("planewatch_vf_read_errors_total", {**vf, "pf": "ens1f0", "vf": "3", "file": "stats/tx_spoofed",
                                            "reason": "EINVAL"}, step)
    add("planewatch_vf_attachment_refused", {**vf, "pod": "evil-c", "field": "pci-address",
                                             "reason": "invalid_format"}, 1)
    for ident in ({**vf, "interface": "net2"}, {**vf, "network": "telco/signaling", "interface": "net1",
                                                 "plane": "signaling"}):
        add("planewatch_interface_carrier_changes_total", ident, step // 10)
    ib = {"namespace": "telco", "pod": "upf-a", "network": "telco/storage", "interface": "net3",
          "plane": "storage", "port": "1"}
    add("planewatch_rdma_port_info", {**ib, "device": "mlx5_3", "pci_address": "0000:5e:00.3",
                                      "link_layer": "InfiniBand"}, 1)
    add("planewatch_rdma_port_state_id", ib, 4)
    for d in ("receive", "transmit"):
        add(f"planewatch_rdma_port_{d}_bytes_total", ib, 4_000_000 * step)
    add("planewatch_rdma_port_symbol_errors_total", ib, step)
    add("planewatch_rdma_port_link_downed_total", ib, step // 30)
    add("planewatch_rdma_port_hw_events_total", {**ib, "stat": "out_of_sequence"}, 3 * step)
    add("planewatch_rdma_port_hw_events_total", {**ib, "stat": "roce_adp_retrans"}, step)
    add("planewatch_rdma_read_errors_total", {**ib, "device": "mlx5_3", "file": "counters/port_xmit_wait",
                                              "reason": "EOPNOTSUPP"}, step)
    sig = {"namespace": "telco", "pod": "upf-a", "network": "telco/signaling", "interface": "net1",
           "plane": "signaling"}
    add("planewatch_asymmetric_packets_total", {**sig, "ingress_interface": "net1", "egress_interface": "eth0"},
        10 * step)
    add("planewatch_route_mismatch", {**sig, "destination": "10.71.0.1", "egress_interface": "eth0"}, 1)
    for network, kind, ipam, plane in [("telco/signaling", "macvlan", "whereabouts", "signaling"),
                                       ("telco/data", "sriov", "static", "data")]:
        add("planewatch_network_info", {"network": network, "type": kind, "master": "", "ipam": ipam,
                                        "plane": plane}, 1)
    add("planewatch_build_info", {"version": "0.0.0"}, 1)
    add("planewatch_ebpf_up", {}, 1)
    add("planewatch_scrape_collector_success", {"collector": "netlink"}, 1)
    return "\n".join(lines).replace("{}", "") + "\n"


class _Exposition(BaseHTTPRequestHandler):
    step = 0

    def do_GET(self):
        type(self).step += 1
        body = _synthetic_exposition(type(self).step).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def live_prometheus(tmp_path_factory):
    """Prometheus on 127.0.0.1 scraping the synthetic exposition every second with
    the project's rules, a relabelled `node` label as the ServiceMonitor adds."""
    if prom.PROMETHEUS is None:
        pytest.skip("needs Debian's prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Exposition)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = prom.config([f"127.0.0.1:{server.server_address[1]}"], [RULES])
        with prom.Prometheus(workdir, config) as prometheus:
            prometheus.wait_for("namespace_pod_network_plane:planewatch_vf_drops:ratio_rate5m")
            # rule groups evaluate at their own offsets: the reachability group's rates too
            prometheus.wait_for("namespace_pod_network_plane:planewatch_gateway_probe_loss:ratio_rate5m")
            prometheus.data_since = datetime.now(timezone.utc)   # read by the rule-evaluation test
            yield prometheus
    finally:
        server.shutdown()


@pytest.mark.prometheus
def test_every_dashboard_query_returns_data_from_a_live_prometheus(live_prometheus):
    empty = []
    for q in generate.all_queries():
        if not live_prometheus.query(generate.to_promql(q.expr)):
            empty.append(f"{q.dashboard} / {q.panel}: {q.expr}")
    assert empty == []


@pytest.mark.prometheus
def test_every_rule_evaluates_without_error_on_the_same_data(live_prometheus):
    # Runtime errors (many-to-many matching, duplicate series) pass promtool check.
    def evaluated_since_the_data():
        groups = live_prometheus.api("/api/v1/rules")["data"]["groups"]
        # lastEvaluation: Go's RFC 3339 (nanoseconds; year 1 before the first)
        done = all(datetime.fromisoformat(g["lastEvaluation"]) > live_prometheus.data_since for g in groups)
        return groups if done else None
    groups = live_prometheus.wait_for(evaluated_since_the_data, interval=0.1,
                                      what="an evaluation of every group after the first data")
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
