"""Counter slots of interface_traffic.bpf.c: which interface counts where.

The tc programs count every packet. A per-CPU hash lookup of (netns,
ifindex, direction) cost ~27 ns of that (BPF_PROG_TEST_RUN); an array
lookup the verifier inlines costs a few. So each interface the loader
attaches to gets a slot of the per-CPU array `traffic_slots`, and the
program finds it through `traffic_index`: a bucket picked by a hash of
(netns, ifindex) (traffic_bucket_of in planewatch.bpf.h, `bucket_of` here),
holding up to WAYS (netns, ifindex) -> slot ways. An interface whose bucket
or the slots are full gets none and is counted in the `iface_traffic` hash
as before; the reader adds both places up per interface, so nothing is lost
either way.

Only this module writes the two maps, and only between a slot's owners:
- claim (before the interface's programs are attached): the slot's counters
  are zeroed on every CPU, then the way is written. Nothing counts into a
  free slot, so the zeroes stay until the first packet of the new owner;
  counters go from one owner to the next only through zero, never from a
  departed interface to a new one (even one with the same netns inode and
  ifindex).
- release (after the programs are detached): the way is cleared whole. A
  way holds its slot number plus one, so a cleared way (all zero) names no
  slot, and a program reading a way while it is being written (the kernel
  copies the bucket field by field) either fails the (netns, ifindex) compare
  or finds "no slot" and counts that packet in the hash for its interface:
  never in another interface's slot. TCX detach waits for running programs
  (synchronize_rcu); a clsact filter may still finish a packet after the
  delete: it adds to the released slot, and the next claim zeroes that
  (unless the claim falls inside that packet's run).
Free slots are reused lowest first, so a scrape reads only the slots below
the highest one in use (slots x CPUs x 32 bytes), not the whole array.
"""
from __future__ import annotations

import struct
import threading

from ebpf import libbpf, maps

BUCKET_BITS = 10            # TRAFFIC_BUCKET_BITS
BUCKETS = 1 << BUCKET_BITS
WAYS = 4                    # TRAFFIC_WAYS
WAY = struct.Struct("=IIII")        # struct traffic_way: netns, ifindex, slot + 1, pad
FREE = (0, 0, -1)           # a way naming no interface and no slot
INDEX = struct.Struct("=I")
Key = tuple[int, int]       # (netns inode, ifindex)


def bucket_of(netns: int, ifindex: int) -> int:
    """traffic_bucket_of() of planewatch.bpf.h, in u32 arithmetic."""
    mixed = (netns ^ (ifindex * 0x85EBCA6B)) & 0xFFFFFFFF
    return ((mixed * 0x9E3779B1) & 0xFFFFFFFF) >> (32 - BUCKET_BITS)


class TrafficSlots:
    """The loader's side of traffic_index / traffic_slots: claims a slot per
    attached interface, releases it on detach, reads the owned slots."""

    def __init__(self, index_fd: int, slots_fd: int, nslots: int, ncpus: int):
        self.index_fd, self.slots_fd, self.nslots, self.ncpus = index_fd, slots_fd, nslots, ncpus
        self.refused = 0                    # interfaces left to the hash: no way or slot free
        self._lock = threading.Lock()       # held for map writes and reads only, never for an attach
        self._ways: dict[int, list[tuple[int, int, int]]] = {}    # bucket -> (netns, ifindex, slot) x WAYS
        self._slot_of: dict[Key, int] = {}
        self._owner: dict[int, Key] = {}
        self._free: set[int] = set()        # released slots below _high
        self._high = 0                      # slots [0, _high) have been handed out

    def claim(self, key: Key) -> int | None:
        """The slot `key` counts in from now on (None: the hash counts it)."""
        with self._lock:
            if key in self._slot_of:
                return self._slot_of[key]
            bucket = bucket_of(*key)
            ways = self._ways.setdefault(bucket, [FREE] * WAYS)
            free_ways = [i for i, (netns, _, _) in enumerate(ways) if not netns]
            if not free_ways or (not self._free and self._high >= self.nslots):
                self.refused += 1
                return None
            slot = min(self._free) if self._free else self._high
            self._free.discard(slot)
            self._high = max(self._high, slot + 1)
            zero = bytes(maps.SLOTTED_TRAFFIC.value_size(self.ncpus))
            libbpf.update(self.slots_fd, INDEX.pack(slot), zero)
            ways[free_ways[0]] = (key[0], key[1], slot)
            self._write(bucket, ways)
            self._slot_of[key], self._owner[slot] = slot, key
            return slot

    def release(self, key: Key) -> None:
        with self._lock:
            slot = self._slot_of.pop(key, None)
            if slot is None:
                return
            del self._owner[slot]
            bucket = bucket_of(*key)
            ways = self._ways[bucket]
            ways[ways.index((key[0], key[1], slot))] = FREE
            self._write(bucket, ways)
            self._free.add(slot)
            while self._high - 1 in self._free:     # the top is free: reads stop lower
                self._free.remove(self._high - 1)
                self._high -= 1

    def _write(self, bucket: int, ways: list[tuple[int, int, int]]) -> None:
        libbpf.update(self.index_fd, INDEX.pack(bucket),
                      b"".join(WAY.pack(netns, ifindex, slot + 1, 0) for netns, ifindex, slot in ways))

    def entries(self) -> list[tuple[bytes, bytes]]:
        """(netns, ifindex) -> its slot's per-CPU counters, as raw (key, value)
        bytes for maps.SLOTTED_TRAFFIC. Under the lock, so no slot changes
        owner between reading who owns it and reading its counters."""
        with self._lock:
            if not self._owner:
                return []
            raw = maps.read_array(self.slots_fd, maps.SLOTTED_TRAFFIC, self.ncpus, self._high)
            return [(maps.SLOTTED_TRAFFIC.key.pack(*self._owner[slot]), value)
                    for slot, value in enumerate(raw) if slot in self._owner]

    def __len__(self) -> int:
        return len(self._slot_of)
