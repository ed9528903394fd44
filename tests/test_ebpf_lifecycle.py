"""Nothing of ours stays in the kernel, and the source degrades instead of failing.

- TCX links go away when the process holding them is SIGKILLed, and with close();
- the clsact fallback counts too and close() removes its filters (and the qdisc
  only when it created it);
- missing objects, missing BTF, no capabilities and a verifier refusal give
  planewatch_ebpf_up 0 with the reason, logged once, without raising.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from collector.registry import Config, Snapshot
from collector.sources.ebpf import EbpfSource
from exporters.exposition import render
from kernel.nsenter import in_netns
from tests.test_ebpf import need_root_and_objects, sh

pytestmark = pytest.mark.ebpf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "ebpf", "build")

CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from ebpf.loader import Loader
loader = Loader()
loader.attach(sys.argv[2], int(sys.argv[3]))
print(json.dumps({k: sorted(v) for k, v in loader.kernel_ids().items()}), flush=True)
time.sleep(600)
"""

BAD_PROGRAM = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_LRU_HASH); __uint(max_entries, 16);
         __type(key, int); __type(value, int); } flows SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 16);
         __type(key, int); __type(value, int); } traffic_slots SEC(".maps");   /* both resized before load */
/* reads packet data without a bounds check: the verifier must refuse it */
SEC("tc") int tcx_ingress(struct __sk_buff *skb) { return *(int *)(long)skb->data; }
SEC("tc") int tcx_egress(struct __sk_buff *skb) { return -1; }
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture
def pair():
    """Two namespaces joined by one veth (eth0 on both sides): 10.250.9.1 <-> .2."""
    need_root_and_objects()
    tag = uuid.uuid4().hex[:6]
    ns = (f"pwtebpf-{tag}-x", f"pwtebpf-{tag}-y")
    try:
        for name in ns:
            sh("ip", "netns", "add", name)
            sh("ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "-n", ns[0], "link", "add", "eth0", "address", "02:50:00:09:00:01", "type", "veth",
           "peer", "name", "eth0", "address", "02:50:00:09:00:02", "netns", ns[1])
        for i, name in enumerate(ns):
            sh("ip", "-n", name, "addr", "add", f"10.250.9.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
            sh("ip", "-n", name, "neigh", "replace", f"10.250.9.{2 - i}", "lladdr",
               f"02:50:00:09:00:0{2 - i}", "dev", "eth0", "nud", "permanent")
        ifindex = json.loads(sh("ip", "-n", ns[0], "-j", "link", "show", "eth0"))[0]["ifindex"]
        yield f"/run/netns/{ns[0]}", ifindex, ns
    finally:
        for name in ns:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def kernel_ids() -> dict[str, set[int]]:
    links = json.loads(sh("bpftool", "-j", "link", "show") or "[]")
    progs = json.loads(sh("bpftool", "-j", "prog", "show") or "[]")
    return {"links": {l["id"] for l in links}, "programs": {p["id"] for p in progs}}


def wait_until_gone(ours: dict[str, set[int]], timeout: float = 10) -> dict[str, set[int]]:
    """Which of `ours` are still in the kernel once freeing settled (RCU is lazy)."""
    deadline = time.monotonic() + timeout
    while True:
        now = kernel_ids()
        left = {k: set(ours[k]) & now[k] for k in ours}
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_sigkill_leaves_no_program_attached(pair):
    path, ifindex, _ = pair
    before = kernel_ids()
    child = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, path, str(ifindex)],
                             stdout=subprocess.PIPE, text=True)
    try:
        ours = {k: set(v) for k, v in json.loads(child.stdout.readline()).items()}
        assert len(ours["links"]) == 3          # tcx ingress + egress + tp_btf
        during = kernel_ids()
        assert ours["links"] <= during["links"] and ours["programs"] <= during["programs"]
        assert not ours["programs"] & before["programs"]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert wait_until_gone(ours) == {"links": set(), "programs": set()}


def test_close_leaves_nothing(pair):
    from ebpf.loader import Loader
    path, ifindex, _ = pair
    loader = Loader()
    try:
        hook = loader.attach(path, ifindex)
        assert hook.mode == "tcx"
        ours = loader.kernel_ids()
        assert ours["links"] <= kernel_ids()["links"]
    finally:
        loader.close()
    loader.close()      # twice is fine
    assert wait_until_gone(ours) == {"links": set(), "programs": set()}


def send_udp(path: str, dest: tuple, n: int) -> None:
    with in_netns(path):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        for _ in range(n):
            s.sendto(b"y" * 50, dest)
    time.sleep(0.1)


def tc_show(ns: str, *what: str) -> str:
    return sh("ip", "netns", "exec", ns, "tc", *what)


@pytest.mark.parametrize("clsact_before", [False, True])
def test_clsact_fallback_counts_and_is_removed(pair, clsact_before):
    from ebpf.loader import Loader
    path, ifindex, ns = pair
    if clsact_before:
        tc_show(ns[0], "qdisc", "add", "dev", "eth0", "clsact")
    loader = Loader(attach_mode="clsact")
    try:
        hook = loader.attach(path, ifindex)
        assert (hook.mode, hook.created_clsact) == ("clsact", not clsact_before)
        for parent in ("ingress", "egress"):
            assert "planewatch" in tc_show(ns[0], "filter", "show", "dev", "eth0", parent)
        send_udp(path, ("10.250.9.2", 9), 7)
        egress = loader.interface_traffic()[(hook.netns_inode, ifindex, "egress")]
        assert egress[0] == 7
        ours = loader.kernel_ids()
    finally:
        loader.close()
    for parent in ("ingress", "egress"):
        assert "planewatch" not in tc_show(ns[0], "filter", "show", "dev", "eth0", parent)
    assert ("clsact" in tc_show(ns[0], "qdisc", "show", "dev", "eth0")) == clsact_before
    assert wait_until_gone(ours) == {"links": set(), "programs": set()}


def link_ids(hook) -> set[int]:
    from ebpf.libbpf import fd_ids
    return {fd_ids(fd)["link_id"] for fd in hook.link_fds}


def test_reused_netns_and_ifindex_get_fresh_links(pair):
    """A device replaced under the same (netns inode, ifindex) - what a new pod
    netns reusing a freed inode looks like - is attached again and counted."""
    from collector.model import Attachment, InterfaceView, Link, Pod, PodView
    path, ifindex, ns = pair
    inode = os.stat(path).st_ino
    att = Attachment("pwtebpf", "pod-x", "uid-x", "default", "eth0")
    snap = Snapshot((PodView(Pod("pwtebpf", "pod-x", "uid-x"), path, inode, "test",
                             (InterfaceView(att, Link(ifindex, "eth0")),)),))
    source = EbpfSource(Config())
    try:
        source.reconcile(snap)
        old = link_ids(source.loader.hooks[(inode, ifindex)])
        sh("ip", "-n", ns[0], "link", "del", "eth0")
        sh("ip", "-n", ns[0], "link", "add", "eth0", "index", str(ifindex), "address", "02:50:00:09:00:01",
           "type", "veth", "peer", "name", "eth0", "address", "02:50:00:09:00:02", "netns", ns[1])
        sh("ip", "-n", ns[0], "addr", "add", "10.250.9.1/24", "dev", "eth0")
        for name in ns:
            sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", ns[0], "neigh", "replace", "10.250.9.2", "lladdr", "02:50:00:09:00:02",
           "dev", "eth0", "nud", "permanent")
        source.reconcile(snap)
        new = link_ids(source.loader.hooks[(inode, ifindex)])
        assert len(new) == 2 and not new & old
        send_udp(path, ("10.250.9.2", 9), 4)
        assert source.loader.interface_traffic()[(inode, ifindex, "egress")][0] == 4
    finally:
        source.close()


# --- degrading --------------------------------------------------------------------------

def status(source) -> tuple[str, str]:
    text = render(source.collect(Snapshot(()))).decode()
    up = next(line for line in text.splitlines() if line.startswith("planewatch_ebpf_up "))
    info = next(line for line in text.splitlines() if line.startswith("planewatch_ebpf_info{"))
    return up.split()[1], info.split('reason="')[1].split('"')[0]


def test_missing_objects(tmp_path, caplog):
    source = EbpfSource(Config(options={"ebpf": {"objects_dir": str(tmp_path)}}))
    with caplog.at_level(logging.WARNING, logger="collector.sources.ebpf"):
        assert status(source) == ("0", "objects_missing")
        assert status(source) == ("0", "objects_missing")
    assert len([r for r in caplog.records if "disabled" in r.getMessage()]) == 1
    assert source.top_asymmetric_flows(5) == []
    source.close()


def test_missing_btf(tmp_path):
    need_root_and_objects()
    source = EbpfSource(Config(options={"ebpf": {"btf_path": str(tmp_path / "vmlinux")}}))
    assert status(source) == ("0", "btf_missing")
    source.close()


def test_without_capabilities():
    need_root_and_objects()
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) not installed")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.test_ebpf_lifecycle import status;"
              "from collector.sources.ebpf import EbpfSource; from collector.registry import Config;"
              "print(*status(EbpfSource(Config())))")
    with open("/proc/sys/kernel/unprivileged_bpf_disabled") as f:
        if f.read().strip() == "0":
            pytest.skip("unprivileged BPF is enabled on this host: no EPERM to provoke")
    # root without any capability: bpf() answers EPERM
    out = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c",
                          script, ROOT], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "permission_denied"]


def test_verifier_refusal(tmp_path):
    need_root_and_objects()
    (tmp_path / "bad.bpf.c").write_text(BAD_PROGRAM)
    subprocess.run(["clang", "-g", "-O2", "-target", "bpf", f"-I{BUILD}", "-c", str(tmp_path / "bad.bpf.c"),
                    "-o", str(tmp_path / "interface_traffic.bpf.o")], check=True)
    shutil.copy(os.path.join(BUILD, "packet_drops.bpf.o"), tmp_path)
    source = EbpfSource(Config(options={"ebpf": {"objects_dir": str(tmp_path)}}))
    assert status(source) == ("0", "verifier_rejected")
    source.close()


def test_unreadable_drop_reasons_cost_only_their_names(tmp_path, caplog):
    """A BTF whose drop-reason enum cannot be read leaves the programs loaded;
    drops are then labelled by number (UNKNOWN_<n>)."""
    need_root_and_objects()
    broken = tmp_path / "vmlinux"
    broken.write_bytes(b"\0" * 64)
    source = EbpfSource(Config(options={"ebpf": {"btf_path": str(broken)}}))
    try:
        assert status(source) == ("1", "ok")
        assert source.loader.reasons == {}
        assert any("drop reasons by number" in r.getMessage() for r in caplog.records)
    finally:
        source.close()
