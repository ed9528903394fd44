"""BPF map layouts (mirroring ebpf/planewatch.bpf.h) and their decoding.

Decoding is pure (bytes in, tuples out) and tested without a kernel; only
`read_entries`, `read_array`, `delete_where`, `put` and `remove` touch a map fd. Per-CPU values are
summed from a fresh bytes copy of each lookup, never from a reused ctypes
buffer: list()-ing a ctypes array aliases it.
"""
from __future__ import annotations

import ctypes
import errno
import heapq
import ipaddress
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Mapping

from ebpf import libbpf

DIRECTIONS = ("ingress", "egress")        # DIRECTION_INGRESS = 0, DIRECTION_EGRESS = 1
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}


@dataclass(frozen=True)
class Layout:
    key: struct.Struct
    value: struct.Struct
    percpu: bool = False

    @property
    def stride(self) -> int:
        """Bytes per CPU in a per-CPU lookup: the kernel rounds values up to 8."""
        return (self.value.size + 7) & ~7 if self.percpu else self.value.size

    @cached_property
    def u64_fields(self) -> int:
        """How many u64 fields the value has when it is nothing else, else 0."""
        fmt = self.value.format.lstrip("=")
        return len(fmt) if fmt and set(fmt) == {"Q"} else 0

    def value_size(self, ncpus: int) -> int:
        return self.stride * ncpus if self.percpu else self.value.size


TRAFFIC = Layout(struct.Struct("=III"), struct.Struct("=QQ"), percpu=True)
# traffic_slots as ebpf/traffic_slots.py hands it out: keyed by the slot's owner
# (netns, ifindex), values per CPU ingress packets, bytes, egress packets, bytes
SLOTTED_TRAFFIC = Layout(struct.Struct("=II"), struct.Struct("=QQQQ"), percpu=True)
DROPS = Layout(struct.Struct("=III"), struct.Struct("=Q"), percpu=True)
ASYMMETRIC = Layout(struct.Struct("=III"), struct.Struct("=Q"), percpu=True)
WATCHED = Layout(struct.Struct("=II"), struct.Struct("=B"))
FLOWS = Layout(struct.Struct("=IBBH2s2s16s16s"), struct.Struct("=IIIIQQ"))
REFUSED = Layout(struct.Struct("=I"), struct.Struct("=Q"), percpu=True)
# enum refused_map in planewatch.bpf.h: index -> the map that refused
REFUSED_MAPS = ("iface_traffic", "asym_packets", "packet_drops", "flows_created")
CREATED = Layout(struct.Struct("=II"), struct.Struct("=Q"), percpu=True)


def flows_held(entries: Iterable[tuple[bytes, bytes]]) -> dict[tuple[int, int], int]:
    """(netns, owner ifindex) -> flows of the table created by that interface."""
    held: dict[tuple[int, int], int] = {}
    netns_of = struct.Struct("=I").unpack_from
    owner_at = 12          # flow_value.owner_ifindex
    for key, value in entries:
        owner = (netns_of(key)[0], int.from_bytes(value[owner_at:owner_at + 4], "little"))
        held[owner] = held.get(owner, 0) + 1
    return held


# --- pure decoding -------------------------------------------------------------

def sum_percpu(raw: bytes, layout: Layout, ncpus: int) -> tuple[int, ...]:
    """Add up the per-CPU copies of one value, field by field. For values made
    of u64s only, strided slices of one memoryview do it at C speed (7 us
    against 76 us a key with 128 CPUs)."""
    if layout.u64_fields:
        words = memoryview(raw)[:layout.stride * ncpus].cast("Q")
        step = layout.stride // 8
        return tuple(sum(words[i::step]) for i in range(layout.u64_fields))
    totals = [0] * len(layout.value.unpack_from(raw, 0))
    for cpu in range(ncpus):
        for i, v in enumerate(layout.value.unpack_from(raw, cpu * layout.stride)):
            totals[i] += v
    return tuple(totals)


def decode_counters(entries: Iterable[tuple[bytes, bytes]], layout: Layout,
                    ncpus: int) -> dict[tuple[int, ...], tuple[int, ...]]:
    """key tuple -> summed value tuple, for a per-CPU counter map.

    Values of u64s only (every counter map) are summed column by column over
    one memoryview of all the entries: a strided slice per (CPU, field), added
    up entry by entry in C, instead of a slice and a sum per entry (the per-entry
    way was ~9 % of a scrape at 1 000 interfaces)."""
    entries = list(entries)
    vsize = layout.value_size(ncpus)
    values = [v for _, v in entries]
    if not layout.u64_fields or not entries or set(map(len, values)) != {vsize}:
        return {layout.key.unpack(k): sum_percpu(v, layout, ncpus) for k, v in entries}
    keys = layout.key.iter_unpack(b"".join([k for k, _ in entries]))
    words = memoryview(b"".join(values)).cast("Q")
    step, per_entry = layout.stride // 8, vsize // 8
    count = len(entries)
    fields = []
    for field in range(layout.u64_fields):
        columns = [words[cpu * step + field::per_entry][:count] for cpu in range(ncpus)]
        fields.append(list(columns[0]) if ncpus == 1 else list(map(sum, zip(*columns))))
    return dict(zip(keys, zip(*fields)))


def traffic_by_interface(counters: dict, slotted: dict) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """(netns, ifindex) -> (ingress packets, ingress bytes, egress packets, egress
    bytes): the `slotted` counters (SLOTTED_TRAFFIC, keyed so already) with the
    iface_traffic hash's `counters` added per key."""
    out = dict(slotted)                                     # nearly every interface
    for (netns, ifindex, d), (packets, nbytes) in counters.items():     # the few without a slot
        if d < len(DIRECTIONS):
            seen = list(out.get((netns, ifindex), (0, 0, 0, 0)))
            seen[2 * d] += packets
            seen[2 * d + 1] += nbytes
            out[(netns, ifindex)] = tuple(seen)
    return out


def traffic_by_direction(by_interface: dict) -> dict[tuple[int, int, str], tuple[int, int]]:
    """`traffic_by_interface`'s counters keyed (netns, ifindex, "ingress"|"egress") -> (packets, bytes)."""
    ingress, egress = DIRECTIONS
    out = {}
    for (netns, ifindex), fields in by_interface.items():
        out[(netns, ifindex, ingress)] = fields[:2]
        out[(netns, ifindex, egress)] = fields[2:]
    return out


NOT_DROPS = frozenset(("SKB_CONSUMED", "SKB_NOT_DROPPED_YET"))     # frees kfree_skb also traces


def reason_name(reasons: Mapping[int, str], code: int) -> str:
    """The skb_drop_reason name of `code`; UNKNOWN_<code> for a value the BTF lacks."""
    name = reasons.get(code)
    return name if name is not None else f"UNKNOWN_{code}"


def drops_by_reason(counters: dict, reasons: dict[int, str]) -> dict[tuple[int, int, str], int]:
    """(netns, ifindex, reason name) -> packets; frees that are not drops are left out."""
    out: dict[tuple[int, int, str], int] = {}
    for (netns, ifindex, code), (packets,) in counters.items():
        name = reason_name(reasons, code)
        if name in NOT_DROPS:
            continue
        key = (netns, ifindex, name)
        out[key] = out.get(key, 0) + packets
    return out


@dataclass(frozen=True)
class Flow:
    netns: int
    protocol: str
    source: str
    source_port: int
    destination: str
    destination_port: int
    ingress_ifindex: int       # where the reversed tuple came in (the request)
    egress_ifindex: int        # where this tuple left (the reply)
    asymmetric_packets: int
    last_seen_ns: int          # CLOCK_MONOTONIC

    def as_dict(self, now_unix: float, now_monotonic_ns: int) -> dict:
        d = self.__dict__.copy()
        del d["last_seen_ns"], d["asymmetric_packets"]
        d["packets"] = self.asymmetric_packets
        d["last_seen"] = round(now_unix - (now_monotonic_ns - self.last_seen_ns) / 1e9, 3)
        return d


def _address(family: int, raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw))


def decode_flow(key: bytes, value: bytes) -> Flow:
    netns, family, proto, _, sport, dport, saddr, daddr = FLOWS.key.unpack(key)
    _, egress, request, _, last_seen, asym = FLOWS.value.unpack(value)
    return Flow(netns, PROTOCOLS.get(proto, str(proto)),
                _address(family, saddr), int.from_bytes(sport, "big"),
                _address(family, daddr), int.from_bytes(dport, "big"),
                request, egress, asym, last_seen)


def top_asymmetric_flows(entries: Iterable[tuple[bytes, bytes]], n: int) -> list[Flow]:
    """The n flows with most asymmetric packets (> 0), most first. Ranked on the
    raw counter so only the winners pay for decoding (addresses are slow)."""
    asym_at = FLOWS.value.size - 8
    ranked = ((int.from_bytes(v[asym_at:], "little"), k, v) for k, v in entries)
    best = heapq.nlargest(n, (r for r in ranked if r[0]), key=lambda r: r[0])
    return [decode_flow(k, v) for _, k, v in best]


# --- map I/O ---------------------------------------------------------------------

BATCH = 256


def read_entries(fd: int, layout: Layout, ncpus: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) as independent bytes: in batches (one syscall per
    BATCH entries, ~10x faster than key by key), or key by key on kernels
    without batch lookups for the map type."""
    try:
        return _read_batched(fd, layout, ncpus)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, 524):     # 524: ENOTSUPP
            raise
        return _read_one_by_one(fd, layout, ncpus)


def read_array(fd: int, layout: Layout, ncpus: int, count: int) -> list[bytes]:
    """The values of indexes [0, count) of an array map, in one batch (or one
    lookup each on kernels without batch lookups of arrays)."""
    if count <= 0:
        return []
    vsize = layout.value_size(ncpus)
    values = ctypes.create_string_buffer(vsize * count)
    try:
        got, _ = libbpf.lookup_batch(fd, None, ctypes.create_string_buffer(4),
                                     ctypes.create_string_buffer(4 * count), values, count)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, 524):     # 524: ENOTSUPP
            raise
        value = ctypes.create_string_buffer(vsize)
        out = []
        for index in range(count):
            libbpf.lookup(fd, ctypes.create_string_buffer(struct.pack("=I", index), 4), value)
            out.append(value.raw)
        return out
    raw = values.raw
    return [raw[i * vsize:(i + 1) * vsize] for i in range(got)]


def _read_batched(fd: int, layout: Layout, ncpus: int) -> list[tuple[bytes, bytes]]:
    ksize, vsize = layout.key.size, layout.value_size(ncpus)
    capacity = BATCH
    cursor_size = max(ksize, 8)             # hash maps use a u32 bucket cursor
    cursor, next_cursor = None, ctypes.create_string_buffer(cursor_size)
    out: list[tuple[bytes, bytes]] = []
    while True:
        keys = ctypes.create_string_buffer(ksize * capacity)
        values = ctypes.create_string_buffer(vsize * capacity)
        try:
            count, done = libbpf.lookup_batch(fd, cursor, next_cursor, keys, values, capacity)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            capacity *= 2                   # one bucket held more than fits: retry bigger
            continue
        kraw, vraw = keys.raw, values.raw   # bytes copies: nothing aliases the buffers
        out.extend((kraw[i * ksize:(i + 1) * ksize], vraw[i * vsize:(i + 1) * vsize]) for i in range(count))
        if done:
            return out
        cursor = ctypes.create_string_buffer(next_cursor.raw, cursor_size)


def _read_one_by_one(fd: int, layout: Layout, ncpus: int) -> list[tuple[bytes, bytes]]:
    """Keys deleted during the walk make get_next_key restart: duplicates are
    possible, callers build dicts."""
    key_a = ctypes.create_string_buffer(layout.key.size)
    key_b = ctypes.create_string_buffer(layout.key.size)
    value = ctypes.create_string_buffer(layout.value_size(ncpus))
    out: list[tuple[bytes, bytes]] = []
    prev = None
    while libbpf.next_key(fd, prev, key_b):
        if libbpf.lookup(fd, key_b, value):
            out.append((key_b.raw, value.raw))
        key_a, key_b = key_b, key_a
        prev = key_a
    return out


def delete_where(fd: int, layout: Layout, wanted: Callable[[tuple], bool]) -> int:
    """Delete the keys for which `wanted(key tuple)` is true; returns how many."""
    doomed = []
    key = ctypes.create_string_buffer(layout.key.size)
    prev = None
    while libbpf.next_key(fd, prev, key):
        if wanted(layout.key.unpack(key.raw)):
            doomed.append(key.raw)
        prev = ctypes.create_string_buffer(key.raw, layout.key.size)
    for raw in doomed:
        libbpf.delete(fd, raw)
    return len(doomed)


def put(fd: int, layout: Layout, key: tuple, value: tuple) -> None:
    libbpf.update(fd, layout.key.pack(*key), layout.value.pack(*value))


def remove(fd: int, layout: Layout, key: tuple) -> None:
    libbpf.delete(fd, layout.key.pack(*key))
