"""The golden /metrics: the collector on the lab (fixed prefix, no traffic) plus
fixture objects and trees, normalised, diffed against tests/golden/metrics.prom.
Needs root (marked `root`): the root-free tier checks the same file from recorded
kernel answers (tests/test_replay_golden.py).

`pytest tests/test_golden.py --update-golden` rewrites the file; review the diff:
the golden file is the list of every metric planewatch exposes.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from lab import topology
from lab.objects import NODE_NAME, lab_objects
from tests.conftest import Collector, parse_metrics, series, unique_prefix, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden", "metrics.prom")
EXTRA = os.path.join(HERE, "fixtures", "golden", "extra-objects.yaml")
# Kernel objects get a per-run prefix so two runs on one machine never take each
# other's lab down; the only thing the prefix shows on /metrics is the two MAC bytes
# it hashes to, which normalise() writes as the fixed prefix's.
PREFIX = unique_prefix("pwg")
GOLDEN_PREFIX = "pwgold"

HEADER = ("# Golden /metrics of planewatch on the lab (tests/test_golden.py).\n"
          "# Normalised: values of kernel traffic (and flow, carrier-change) counters are zeroed,\n"
          "# scrape durations and the (traffic-dependent) drop-reason and asymmetric-flow series\n"
          "# and neighbour ages are removed; the BPF attach mode, the kernel's choice (tcx from\n"
          "# Linux 6.6, else clsact), is written tcx|clsact.\n")
DROP_SERIES = re.compile(r"^planewatch_(scrape_collector_duration_seconds|packet_drops_total|"
                         r"asymmetric_packets_total|gateway_neighbour_[a-z]+_age_seconds)\{")
ATTACH_MODE = re.compile(r'^(planewatch_ebpf_info\{.*attach_mode=)"(tcx|clsact)"')
# carrier changes depend on the order the lab brought its links up in
ZERO_VALUE = re.compile(r"^(planewatch_((interface|ebpf_interface)_(receive|transmit)_[a-z]+|ebpf_flows_[a-z]+"
                        r"|interface_carrier_changes)_total\{.*\}) \S+$")


def _mac_stem(prefix: str) -> str:
    return topology.mac_address(prefix, 0, 0)[:9]       # "02:hh:hh:"


def normalise(text: str, prefix: str = GOLDEN_PREFIX) -> str:
    run_stem, golden_stem = _mac_stem(prefix), _mac_stem(GOLDEN_PREFIX)
    out = []
    for line in text.splitlines():
        if DROP_SERIES.match(line):
            continue
        line = ATTACH_MODE.sub(r'\1"tcx|clsact"', line)
        out.append(ZERO_VALUE.sub(r"\1 0", line).replace(f'"{run_stem}', f'"{golden_stem}'))
    return HEADER + "\n".join(out) + "\n"


def golden_args(tmp_path) -> list[str]:
    """The SR-IOV VFs of the lab's DPDK pod live in a fixture sysfs tree."""
    from lab.sriov_fixture import write_sriov_fixture
    sysfs = str(tmp_path / "sysfs")
    write_sriov_fixture(sysfs)
    return ["--node-name", NODE_NAME, "--path.sysfs", sysfs]


@pytest.fixture
def golden_lab(root, tmp_path):
    topology.down(PREFIX)
    state = topology.up(PREFIX, topology.demo_pods() + topology.sriov_pods())
    try:
        with open(EXTRA) as f:
            extra = [d for d in yaml.safe_load_all(f) if d]
        path = tmp_path / "pods.yaml"
        path.write_text(yaml.safe_dump_all(lab_objects(state) + extra))
        yield state, str(path)
    finally:
        topology.down(PREFIX)


def test_golden_metrics(golden_lab, tmp_path, update_golden):
    _, pods_file = golden_lab
    c = Collector("--pods-file", pods_file, *golden_args(tmp_path))
    try:
        c.wait_ready()

        def all_attached() -> str:
            """BPF attaches in the background: wait until every interface is hooked."""
            text = c.metrics()
            parsed = parse_metrics(text)
            hooked = series(parsed, "planewatch_ebpf_attached_interfaces")
            up = series(parsed, "planewatch_interface_up")
            return text if up and list(hooked.values()) == [len(up)] else ""
        got = normalise(wait_for(all_attached, timeout=60, what="BPF on every lab interface"), PREFIX)
    finally:
        c.stop()
    if update_golden or not os.path.exists(GOLDEN):
        with open(GOLDEN, "w") as f:
            f.write(got)
        if not update_golden:
            pytest.fail(f"{GOLDEN} did not exist: written, review and commit it")
    with open(GOLDEN) as f:
        want = f.read()
    assert got == want, "golden /metrics differs: run pytest tests/test_golden.py --update-golden and review"


def test_golden_metrics_do_not_depend_on_the_attach_mode(golden_lab, tmp_path):
    """Kernels before 6.6 get clsact instead of TCX: the same golden, in-process
    (--collector.ebpf.attach-mode clsact)."""
    from tests.replay import build
    _, pods_file = golden_lab
    server, feeds = build(["--pods-file", pods_file, *golden_args(tmp_path), "--collector.ebpf.attach-mode", "clsact"])
    scraper = server.scraper
    try:
        scraper.reconcile()             # attaches every interface, as the server's thread does
        text = scraper.scrape().decode()
    finally:
        scraper.close()
    assert 'attach_mode="clsact"' in text
    with open(GOLDEN) as f:
        assert normalise(text, PREFIX) == f.read()


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian prometheus) not installed")
def test_golden_file_passes_promtool():
    with open(GOLDEN, "rb") as f:
        res = subprocess.run(["promtool", "check", "metrics"], stdin=f, capture_output=True)
    assert res.returncode == 0, res.stdout + res.stderr
