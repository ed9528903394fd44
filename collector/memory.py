"""glibc malloc settings for a long-lived collector on every node.

Each scrape builds and drops megabytes (families, a 3 MB body at 1 000
interfaces). glibc's default *dynamic* mmap threshold rises to the size of the
largest block freed, so after the first scrapes those buffers come from the
heap, and the heap's free pages stay resident: measured at 250 pods × 4
interfaces, RSS 58 MiB after the first collection, 81 MiB after 15 scrapes.
A fixed threshold (big buffers mmapped, unmapped on free), two arenas for our
few threads, and a trim after each collection (on the scrape worker, after the answer) kept it at
~59 MiB (bench/RESULTS.md); without the trim ~63 MiB.

Since the exposition is made in pieces below the threshold (exporters/exposition.py
CHUNK), a collection's garbage is mostly heap that the next collection reuses:
trimming it after every collection gave back ~0.8 MiB and cost the next one
~280 page faults (~1-2 ms on the dev VM). `Trimmer` trims only when the
process grew by more than TRIM_SLACK since its last trim: a collection that
made more garbage than usual (churn, a hostile pod) is still given back.
"""
from __future__ import annotations

import ctypes
import logging
import os
from typing import Callable

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
THRESHOLD = 128 * 1024          # glibc's initial default, made fixed
TRIM_SLACK = 2 << 20            # growth since the last trim worth giving back
PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:         # not glibc (musl): its allocator returns memory by itself
            _libc = False
    return _libc


def tune_malloc() -> bool:
    """Fixed mmap/trim thresholds and two arenas; False where there is no glibc."""
    libc = _glibc()
    if not libc:
        return False
    ok = all(libc.mallopt(option, value) == 1 for option, value in
             ((M_MMAP_THRESHOLD, THRESHOLD), (M_TRIM_THRESHOLD, THRESHOLD), (M_ARENA_MAX, 2)))
    if not ok:
        log.debug("mallopt refused a setting")
    return ok


def trim() -> None:
    """Give the heap's free pages back (after a collection dropped its garbage)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident set (the second field of /proc/self/statm)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


class Trimmer:
    """Calls `trim` after a collection when the resident set grew by more than
    `slack` bytes since the last trim (the first call always trims)."""

    def __init__(self, slack: int = TRIM_SLACK, rss: Callable[[], int] = resident_bytes,
                 trim: Callable[[], None] = trim):
        self.slack, self._rss, self._trim = slack, rss, trim
        self._after: int | None = None          # the resident set right after the last trim

    def __call__(self) -> bool:
        """True when it trimmed."""
        if self._after is not None and self._rss() - self._after <= self.slack:
            return False
        self._trim()
        self._after = self._rss()
        return True
