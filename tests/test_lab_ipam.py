"""Issue 9 on the lab: an IP conflict two lab pods really have, and the lab's
small Whereabouts pool read by `planewatch cluster --pods-file`."""
from __future__ import annotations

import subprocess

import pytest

from lab import topology
from lab.objects import NODE_NAME, write_pods_file
from tests.conftest import CLUSTER, Collector, parse_metrics, series, unique_prefix, wait_for

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def conflict_lab(tmp_path_factory):
    import os
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    prefix = unique_prefix("pwip")
    topology.down(prefix)
    state = topology.up(prefix, topology.with_ip_conflict(topology.demo_pods()))
    try:
        path = str(tmp_path_factory.mktemp("ipam") / "pods.json")
        write_pods_file(state, path)
        yield state, path
    finally:
        topology.down(prefix)


def test_conflicting_ip_is_visible_as_two_pods(conflict_lab):
    state, path = conflict_lab
    # the kernel really has it twice
    a = subprocess.run(["ip", "-n", state.pod_ns["telco/upf-a"], "-br", "addr", "show", "net1"],
                       capture_output=True, text=True).stdout
    d = subprocess.run(["ip", "-n", state.pod_ns["telco/smf-d"], "-br", "addr", "show", "net1"],
                       capture_output=True, text=True).stdout
    assert "10.71.0.10/16" in a and "10.71.0.10/16" in d
    c = Collector("--pods-file", path, "--node-name", NODE_NAME, "--no-collector.ebpf")
    try:
        c.wait_ready()
        parsed = parse_metrics(c.metrics())
    finally:
        c.stop()
    holders = series(parsed, "planewatch_pod_ip_info", network="telco/signaling", ip="10.71.0.10")
    assert {dict(l)["pod"] for l in holders} == {"upf-a", "smf-d"}
    others = series(parsed, "planewatch_pod_ip_info", network="telco/signaling", ip="10.71.0.11")
    assert {dict(l)["pod"] for l in others} == {"upf-b"}


def test_cluster_mode_reads_the_labs_whereabouts_pool(conflict_lab):
    _, path = conflict_lab
    c = Collector("--pods-file", path, command=CLUSTER)
    try:
        wait_for(c.answering, timeout=30, what="cluster mode to answer")
        parsed = wait_for(lambda: c.get("/readyz")[0] == 200 and parse_metrics(c.metrics()),
                          what="cluster mode /metrics")
    finally:
        c.stop()
    pool = dict(pool="kube-system/10.71.0.0-26", range="10.71.0.0/26", network="telco/signaling")
    # /26: 62 usable; upf-a and upf-b hold .10 and .11 (smf-d's copy of .10 got no allocation
    # of its own: that is the conflict), plus .60 held for a pod deleted long ago
    assert list(series(parsed, "planewatch_ippool_size", **pool).values()) == [62]
    assert list(series(parsed, "planewatch_ippool_allocated", **pool).values()) == [3]
    assert list(series(parsed, "planewatch_ippool_free", **pool).values()) == [59]
    assert list(series(parsed, "planewatch_ippool_leaked", **pool).values()) == [1]
