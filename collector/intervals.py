"""Sets of integer addresses as sorted inclusive intervals (pure): what an IP
pool can hand out once ranges, start/end and exclusions are applied
(collector/whereabouts_ranges.py, collector/whereabouts.py)."""
from __future__ import annotations

import bisect
from typing import Iterable

Interval = tuple[int, int]        # inclusive [first, last] of integer addresses


def subtract(intervals: list[Interval], cut: Interval) -> list[Interval]:
    lo, hi = cut
    out = []
    for a, b in intervals:
        if b < lo or a > hi:
            out.append((a, b))
            continue
        if a < lo:
            out.append((a, lo - 1))
        if b > hi:
            out.append((hi + 1, b))
    return out


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def count(intervals: Iterable[Interval]) -> int:
    return sum(b - a + 1 for a, b in intervals)


def contains(merged: list[Interval], address: int) -> bool:
    i = bisect.bisect_right(merged, (address, float("inf"))) - 1
    return i >= 0 and merged[i][0] <= address <= merged[i][1]
