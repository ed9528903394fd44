"""Pods resolved to their network namespaces: netns dir by MAC and by IP, the
cgroup path through a procfs tree, and namespaces that go away."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from collector.model import Attachment, Pod
from collector.netns import RETRY_UNRESOLVED, Resolver
from tests.conftest import unique_prefix


def sh(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def namespaces(root):
    """Three pod-like namespaces: eth0 + net1 each, with known MACs and IPs."""
    p = unique_prefix("pwns")
    made = []
    try:
        for i in range(3):
            ns = f"{p}-{i}"
            sh("ip", "netns", "add", ns)
            made.append(ns)
            for j, ifname in enumerate(("eth0", "net1")):
                sh("ip", "-n", ns, "link", "add", ifname, "address", f"02:00:00:00:{i:02x}:{j:02x}",
                   "type", "veth", "peer", "name", f"peer{j}")
                sh("ip", "-n", ns, "addr", "add", f"10.253.{j}.{10 + i}/24", "dev", ifname)
                sh("ip", "-n", ns, "link", "set", ifname, "up")
        yield made
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def pod(i: int, *, with_mac=True, with_ip=True, default_has_interface=True) -> Pod:
    uid = f"00000000-0000-4000-8000-{i:012d}"
    atts = (
        Attachment("ns", f"pod{i}", uid, "k8s-pod-network", "eth0" if default_has_interface else "",
                   default=True, mac=f"02:00:00:00:{i:02x}:00" if with_mac else "",
                   ips=(f"10.253.0.{10 + i}/24",) if with_ip else ()),
        Attachment("ns", f"pod{i}", uid, "ns/sig", "net1", mac=f"02:00:00:00:{i:02x}:01" if with_mac else "",
                   ips=(f"10.253.1.{10 + i}",) if with_ip else ()),
    )
    return Pod("ns", f"pod{i}", uid, attachments=atts)


def test_resolve_by_mac_ip_and_missing_interface_name(namespaces):
    r = Resolver("/run/netns", "/nonexistent-procfs")
    try:
        views = r.resolve([pod(0), pod(1, with_mac=False), pod(2, default_has_interface=False),
                           pod(9)])
        by = {v.pod.name: v for v in views}
        assert by["pod0"].netns_path == f"/run/netns/{namespaces[0]}"
        assert by["pod0"].resolved_by == "netns-dir:mac"
        assert by["pod1"].netns_path == f"/run/netns/{namespaces[1]}"
        assert by["pod1"].resolved_by == "netns-dir:ip"
        # the default entry had no `interface`: found by MAC, named from the kernel
        assert [iv.interface for iv in by["pod2"].interfaces] == ["eth0", "net1"]
        assert all(iv.link is not None for v in views[:3] for iv in v.interfaces)
        assert by["pod9"].netns_inode == 0 and all(iv.link is None for iv in by["pod9"].interfaces)
        assert by["pod0"].netns_inode == os.stat(f"/run/netns/{namespaces[0]}").st_ino
        # ifindex comes from the namespace itself
        links = json.loads(sh("ip", "-n", namespaces[0], "-j", "link", "show", "net1"))
        assert by["pod0"].interfaces[1].link.ifindex == links[0]["ifindex"]
        assert len(r.pool) == 3
    finally:
        r.close()


def test_namespace_gone_drops_the_resolution(namespaces):
    r = Resolver("/run/netns", "/nonexistent-procfs")
    try:
        assert r.resolve([pod(0)])[0].netns_inode
        subprocess.run(["ip", "netns", "del", namespaces[0]], check=True)
        view = r.resolve([pod(0)])[0]
        assert view.netns_inode == 0 and len(r.pool) == 0
    finally:
        r.close()


def test_unresolved_pods_are_retried_at_a_bounded_rate(namespaces):
    now = [1000.0]
    r = Resolver("/run/netns", "/nonexistent-procfs", clock=lambda: now[0])
    stranger = pod(7)      # MACs/IPs that exist nowhere
    try:
        calls = []
        original = r._find
        r._find = lambda todo, pinned, t: (calls.append([p.name for p in todo]), original(todo, pinned, t))
        r.resolve([stranger])
        r.resolve([stranger])
        now[0] += RETRY_UNRESOLVED + 0.1
        r.resolve([stranger])
        assert calls == [["pod7"], ["pod7"]]
    finally:
        r.close()


def test_cgroup_path_resolves_unpinned_namespace(namespaces, tmp_path):
    """Runtime that pins nothing: a process of the pod, found by its cgroup, gives the netns."""
    procfs = tmp_path / "proc"
    uid = "00000000-0000-4000-8000-000000000001"
    (procfs / "4242" / "ns").mkdir(parents=True)
    (procfs / "4242" / "cgroup").write_text(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"{uid.replace('-', '_')}.slice/cri-containerd-0123.scope\n")
    os.symlink(f"/run/netns/{namespaces[1]}", procfs / "4242" / "ns" / "net")
    (procfs / "1").mkdir()
    (procfs / "1" / "cgroup").write_text("0::/init.scope\n")
    empty_netns_dir = tmp_path / "netns"
    empty_netns_dir.mkdir()
    # no MAC, no IP in the annotation: only the cgroup path can find it
    r = Resolver(str(empty_netns_dir), str(procfs))
    try:
        view = r.resolve([pod(1, with_mac=False, with_ip=False)])[0]
        assert view.resolved_by == "cgroup"
        assert view.netns_inode == os.stat(f"/run/netns/{namespaces[1]}").st_ino
        assert [iv.link.name for iv in view.interfaces] == ["eth0", "net1"]
    finally:
        r.close()


def test_mac_wins_over_an_ip_seen_elsewhere_and_ambiguity_resolves_nothing(namespaces):
    """Two isolated networks reuse 10.253.0.10: the MAC decides; without a MAC the
    pod matches two namespaces and stays unresolved rather than mislabelled."""
    sh("ip", "-n", namespaces[2], "addr", "add", "10.253.0.10/24", "dev", "eth0")   # pod0's IP, again
    r = Resolver("/run/netns", "/nonexistent-procfs")
    try:
        v = r.resolve([pod(0)])[0]
        assert (v.netns_path, v.resolved_by) == (f"/run/netns/{namespaces[0]}", "netns-dir:mac")
    finally:
        r.close()
    r = Resolver("/run/netns", "/nonexistent-procfs")
    try:
        ip_only = pod(0, with_mac=False)
        ip_only = Pod(ip_only.namespace, ip_only.name, ip_only.uid, attachments=ip_only.attachments[:1])
        assert r.resolve([ip_only])[0].netns_inode == 0
    finally:
        r.close()


def test_netns_dir_match_is_confirmed_by_cgroup_once_the_pod_has_a_process(namespaces, tmp_path):
    """containerd writes network-status (CNI ADD) before the pod's first process
    starts: found by MAC first, the exact cgroup path takes over once it can."""
    now = [1000.0]
    procfs = tmp_path / "proc"
    (procfs / "1").mkdir(parents=True)
    (procfs / "1" / "cgroup").write_text("0::/init.scope\n")
    r = Resolver("/run/netns", str(procfs), clock=lambda: now[0])
    p = pod(2)
    try:
        view = r.resolve([p])[0]
        assert view.resolved_by == "netns-dir:mac"
        # the pause process starts; the next check is after RETRY_UNRESOLVED, not per scrape
        (procfs / "4343" / "ns").mkdir(parents=True)
        (procfs / "4343" / "cgroup").write_text(
            f"4:memory:/kubepods/besteffort/pod{p.uid}/0123abcd\n0::/kubepods/besteffort/pod{p.uid}/0123abcd\n")
        os.symlink(f"/run/netns/{namespaces[2]}", procfs / "4343" / "ns" / "net")
        assert r.resolve([p])[0].resolved_by == "netns-dir:mac"
        now[0] += RETRY_UNRESOLVED + 0.1
        view = r.resolve([p])[0]
        assert view.resolved_by == "cgroup"
        assert view.netns_inode == os.stat(f"/run/netns/{namespaces[2]}").st_ino
        assert view.netns_path == f"/run/netns/{namespaces[2]}"      # the pinned path is kept
        assert [iv.link.name for iv in view.interfaces] == ["eth0", "net1"]
    finally:
        r.close()


def test_unconfirmable_netns_dir_match_is_checked_with_backoff(namespaces, tmp_path):
    now = [1000.0]
    procfs = tmp_path / "proc"
    procfs.mkdir()
    r = Resolver("/run/netns", str(procfs), clock=lambda: now[0])
    scans = []
    original = r._by_cgroup
    r._by_cgroup = lambda pods, *rest: (scans.append(rest[-1]), original(pods, *rest))[1]
    try:
        assert r.resolve([pod(0)])[0].resolved_by == "netns-dir:mac"
        first = len(scans)                      # _find's own lookup
        for _ in range(200):                    # one scrape a second for 200 s
            now[0] += 1.0
            assert r.resolve([pod(0)])[0].resolved_by == "netns-dir:mac"
        checks = [t - 1000.0 for t in scans[first:]]
        gaps = [b - a for a, b in zip(checks, checks[1:])]
        assert len(checks) <= 6 and gaps == sorted(gaps), checks   # 5, 10, 20, 40, 80 ... s apart
    finally:
        r.close()


def test_a_view_is_handed_out_again_until_something_in_it_changes(namespaces):
    """Sources keep per-view results (routes' attached interfaces) and recognise a
    view by identity: an unchanged pod must get the same object, a changed pod, a
    link change in its netns or a lost namespace a new one."""
    r = Resolver("/run/netns", "/nonexistent-procfs")
    try:
        p0, p1, stranger = pod(0), pod(1), pod(7)
        first = r.resolve([p0, p1, stranger])
        again = r.resolve([p0, p1, stranger])
        assert all(a is b for a, b in zip(first, again))
        # a new Pod object (the store saw a change): a new view
        p1b = pod(1)
        third = r.resolve([p0, p1b, stranger])
        assert third[0] is first[0] and third[1] is not first[1] and third[1].pod is p1b
        assert third[2] is first[2] and third[2].netns_inode == 0
        # a link change in pod0's netns, announced on its link-event socket:
        # the table is re-read, the interfaces matched again, a new view
        sh("ip", "-n", namespaces[0], "link", "set", "net1", "mtu", "1400")
        fourth = r.resolve([p0, p1b, stranger])
        assert fourth[0] is not third[0] and fourth[0].interfaces[1].link.mtu == 1400
        assert fourth[1] is third[1]
        subprocess.run(["ip", "netns", "del", namespaces[0]], check=True)
        fifth = r.resolve([p0, p1b, stranger])
        assert fifth[0].netns_inode == 0 and fifth[0] is not fourth[0]
    finally:
        r.close()


def test_pinned_dir_is_listed_again_only_when_it_changed(tmp_path, monkeypatch):
    """Root-free: plain files stand in for pins. A listing is reused while the
    directory is unchanged and settled; an added or removed name, a recent change
    (a mount over a new pin changes nothing the directory shows) and the TTL each
    make the next look list it again."""
    import collector.netns as netns_mod
    from collector.netns import PIN_SETTLE_NS, PIN_TTL, PinnedDir
    listings = []
    real = netns_mod.list_netns_dir
    monkeypatch.setattr(netns_mod, "list_netns_dir", lambda path: listings.append(path) or real(path))
    now, wall = [100.0], [0]
    pins = PinnedDir(str(tmp_path), clock=lambda: now[0], wall_ns=lambda: wall[0])
    (tmp_path / "a").write_text("")
    wall[0] = os.stat(tmp_path).st_mtime_ns + PIN_SETTLE_NS // 2         # changed a moment ago
    first = pins.list()
    assert set(first.values()) == {str(tmp_path / "a")} and len(listings) == 1
    assert pins.list() == first and len(listings) == 2                # not settled: listed again
    wall[0] += PIN_SETTLE_NS
    assert pins.list() == first and len(listings) == 3                # the first listing once settled
    assert pins.list() == first and len(listings) == 3                # settled and unchanged: reused
    (tmp_path / "b").write_text("")
    wall[0] = os.stat(tmp_path).st_mtime_ns + 2 * PIN_SETTLE_NS
    assert set(pins.list().values()) == {str(tmp_path / "a"), str(tmp_path / "b")} and len(listings) == 4
    (tmp_path / "a").unlink()
    wall[0] = os.stat(tmp_path).st_mtime_ns + 2 * PIN_SETTLE_NS
    assert set(pins.list().values()) == {str(tmp_path / "b")} and len(listings) == 5
    assert len(listings) == 5 and pins.list() and len(listings) == 5
    now[0] += PIN_TTL + 1
    pins.list()
    assert len(listings) == 6
    os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-gone"))
    assert pins.list() == {}
