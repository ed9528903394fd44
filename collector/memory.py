"""glibc malloc settings for a long-lived collector on every node.

Each scrape builds and drops megabytes (families, a 3 MB body at 1 000
interfaces). glibc's default *dynamic* mmap threshold rises to the size of the
largest block freed, so after the first scrapes those buffers come from the
heap, and the heap's free pages stay resident: measured at 250 pods × 4
interfaces, RSS 58 MiB after the first collection, 81 MiB after 15 scrapes.
A fixed threshold (big buffers mmapped, unmapped on free), two arenas for our
few threads, and a trim after each collection (on the scrape worker, after the answer) kept it at
~59 MiB (bench/RESULTS.md); without the trim ~63 MiB. Since a scrape stopped
allocating a tuple per sample and 1 MiB per netlink datagram, ~1.3 MiB lies free
after one (measured at 250 pods x 4, a trim then returns ~0.7 MiB in 0.1 ms):
the trim runs only past TRIM_MIN_FREE, i.e. after something unusual (a burst of
pods, a /debug dump) left the arenas holding more.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
THRESHOLD = 128 * 1024          # glibc's initial default, made fixed
TRIM_MIN_FREE = 4 << 20         # trim only when this much lies free in the arenas

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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def free_bytes() -> int | None:
    """Bytes free inside malloc's arenas (mallinfo2 `fordblks`, glibc >= 2.33)."""
    libc = _glibc()
    if not libc or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().fordblks)


def trim(min_free: int = TRIM_MIN_FREE) -> bool:
    """Give the heap's free pages back (after a collection dropped its garbage),
    when at least `min_free` bytes lie free in the arenas: a trim walks every free
    chunk and the pages it returns fault back in at the next collection, so one
    that could return little costs more than it saves. True when it trimmed."""
    libc = _glibc()
    if not libc:
        return False
    free = free_bytes()
    if free is not None and free < min_free:
        return False
    libc.malloc_trim(0)
    return True
