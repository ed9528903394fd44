"""The families of cluster mode (exporters/cluster.py): per Whereabouts pool its
size, allocations, free and leaked addresses, invalid entries, and the overlapping
range reservations."""
from __future__ import annotations

from typing import Iterable, Set

from collector.family import GAUGE, Family
from collector.whereabouts import Pool, Reservation, index_ranges, pool_stats
from collector.whereabouts_ranges import RangeConfig

POOL_LABELS = ("pool", "range", "network")


def ippool_families(pools: Iterable[Pool], ranges: Iterable[RangeConfig], pods: Set[str],
                    reservations: Iterable[Reservation] | None = None,
                    small_ranges: bool = False) -> list[Family]:
    size = Family("planewatch_ippool_size", GAUGE,
                  "Addresses a Whereabouts pool can hand out: its range without network/broadcast, "
                  "outside range_start..range_end and exclude of the NADs using it.", POOL_LABELS)
    allocated = Family("planewatch_ippool_allocated", GAUGE,
                       "Allocations recorded in a Whereabouts pool (spec.allocations inside the range).",
                       POOL_LABELS)
    free = Family("planewatch_ippool_free", GAUGE,
                  "Allocatable addresses of a Whereabouts pool not allocated.", POOL_LABELS)
    leaked = Family("planewatch_ippool_leaked", GAUGE,
                    "Allocations of a Whereabouts pool whose podref names a pod that does not exist "
                    "(IPAMClaim-owned allocations excepted).", POOL_LABELS)
    invalid = Family("planewatch_ippool_invalid_entries", GAUGE,
                     "Parts of a Whereabouts pool that cannot be used: a bad range, bad allocation keys or values.",
                     ("pool", "reason"))
    index = index_ranges(ranges)
    for pool in sorted(pools, key=lambda p: p.key):
        for reason in sorted(pool.errors):
            invalid.add((pool.key, reason), pool.errors[reason])
        stats = pool_stats(pool, index, pods, small_ranges)
        if stats is None:
            continue
        size.add(stats.labels, stats.size)
        allocated.add(stats.labels, stats.allocated)
        free.add(stats.labels, stats.free)
        leaked.add(stats.labels, stats.leaked)
    families = [size, allocated, free, leaked, invalid]
    if reservations is not None:
        held = list(reservations)
        total = Family("planewatch_ippool_overlapping_reservations", GAUGE,
                       "Whereabouts OverlappingRangeIPReservations (one per IP held across overlapping ranges).")
        total.add((), len(held))
        gone = Family("planewatch_ippool_overlapping_reservations_leaked", GAUGE,
                      "OverlappingRangeIPReservations whose podref names a pod that does not exist.")
        gone.add((), sum(1 for r in held if r.podref and not r.claimed and r.podref not in pods))
        families += [total, gone]
    return families
