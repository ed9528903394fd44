"""Pod UID → netns through /proc/<pid>/cgroup, on fixture procfs trees laid out
as cgroup v1/v2 with the cgroupfs and systemd drivers write them."""
from __future__ import annotations

import os
import shutil

import pytest

from collector.cgroups import pod_uid_from_cgroup, scan_pod_netns

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "procfs")

CASES = {
    "100": "5f1d3a2e-8c4b-4e57-9a61-0d2b7c9e4f10",    # v1, cgroupfs driver, burstable
    "200": "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9",    # v1, systemd driver, besteffort
    "300": "c0ffee00-1234-4abc-9def-001122334455",    # v2, systemd driver, CRI-O
    "400": "aabbccdd-eeff-4011-8233-445566778899",    # v2, cgroupfs driver
    "600": "11111111-2222-4333-8444-555555555555",    # v2, systemd, guaranteed QoS (no QoS slice)
    "800": "22222222-3333-4444-8555-666666666666",    # v2 read from inside a cgroup namespace
    "500": "",                                        # containerd itself: no pod
    "1": "",                                          # init
}


@pytest.mark.parametrize("pid,uid", sorted(CASES.items()))
def test_pod_uid_from_cgroup_fixture(pid, uid):
    with open(os.path.join(FIXTURE, pid, "cgroup")) as f:
        assert pod_uid_from_cgroup(f.read()) == uid


@pytest.mark.parametrize("text", [
    "", "garbage", "0::/", "0::/kubepods/podnot-a-uid/x",
    "0::/user.slice/pod5f1d3a2e-8c4b-4e57-9a61-0d2b7c9e4f10",      # not under kubepods
])
def test_pod_uid_from_cgroup_rejects(text):
    assert pod_uid_from_cgroup(text) == ""


def test_scan_maps_uids_to_ns_paths(tmp_path):
    root = tmp_path / "proc"
    shutil.copytree(FIXTURE, root)
    (root / "self").mkdir()                 # non-numeric entries are ignored
    (root / "700").mkdir()                  # a process that vanished: no cgroup file
    want = {CASES["100"], CASES["300"], "99999999-0000-4000-8000-000000000000"}
    found = scan_pod_netns(str(root), want)
    assert found == {CASES["100"]: str(root / "100" / "ns" / "net"),
                     CASES["300"]: str(root / "300" / "ns" / "net")}
    assert scan_pod_netns(str(root), set()) == {}
    assert scan_pod_netns(str(tmp_path / "missing"), want) == {}
