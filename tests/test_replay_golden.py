"""The golden /metrics without root: the kernel's answers recorded once on the
golden lab (tests/replay.py) fed back through the real decoders.

Two expectations, neither produced by the replay:
- tests/fixtures/recorded/metrics.prom, the /metrics the collector served live,
  as root, from the very answers recorded (values included, scrape durations
  dropped): the replay must reproduce it byte for byte;
- tests/golden/metrics.prom, the root golden: after the same normalisation, the
  replay lists the same series. When the root golden changes on purpose,
  record again (`sudo .venv/bin/python -m tests.replay`, see tests/replay.py).
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import parse_metrics, series
from tests.replay import KERNEL, METRICS, Replay, without_durations
from tests.test_golden import GOLDEN, normalise


@pytest.fixture
def replay(tmp_path):
    from lab.sriov_fixture import write_sriov_fixture
    sysfs, netns, procfs = tmp_path / "sysfs", tmp_path / "netns", tmp_path / "proc"
    netns.mkdir()
    procfs.mkdir()
    write_sriov_fixture(str(sysfs))
    r = Replay(str(sysfs), str(netns), str(procfs))
    yield r
    r.close()


def test_replay_reproduces_the_recorded_scrape(replay):
    got = without_durations(replay.scrape())
    with open(METRICS) as f:
        want = f.read()
    assert got == want, "replayed /metrics differs from the one served live when recording"


def test_replay_lists_the_root_golden(replay):
    with open(KERNEL) as f:
        prefix = json.load(f)["prefix"]
    with open(GOLDEN) as f:
        want = f.read()
    assert normalise(replay.scrape(), prefix) == want, (
        "replayed /metrics no longer matches tests/golden/metrics.prom: if the golden changed on "
        "purpose, record again (sudo .venv/bin/python -m tests.replay)")


def test_every_source_succeeds_on_the_recording(replay):
    """A replay that ran out of recorded answers would show as a failed source."""
    parsed = parse_metrics(replay.scrape())
    success = {dict(lbl)["collector"]: v for lbl, v in
               series(parsed, "planewatch_scrape_collector_success").items()}
    assert set(success) >= {"discovery", "attachments", "netlink", "neighbours", "routes", "sriov", "ebpf"}
    assert all(v == 1 for v in success.values()), success


def test_recorded_values_reach_metrics(replay):
    """Not all zeros: the recording holds traffic, and it comes through the decoders."""
    parsed = parse_metrics(replay.scrape())
    for name in ("planewatch_interface_receive_packets_total", "planewatch_ebpf_interface_receive_packets_total",
                 "planewatch_interface_transmit_bytes_total"):
        assert any(v > 0 for v in series(parsed, name).values()), name
