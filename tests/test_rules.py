"""The Prometheus rules: promtool checks and unit tests, coverage of every alert by
firing and quiet test cases, the generated PrometheusRule, runbook anchors, and
metric names against the contract."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "deploy" / "rules"
SOURCE = RULES_DIR / "planewatch-rules.yaml"
GENERATED = RULES_DIR / "generated" / "prometheusrule.yaml"
UNIT_TESTS = sorted((RULES_DIR / "tests").glob("*.yaml"))
RUNBOOKS = REPO / "docs" / "runbooks.md"
GOLDEN = REPO / "tests" / "golden" / "metrics.prom"


def _load_rules_generator():
    """deploy/rules/generate.py, imported by path (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("planewatch_rules_generate", RULES_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rules_generate = _load_rules_generator()

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs Debian's promtool")

# DESIGN.md's metric contract plus the refinements of the issues. Names used by
# rules or dashboards must be here or in the golden /metrics file.
CONTRACT_METRICS = frozenset(
    [f"planewatch_interface_{d}_{k}_total" for d in ("receive", "transmit")
     for k in ("bytes", "packets", "errors", "drops")]
    + [f"planewatch_vf_{d}_{k}_total" for d in ("receive", "transmit")
       for k in ("bytes", "packets", "drops")]
    + [f"planewatch_ebpf_interface_{d}_{k}_total" for d in ("receive", "transmit")
       for k in ("bytes", "packets")]
    + [f"planewatch_ippool_{k}" for k in ("size", "allocated", "leaked")]
    + ["planewatch_interface_up", "planewatch_interface_mtu_bytes", "planewatch_pod_interface_info",
       "planewatch_vf_receive_broadcast_packets_total", "planewatch_vf_receive_multicast_packets_total",
       "planewatch_vf_transmit_errors_total", "planewatch_vf_transmit_spoofed_packets_total",
       "planewatch_vf_info", "planewatch_packet_drops_total", "planewatch_asymmetric_packets_total",
       "planewatch_route_mismatch", "planewatch_interface_rp_filter",
       "planewatch_pod_network_attachment_missing", "planewatch_network_info",
       "planewatch_pod_ip_info", "planewatch_ebpf_up", "planewatch_annotation_errors_total",
       "planewatch_scrape_collector_success", "planewatch_scrape_collector_duration_seconds",
       "planewatch_build_info",
       # issues 12/13/15: VF configuration, link flaps, RDMA ports, device read health
       "planewatch_interface_carrier_changes_total", "planewatch_vf_config_info",
       "planewatch_vf_min_transmit_rate_bytes_per_second", "planewatch_vf_max_transmit_rate_bytes_per_second",
       "planewatch_vf_read_errors_total", "planewatch_vf_attachment_refused",
       "planewatch_rdma_port_state_id", "planewatch_rdma_port_link_downed_total",
       "planewatch_rdma_port_receive_bytes_total", "planewatch_rdma_port_transmit_bytes_total",
       "planewatch_rdma_port_symbol_errors_total", "planewatch_rdma_port_hw_events_total",
       "planewatch_rdma_read_errors_total", "planewatch_rdma_attachment_refused"]
    # Only with the Kubernetes API feed, so not in the golden file (pods-file mode);
    # tests/test_hostile_kube.py reads them.
    + ["planewatch_kube_watch_restarts_total", "planewatch_kube_requests_total",
       "planewatch_kube_objects_trimmed_total"])

IDENTITY_LABELS = {"namespace", "pod", "network", "interface", "plane", "node"}


def source_groups() -> list[dict]:
    return yaml.safe_load(SOURCE.read_text())["groups"]


def rules_of(groups: list[dict], kind: str) -> list[dict]:
    return [r for g in groups for r in g["rules"] if kind in r]


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in rules_of(source_groups(), "alert")}


def unit_test_cases() -> list[tuple[str, dict]]:
    """(file name, alert_rule_test entry) for every alert case of every test file."""
    cases = []
    for path in UNIT_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            cases += [(path.name, case) for case in group.get("alert_rule_test", [])]
    return cases


def duration_seconds(text: str) -> int:
    """Prometheus duration (`90s`, `10m`, `1h30m`) in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)([smhd])", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def markdown_anchors(text: str) -> set[str]:
    """GitHub-style anchors of the `##` headings (lower case, spaces to dashes)."""
    return {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^##+ (.+)$", text, re.M)}


# ---------------------------------------------------------------- promtool

@needs_promtool
def test_source_passes_promtool_check():
    result = promtool("check", "rules", str(SOURCE))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_generated_groups_pass_promtool_check(tmp_path):
    spec = yaml.safe_load(GENERATED.read_text())["spec"]
    rule_file = tmp_path / "generated-groups.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": spec["groups"]}))
    result = promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
    count = len(rules_of(source_groups(), "record")) + len(alerts())
    assert f"{count} rules found" in result.stdout


@needs_promtool
@pytest.mark.parametrize("test_file", UNIT_TESTS, ids=[p.name for p in UNIT_TESTS])
def test_promtool_unit_tests_pass(test_file):
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_load_the_source_file():
    for path in UNIT_TESTS:
        files = yaml.safe_load(path.read_text())["rule_files"]
        assert [(path.parent / f).resolve() for f in files] == [SOURCE], path.name


# ---------------------------------------------------------------- coverage

def test_every_alert_has_a_firing_case_with_labels_and_annotations():
    fired = {}
    for _, case in unit_test_cases():
        for expected in case.get("exp_alerts") or []:
            if expected.get("exp_labels") and expected.get("exp_annotations"):
                fired.setdefault(case["alertname"], []).append(expected)
    assert sorted(set(alerts()) - set(fired)) == []


def test_every_alert_has_a_quiet_case_past_its_for_duration():
    # A quiet case before `for` has elapsed proves nothing: require one after it.
    quiet = {}
    for _, case in unit_test_cases():
        if not case.get("exp_alerts"):
            quiet.setdefault(case["alertname"], []).append(duration_seconds(case["eval_time"]))
    missing = [name for name, rule in alerts().items()
               if not any(t >= duration_seconds(rule.get("for", "0s")) for t in quiet.get(name, []))]
    assert missing == []


def test_test_cases_name_only_existing_alerts():
    names = set(alerts())
    assert sorted({c["alertname"] for _, c in unit_test_cases()} - names) == []


def test_annotation_labels_exist_on_the_firing_alerts():
    """`$labels.x` in a text must be a label of the alert, or it renders empty.
    Labels used inside `{{ with $labels.x }}` have a fallback and may be absent."""
    rules = alerts()
    for _, case in unit_test_cases():
        rule = rules[case["alertname"]]
        text = " ".join(rule["annotations"].values())
        optional = set(re.findall(r"with \$labels\.(\w+)", text))
        used = set(re.findall(r"\$labels\.(\w+)", text)) - optional
        for expected in case.get("exp_alerts") or []:
            missing = used - set(expected["exp_labels"])
            assert not missing, f"{case['alertname']}: {sorted(missing)} not among its labels"


# ---------------------------------------------------------------- rule shape

@pytest.mark.parametrize("name", sorted(alerts()))
def test_alert_has_severity_for_and_texts(name):
    rule = alerts()[name]
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert duration_seconds(rule["for"]) >= 60
    assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
    assert name.startswith("Planewatch")


def test_runbook_urls_point_at_existing_sections():
    anchors = markdown_anchors(RUNBOOKS.read_text())
    for name, rule in alerts().items():
        url = rule["annotations"]["runbook_url"]
        assert url.endswith("docs/runbooks.md#" + name.lower()), name
        assert name.lower() in anchors, f"docs/runbooks.md has no section for {name}"


def test_runbook_has_a_section_only_for_existing_alerts():
    headings = re.findall(r"^## (Planewatch\w+)\s*$", RUNBOOKS.read_text(), re.M)
    assert sorted(headings) == sorted(alerts())


def test_recording_rule_names_follow_level_metric_operations():
    for rule in rules_of(source_groups(), "record"):
        level, metric, operations = rule["record"].split(":")
        assert set(level.split("_")) <= IDENTITY_LABELS, rule["record"]
        assert metric.startswith("planewatch_") and not metric.endswith("_total"), rule["record"]
        assert re.fullmatch(r"[a-z0-9_]+", operations), rule["record"]


def test_every_ratio_guards_its_denominator():
    for rule in rules_of(source_groups(), "record"):
        if rule["record"].endswith(":ratio_rate5m"):
            assert re.search(r"/\s*\(.*>\s*0\s*\)\s*$", rule["expr"], re.S), rule["record"]


def test_recorded_series_referenced_by_rules_are_recorded():
    recorded = {r["record"] for r in rules_of(source_groups(), "record")}
    for rule in rules_of(source_groups(), "record") + list(alerts().values()):
        used = set(re.findall(r"\b[a-z_]+:planewatch_[a-z0-9_]+:[a-z0-9_]+\b", rule["expr"]))
        assert used <= recorded, sorted(used - recorded)


def contract_and_golden_metrics() -> set[str]:
    text = GOLDEN.read_text() if GOLDEN.exists() else ""
    golden = set(re.findall(r"^# TYPE (\w+)", text, re.M))
    # a histogram's series are <name>_bucket, _sum and _count
    golden |= {f"{name}_{part}" for name in re.findall(r"^# TYPE (\w+) histogram$", text, re.M)
               for part in ("bucket", "sum", "count")}
    return set(CONTRACT_METRICS) | golden


def raw_metric_names(expr: str) -> set[str]:
    """`planewatch_*` names in an expression that are not recording-rule names."""
    return {m for m in re.findall(r"(?<![:\w])planewatch_\w+(?!\w*:)", expr)}


def test_rules_and_dashboards_use_only_contract_metrics():
    from dashboards.generate import all_queries
    known = contract_and_golden_metrics()
    exprs = [r["expr"] for r in rules_of(source_groups(), "record") + list(alerts().values())]
    exprs += [q.expr for q in all_queries()]
    used = set().union(*(raw_metric_names(e) for e in exprs))
    assert sorted(used - known) == []
    assert len(used) > 20     # the regex does find names


# ---------------------------------------------------------------- generated file

def test_generated_file_equals_a_fresh_generation():
    assert GENERATED.read_text() == rules_generate.generate(), \
        "stale: run python3 deploy/rules/generate.py"


def test_generated_rule_wraps_the_source_groups_unchanged():
    document = yaml.safe_load(GENERATED.read_text())
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    assert document["kind"] == "PrometheusRule"
    assert document["metadata"]["labels"] == {"app.kubernetes.io/name": "planewatch"}
    assert document["spec"]["groups"] == source_groups()


def test_generation_is_deterministic_and_check_mode_agrees(tmp_path, monkeypatch):
    assert rules_generate.generate() == rules_generate.generate()
    assert rules_generate.main(["--check"]) == 0
    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text(GENERATED.read_text().replace("severity: critical", "severity: page", 1))
    monkeypatch.setattr(rules_generate, "OUTPUT", stale)
    assert rules_generate.main(["--check"]) == 1


def test_multiline_promql_stays_a_literal_block():
    text = rules_generate.render({"expr": "a\n  + b\n", "one": "x"})
    assert "expr: |\n  a\n    + b\n" in text
    assert yaml.safe_load(text) == {"expr": "a\n  + b\n", "one": "x"}
