"""The per-CPU flow cache of interface_traffic.bpf.c changes cost, not results.

BPF_PROG_TEST_RUN feeds the same packets, one at a time on one pinned CPU,
to the programs as attached (tcx_ingress/tcx_egress, cache in front of the
flow table) and to the same flow path without the cache
(bench_uncached_*: every packet looks the table up), each in its own loaded
object. Whatever the sequence (interfaces changing under an established flow,
asymmetric replies, new flows evicting old ones from a small LRU table), both
must end with the same flow table, asymmetric counts and per-interface flows
created. The packets come from two devices of a netns made here (the
test run's ctx ifindex; the two ends of one veth pair), so the programs see real (netns, ifindex) keys.
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import uuid

import pytest

from kernel.nsenter import in_netns, netns_inode
from tests.test_ebpf import need_root_and_objects, sh

pytestmark = pytest.mark.ebpf

ADDRS = ("10.251.0.1", "10.251.0.2", "10.251.0.3")
PORTS = (40000, 40001, 5201)


def udp_frame(src: str, dst: str, sport: int, dport: int) -> bytes:
    payload = b"\xab" * 32
    eth = bytes.fromhex("020000000001" "020000000002" "0800")
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(payload), 0, 0x4000, 64, 17, 0,
                     bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    return eth + ip + udp + payload


@pytest.fixture
def netns():
    need_root_and_objects()
    name = f"pwtfc-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", name)
    try:
        ifindexes = []
        sh("ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        for dev in ("d0", "d1"):
            sh("ip", "-n", name, "link", "set", dev, "up")
            ifindexes.append(json.loads(sh("ip", "-n", name, "-j", "link", "show", dev))[0]["ifindex"])
        yield f"/run/netns/{name}", ifindexes
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def pinned():
    """One CPU for the whole sequence: the cache is per CPU, and the LRU's
    eviction order depends on which CPU's free list an insert takes from."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.fixture
def loaders():
    from ebpf.loader import Loader
    made = []
    try:
        for _ in range(2):
            made.append(Loader(bench=True, flow_entries=64))
        yield made
    finally:
        for loader in made:
            loader.close()


def state(loader) -> dict:
    """Everything the flow path writes, minus last_seen_ns (a clock)."""
    from ebpf import maps
    flows = {}
    for key, value in maps.read_entries(loader.fds["flows"], maps.FLOWS, 1):
        fields = maps.FLOWS.value.unpack(value)
        flows[key] = fields[:4] + fields[5:]
    return {"flows": flows, "asymmetric": loader.asymmetric_packets(),
            "created": {k: v[0] for k, v in loader._counters("flows_created", maps.CREATED).items()},
            "traffic": loader.interface_traffic(), "refused": loader.map_refused()}


def run(loader, programs: tuple[str, str], path: str, events) -> None:
    from ebpf import libbpf
    fds = [loader.program_fd(p) for p in programs]
    with in_netns(path):
        for direction, ifindex, frame in events:
            retval, _ = libbpf.test_run(fds[direction], frame, 1, ifindex=ifindex)
            assert retval == 0xFFFFFFFF, retval          # TCX_NEXT


CACHED = ("tcx_ingress", "tcx_egress")
UNCACHED = ("bench_uncached_ingress", "bench_uncached_egress")


def test_ingress_moving_under_a_cached_flow_is_seen(netns, pinned, loaders):
    """A reply flow served from the cache (same interface both ways) whose
    requests start coming in by the other interface: its next replies are
    asymmetric, exactly as without the cache."""
    path, (d0, d1) = netns
    reply = udp_frame("10.251.0.1", "10.251.0.2", 5201, 40000)
    request = udp_frame("10.251.0.2", "10.251.0.1", 40000, 5201)
    events = ([(0, d0, request)] + [(1, d0, reply)] * 5 +          # symmetric: filled, then hits
              [(0, d1, request)] + [(1, d0, reply)] * 3 +          # request moved to d1: 3 asymmetric
              [(0, d0, request)] + [(1, d0, reply)] * 4 +          # back: symmetric again
              [(1, d1, reply)] + [(1, d1, reply)] * 2)             # reply moves to d1: asymmetric (d0 -> d1)
    cached, uncached = loaders
    run(cached, CACHED, path, events)
    run(uncached, UNCACHED, path, events)
    inode = netns_inode(path)
    got = state(cached)
    assert got["asymmetric"] == {(inode, d1, d0): 3, (inode, d0, d1): 3}, got["asymmetric"]
    assert got == state(uncached)


def test_random_sequences_match_the_uncached_path(netns, pinned, loaders):
    """Random packets over 18 tuples, both directions, both interfaces, with a
    64-entry table that a burst of new flows overflows (evictions)."""
    path, ifindexes = netns
    rng = random.Random(16)
    tuples = [(a, b, p, q) for a in ADDRS for b in ADDRS if a != b for p, q in ((PORTS[0], PORTS[2]),
                                                                                (PORTS[1], PORTS[2]),
                                                                                (PORTS[2], PORTS[0]))]
    events = []
    for step in range(1500):
        if step % 500 == 250:       # a burst of 80 new flows: the 64-entry LRU evicts
            events += [(1, ifindexes[0], udp_frame("10.251.1.1", "10.251.1.2", 20000 + i, 9)) for i in range(80)]
        src, dst, sport, dport = rng.choice(tuples)
        # runs of the same packet (what the cache is for), then a switch
        for _ in range(rng.choice((1, 1, 2, 5))):
            events.append((rng.randrange(2), rng.choice(ifindexes), udp_frame(src, dst, sport, dport)))
    cached, uncached = loaders
    run(cached, CACHED, path, events)
    run(uncached, UNCACHED, path, events)
    got, want = state(cached), state(uncached)
    assert sum(got["asymmetric"].values()) > 0 and sum(got["created"].values()) > 64     # exercised
    assert got == want
