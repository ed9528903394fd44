"""Counter slots (ebpf/traffic_slots.py) count exactly what the programs ran on.

Packets are fed to the attached programs with BPF_PROG_TEST_RUN from devices
of a netns made here (the context's ifindex; each test run is one packet on
the calling CPU), so every count is known: per interface, direction and CPU.
The devices' ifindexes are picked so that more interfaces than a bucket has
ways hash to one bucket, and loaders get fewer slots than interfaces, so both
places (slot and iface_traffic hash) count; slots are released and claimed
again by other interfaces, including one with the departed one's very key.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import uuid

import pytest

from kernel.nsenter import in_netns, netns_inode
from tests.test_ebpf import need_root_and_objects, sh

pytestmark = pytest.mark.ebpf

INGRESS, EGRESS = 0, 1
PROGRAMS = ("tcx_ingress", "tcx_egress")


def frame(size: int) -> bytes:
    payload = b"\xab" * (size - 14 - 20 - 8)
    eth = bytes.fromhex("020000000001" "020000000002" "0800")
    udp = struct.pack("!HHHH", 40000, 5201, 8 + len(payload), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(payload), 0, 0x4000, 64, 17, 0,
                     bytes([10, 252, 0, 1]), bytes([10, 252, 0, 2]))
    return eth + ip + udp + payload


class Netns:
    """One netns; devices are veth ends created with the ifindex asked for, down."""

    def __init__(self):
        self.name = f"pwtslot-{uuid.uuid4().hex[:6]}"
        self.path = f"/run/netns/{self.name}"
        sh("ip", "netns", "add", self.name)
        self.inode = netns_inode(self.path)
        self.count = 0

    def add(self, ifindex: int) -> int:
        self.count += 1
        dev, peer = f"s{self.count}", f"p{self.count}"
        # left down: the only packets its programs see are the test's
        sh("ip", "-n", self.name, "link", "add", dev, "index", str(ifindex), "type", "veth", "peer", "name", peer)
        got = json.loads(sh("ip", "-n", self.name, "-j", "link", "show", dev))[0]["ifindex"]
        assert got == ifindex
        return ifindex

    def remove(self, ifindex: int) -> None:
        sh("ip", "-n", self.name, "link", "del", self.device(ifindex))

    def device(self, ifindex: int) -> str:
        links = json.loads(sh("ip", "-n", self.name, "-j", "link", "show"))
        return next(link["ifname"] for link in links if link["ifindex"] == ifindex)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def netns():
    need_root_and_objects()
    made = Netns()
    try:
        yield made
    finally:
        made.delete()


def colliding_ifindexes(inode: int, n: int) -> list[int]:
    """`n` ifindexes (>= 100: clear of the ones the kernel hands out) that
    all fall in one bucket for this netns."""
    from ebpf.traffic_slots import bucket_of
    by_bucket: dict[int, list[int]] = {}
    for ifindex in range(100, 1_000_000):
        found = by_bucket.setdefault(bucket_of(inode, ifindex), [])
        found.append(ifindex)
        if len(found) == n:
            return found
    raise AssertionError("no bucket with enough ifindexes")


class Counter:
    """Runs packets and keeps what the kernel must show: (netns, ifindex, direction) -> (packets, bytes)."""

    def __init__(self, loader, ns: Netns):
        from ebpf import libbpf
        self.loader, self.ns, self.libbpf = loader, ns, libbpf
        self.fds = [loader.program_fd(p) for p in PROGRAMS]
        self.want: dict[tuple[int, int, str], tuple[int, int]] = {}

    def run(self, ifindex: int, direction: int, count: int, size: int = 98, cpu: int | None = None) -> None:
        before = os.sched_getaffinity(0)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        try:
            with in_netns(self.ns.path):
                for _ in range(count):
                    retval, _ = self.libbpf.test_run(self.fds[direction], frame(size), 1, ifindex=ifindex)
                    assert retval == 0xFFFFFFFF, retval
        finally:
            os.sched_setaffinity(0, before)
        key = (self.ns.inode, ifindex, ("ingress", "egress")[direction])
        packets, nbytes = self.want.get(key, (0, 0))
        self.want[key] = (packets + count, nbytes + count * size)

    def forget(self, ifindex: int) -> None:
        for d in ("ingress", "egress"):
            self.want.pop((self.ns.inode, ifindex, d), None)

    def got(self) -> dict:
        return {k: v for k, v in self.loader.interface_traffic().items() if k[0] == self.ns.inode and v != (0, 0)}


def hashed_keys(loader) -> set[tuple[int, int]]:
    from ebpf import maps
    return {maps.TRAFFIC.key.unpack(k)[:2] for k, _ in maps.read_entries(loader.fds["iface_traffic"], maps.TRAFFIC,
                                                                         loader.ncpus)}


def test_slotted_interfaces_never_touch_the_hash(netns, loader_factory):
    """The program finds the slot the loader wrote (same bucket hash in C and
    Python): every count is in the slot, none in the iface_traffic hash."""
    loader = loader_factory()
    ifindexes = [netns.add(i) for i in (201, 202, 203)]
    for ifindex in ifindexes:
        loader.attach(netns.path, ifindex)
    counter = Counter(loader, netns)
    for n, ifindex in enumerate(ifindexes):
        counter.run(ifindex, INGRESS, 3 + n, size=98)
        counter.run(ifindex, EGRESS, 5 + n, size=150)
    assert counter.got() == counter.want
    assert hashed_keys(loader) == set()
    assert len(loader.slots) == 3 and loader.slots.refused == 0


def test_a_full_bucket_and_full_slots_fall_back_to_the_hash_exactly(netns, loader_factory):
    """Six interfaces in one bucket (four ways) and two more elsewhere, with
    six slots: two go to the hash (bucket full), then one more (slots full);
    every interface still counts exactly, on whichever CPU."""
    from ebpf.traffic_slots import WAYS
    loader = loader_factory(counter_slots=6)
    same_bucket = [netns.add(i) for i in colliding_ifindexes(netns.inode, WAYS + 2)]
    others = [netns.add(i) for i in (301, 302)]
    for ifindex in same_bucket + others:
        loader.attach(netns.path, ifindex)
    third = [netns.add(i) for i in (303,)]
    loader.attach(netns.path, third[0])
    everyone = same_bucket + others + third
    assert len(loader.slots) == 6 and loader.slots.refused == 3
    counter = Counter(loader, netns)
    cpus = sorted(os.sched_getaffinity(0))
    for n, ifindex in enumerate(everyone):
        for cpu in cpus:
            counter.run(ifindex, INGRESS, 2 + n, size=80, cpu=cpu)
            counter.run(ifindex, EGRESS, 1 + n % 3, size=120, cpu=cpu)
    assert counter.got() == counter.want
    assert hashed_keys(loader) == {(netns.inode, i) for i in same_bucket[WAYS:] + third}


def test_a_released_slot_starts_its_next_owner_from_zero(netns, loader_factory):
    """A counts on every CPU, is detached; B claims A's slot (lowest free) and
    counts from zero; then a device with A's very (netns, ifindex) comes back
    and also starts from zero, whichever slot it gets."""
    loader = loader_factory(counter_slots=2)
    a, keep = netns.add(401), netns.add(402)
    loader.attach(netns.path, a)
    loader.attach(netns.path, keep)
    counter = Counter(loader, netns)
    for cpu in sorted(os.sched_getaffinity(0)):
        counter.run(a, INGRESS, 7, cpu=cpu)
        counter.run(a, EGRESS, 4, cpu=cpu)
        counter.run(keep, EGRESS, 2, cpu=cpu)
    assert counter.got() == counter.want
    slot_of_a = loader.slots.claim((netns.inode, a))

    loader.detach(netns.inode, a)
    counter.forget(a)
    assert counter.got() == counter.want            # A's counts left with it
    b = netns.add(403)
    loader.attach(netns.path, b)
    assert loader.slots.claim((netns.inode, b)) == slot_of_a
    counter.run(b, INGRESS, 1, cpu=min(os.sched_getaffinity(0)))
    assert counter.got() == counter.want

    loader.detach(netns.inode, b)
    counter.forget(b)
    netns.remove(a)
    again = netns.add(a)                            # the departed one's key, a new device
    loader.attach(netns.path, again)
    counter.run(again, EGRESS, 3, cpu=max(os.sched_getaffinity(0)))
    assert counter.got() == counter.want
    assert hashed_keys(loader) == set()


def test_counters_stay_monotonic_while_slots_change_owners(netns, loader_factory):
    """Interfaces come and go around two long-lived ones (one slotted, one in
    the hash): at every read, theirs equal what ran and never go down, and
    every newcomer reads exactly its own packets."""
    loader = loader_factory(counter_slots=3)
    slotted, hashed = netns.add(501), netns.add(502)
    filler = netns.add(503)
    loader.attach(netns.path, slotted)
    loader.attach(netns.path, filler)
    loader.attach(netns.path, netns.add(504))        # takes the last slot
    loader.attach(netns.path, hashed)
    assert loader.slots.claim((netns.inode, hashed)) is None
    counter = Counter(loader, netns)
    cpus = sorted(os.sched_getaffinity(0))
    seen: dict = {}
    churn = filler
    for step in range(12):
        cpu = cpus[step % len(cpus)]
        counter.run(slotted, step % 2, 1 + step, cpu=cpu)
        counter.run(hashed, EGRESS, 2, cpu=cpu)
        counter.run(churn, INGRESS, 5, cpu=cpu)
        got = counter.got()
        assert got == counter.want, step
        for key in [k for k in got if k[1] in (slotted, hashed)]:
            assert got[key] >= seen.get(key, (0, 0)), (step, key)
            seen[key] = got[key]
        loader.detach(netns.inode, churn)            # its slot goes back, the next one takes it
        counter.forget(churn)
        churn = netns.add(600 + step)
        loader.attach(netns.path, churn)
    assert hashed_keys(loader) == {(netns.inode, hashed)}


def test_reads_only_the_slots_below_the_highest_in_use(netns, loader_factory):
    """A scrape reads slots x CPUs x 32 bytes up to the highest slot handed
    out, and that bound comes down when the top slots are released."""
    from ebpf import maps
    loader = loader_factory(counter_slots=64)
    ifindexes = [netns.add(700 + i) for i in range(5)]
    for ifindex in ifindexes:
        loader.attach(netns.path, ifindex)
    read: list[int] = []
    real = maps.read_array

    def counting(fd, layout, ncpus, count):
        read.append(count)
        return real(fd, layout, ncpus, count)
    maps.read_array = counting
    try:
        loader.interface_traffic()
        for ifindex in ifindexes[2:]:
            loader.detach(netns.inode, ifindex)
        loader.interface_traffic()
        loader.detach(netns.inode, ifindexes[0])     # a hole below: the bound stays
        loader.interface_traffic()
    finally:
        maps.read_array = real
    assert read == [5, 2, 2]


def test_a_way_caught_half_written_counts_in_the_hash(netns, loader_factory):
    """The kernel copies a bucket into the array field by field, so a program can
    read a way whose (netns, ifindex) is already its new owner's while its slot
    field is still zero. Zero means "no slot": that packet goes to the hash for
    its own interface, never into slot 0, which another interface owns."""
    from ebpf.traffic_slots import bucket_of
    loader = loader_factory(counter_slots=4)
    first, second = netns.add(811), netns.add(812)
    loader.attach(netns.path, first)
    loader.attach(netns.path, second)
    assert loader.slots.claim((netns.inode, first)) == 0
    slots = loader.slots
    bucket = bucket_of(netns.inode, second)
    ways = slots._ways[bucket]
    i = next(n for n, way in enumerate(ways) if way[:2] == (netns.inode, second))
    ways[i] = (netns.inode, second, -1)          # key written, slot field not yet: 0 in the map
    slots._write(bucket, ways)
    counter = Counter(loader, netns)
    counter.run(first, INGRESS, 3)
    counter.run(second, INGRESS, 5)
    assert counter.got() == counter.want
    assert hashed_keys(loader) == {(netns.inode, second)}
