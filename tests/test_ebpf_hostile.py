"""BPF under a hostile tenant (issue 13.11), with the real programs:

- a full map's refusals are counted per map and reach /metrics;
- a full watch map leaks no TCX link (the attach is undone);
- clsact filters a SIGKILLed collector left behind are removed by the next one,
  and nobody else's filters are touched;
- a pod flooding the shared flow table cannot evict another pod's flows unnoticed:
  the LRU's evictions are counted per interface (created - still held).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from collector.model import Attachment, InterfaceView
from collector.sources.ebpf import flow_families, guard_families
from exporters.exposition import render
from kernel.nsenter import in_netns, netns_inode
from tests.test_ebpf import need_root_and_objects, sh
from tests.test_ebpf_lifecycle import kernel_ids, tc_show, wait_until_gone

pytestmark = pytest.mark.ebpf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLSACT_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from ebpf.loader import Loader
loader = Loader(attach_mode="clsact")
loader.attach(sys.argv[2], int(sys.argv[3]))
print("attached", flush=True)
time.sleep(600)
"""


class Pairs:
    """Namespace pairs joined by one veth each (eth0 on both sides), 10.250.<n>.1 <-> .2."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:6]
        self.names: list[str] = []

    def add(self, n: int) -> tuple[str, int, tuple[str, str]]:
        ns = (f"pwthb-{self.tag}-{n}x", f"pwthb-{self.tag}-{n}y")
        for name in ns:
            self.names.append(name)
            sh("ip", "netns", "add", name)
            sh("ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "-n", ns[0], "link", "add", "eth0", "address", f"02:51:00:{n:02x}:00:01", "type", "veth",
           "peer", "name", "eth0", "address", f"02:51:00:{n:02x}:00:02", "netns", ns[1])
        for i, name in enumerate(ns):
            sh("ip", "-n", name, "addr", "add", f"10.250.{n}.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
            sh("ip", "-n", name, "neigh", "replace", f"10.250.{n}.{2 - i}", "lladdr",
               f"02:51:00:{n:02x}:00:0{2 - i}", "dev", "eth0", "nud", "permanent")
        ifindex = json.loads(sh("ip", "-n", ns[0], "-j", "link", "show", "eth0"))[0]["ifindex"]
        return f"/run/netns/{ns[0]}", ifindex, ns

    def delete(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def pairs():
    need_root_and_objects()
    made = Pairs()
    try:
        yield made
    finally:
        made.delete()


def send_udp(path: str, dest: str, ports: range, per_port: int = 1) -> None:
    """Datagrams from `path` to dest:9, one source port (one flow) each."""
    sockets = []
    with in_netns(path):
        for _ in ports:
            sockets.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        for port, s in zip(ports, sockets):
            s.bind(("", port))
            for _ in range(per_port):
                s.sendto(b"z" * 32, (dest, 9))
    finally:
        for s in sockets:
            s.close()
    time.sleep(0.1)


def fill(fd: int, key_struct, keys, value: bytes) -> None:
    from ebpf import libbpf
    for k in keys:
        libbpf.update(fd, key_struct.pack(*k), value)


def test_full_traffic_map_refusals_are_counted_and_exported(pairs, loader_factory):
    """The iface_traffic hash counts the interfaces without a counter slot:
    here the one slot is taken by the peer, so eth0 of `path` is counted there."""
    from ebpf import maps
    path, ifindex, ns = pairs.add(1)
    loader = loader_factory(counter_slots=1)
    peer = json.loads(sh("ip", "-n", ns[1], "-j", "link", "show", "eth0"))[0]["ifindex"]
    loader.attach(f"/run/netns/{ns[1]}", peer)
    loader.attach(path, ifindex)
    assert loader.slots.claim((netns_inode(path), ifindex)) is None and loader.slots.refused >= 1
    assert loader.map_refused() == {"iface_traffic": 0, "asym_packets": 0, "packet_drops": 0,
                                    "flows_created": 0, "watched": 0}
    # Another tenant's interfaces took every key (4096) of the counter map.
    stride = maps.TRAFFIC.stride * loader.ncpus
    fill(loader.fds["iface_traffic"], maps.TRAFFIC.key, ((1, i, 0) for i in range(4096)), b"\0" * stride)
    send_udp(path, "10.250.1.2", range(40000, 40010), per_port=3)
    refused = loader.map_refused()
    assert refused["iface_traffic"] >= 30, refused       # every egress packet lost its count
    text = render(guard_families(refused, loader.stale_filters_removed)).decode()
    assert f'planewatch_ebpf_map_refused_total{{map="iface_traffic"}} {refused["iface_traffic"]}' in text


def test_full_watch_map_leaks_no_tcx_link(pairs, loader_factory):
    from ebpf import maps
    path, ifindex, _ = pairs.add(2)
    loader = loader_factory()
    fill(loader.fds["watched"], maps.WATCHED.key, ((1, i) for i in range(8192)), b"\1")
    before = kernel_ids()
    with pytest.raises(OSError):
        loader.attach(path, ifindex)
    assert loader.hooks == {} and loader.map_refused()["watched"] == 1
    new_links = kernel_ids()["links"] - before["links"]
    assert wait_until_gone({"links": new_links, "programs": set()}) == {"links": set(), "programs": set()}
    programs = loader.kernel_ids()["programs"]
    links = json.loads(sh("bpftool", "-j", "link", "show") or "[]")
    assert [l for l in links if l.get("type") == "tcx" and l.get("prog_id") in programs] == []


def our_filters(ns: str) -> str:
    return tc_show(ns, "filter", "show", "dev", "eth0", "ingress") + \
        tc_show(ns, "filter", "show", "dev", "eth0", "egress")


def foreign_filter(path: str, ifindex: int, prog_fd: int) -> None:
    """A cls_bpf filter someone else installed: another priority and name."""
    from ebpf import tc
    options = (tc._attr(tc.TCA_BPF_FD, prog_fd.to_bytes(4, sys.byteorder))
               + tc._attr(tc.TCA_BPF_NAME, b"someone-else\0")
               + tc._attr(tc.TCA_BPF_FLAGS, (1).to_bytes(4, sys.byteorder)))
    body = (tc._tcmsg(ifindex, 0, tc.PARENT_INGRESS, tc.filter_info(prio=7))
            + tc._attr(tc.TCA_KIND, b"bpf\0") + tc._attr(tc.TCA_OPTIONS | tc.NLA_F_NESTED, options))
    with in_netns(path), tc.TcSocket() as sock:
        sock.request(tc.RTM_NEWTFILTER, tc.NLM_F_ACK | tc.NLM_F_CREATE | tc.NLM_F_EXCL, body)


def test_stale_clsact_filters_of_a_killed_collector_are_removed(pairs, loader_factory):
    path, ifindex, ns = pairs.add(3)
    child = subprocess.Popen([sys.executable, "-c", CLSACT_CHILD, ROOT, path, str(ifindex)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "attached"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    left = our_filters(ns[0])
    assert left.count("planewatch") == 2, left            # ingress + egress survived SIGKILL
    loader = loader_factory()
    foreign_filter(path, ifindex, loader.ingress_fd)
    hook = loader.attach(path, ifindex)
    assert hook.mode == "tcx"
    after = our_filters(ns[0])
    assert "planewatch" not in after and "someone-else" in after, after
    assert loader.stale_filters_removed == 2
    text = render(guard_families(loader.map_refused(), loader.stale_filters_removed)).decode()
    assert "planewatch_ebpf_stale_filters_removed_total 2" in text


def test_flow_flood_evictions_are_counted_per_interface(pairs, loader_factory):
    """LRU with evictions counted per interface (not per-pod quotas): a small table
    (256) makes the flood cheap; the victim's loss shows on its own series."""
    victim_path, victim_if, _ = pairs.add(4)
    attacker_path, attacker_if, _ = pairs.add(5)
    loader = loader_factory(flow_entries=256)
    loader.flow_census_seconds = 0
    loader.attach(victim_path, victim_if)
    loader.attach(attacker_path, attacker_if)
    victim, attacker = (netns_inode(victim_path), victim_if), (netns_inode(attacker_path), attacker_if)

    # The kernel's common LRU keeps the entries a CPU inserts on that CPU's pending
    # list until the same CPU inserts again; only then can they be evicted. So the
    # victim's flows and the flood from one CPU (this thread, pinned). Left to the
    # scheduler the thread may move between the two sends, and a flood from the
    # other CPU evicts only its own entries: (21, 0) every time with the two sends
    # pinned to different CPUs, and once in 16 full runs unpinned.
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        send_udp(victim_path, "10.250.4.2", range(41000, 41020))
        before = loader.flow_evictions()
        # 20 egress flows, plus the peer's ICMP port-unreachable coming back in
        assert before[victim][0] >= 20 and before[victim][1] == 0, before[victim]

        t0 = time.perf_counter()
        send_udp(attacker_path, "10.250.5.2", range(42000, 44000))
        flood_s = time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, cpus)
    t0 = time.perf_counter()
    after = loader.flow_evictions()
    read_s = time.perf_counter() - t0
    print(f"flood of 2000 flows: {flood_s:.2f} s; victim (created, evicted) {after[victim]}, "
          f"attacker {after[attacker]}; reading the census {read_s * 1000:.1f} ms")
    assert after[attacker][0] >= 2000
    assert after[victim][0] == before[victim][0] and after[victim][1] > 0, after[victim]

    def view(pod, interface):
        return InterfaceView(Attachment("ns", pod, f"uid-{pod}", "ns/net", interface, plane="data"), None)
    index = {victim: view("victim", "eth0"), attacker: view("attacker", "eth0")}
    text = render(flow_families(index, after)).decode()
    assert (f'planewatch_ebpf_flows_evicted_total{{namespace="ns",pod="victim",network="ns/net",'
            f'interface="eth0",plane="data"}} {after[victim][1]}') in text
