"""Every pod netns's interface counters in one call (kernel/nlbatch.c).

`stats64_dumps(sockets, caps)` is `[s.stats64() for s in sockets]` with the
round trips and the decoding done in C, in one ctypes call that releases the
GIL: at 250 pod namespaces a third of the Python path's time (numbers in
bench/RESULTS.md). The library is built by `make -C kernel` (the top Makefile's
`deps`, the image's build stage); when it is not there, or fails to load, the
same function runs the Python path, with the same results
(tests/test_nlbatch.py runs both on the same namespaces).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Sequence

from kernel.rtnl import RECV_BUF, RtnlSocket

log = logging.getLogger(__name__)

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "libplanewatch_nl.so")
DUMP_TRIES = 3          # nlbatch.c's: sequence numbers one dump may use
ROW_WORDS = 9           # struct pw_stats_row: ifindex + pad (one word), 8 counters

_lib = None
_lib_state = ""         # "" not tried, "ok", or why it is not used
_local = threading.local()


def _load():
    global _lib, _lib_state
    if _lib_state:
        return _lib
    if os.environ.get("PLANEWATCH_NO_NLBATCH"):
        _lib_state = "disabled by PLANEWATCH_NO_NLBATCH"
        return None
    try:
        lib = ctypes.CDLL(LIBRARY)
        fn = lib.pw_stats64_dumps
    except OSError as err:
        _lib_state = f"not loaded: {err}"
        log.debug("kernel/nlbatch: %s; counters are read by the Python path", _lib_state)
        return None
    p = ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, p, p, p, p, p, p, p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    _lib, _lib_state = fn, "ok"
    return _lib


def available() -> bool:
    """True when the C library is loaded (else stats64_dumps runs the Python path)."""
    return _load() is not None


def _receive_buffer():
    """This thread's receive buffer for the C side: an anonymous mapping, resident
    only as far as the largest datagram reached (as kernel/rtnl.py's)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        mem = mmap.mmap(-1, RECV_BUF)
        buf = _local.buf = (mem, ctypes.addressof(ctypes.c_char.from_buffer(mem)))
    return buf


class StatsDumps:
    """One RTM_GETSTATS dump on each socket, in three steps: made here (sequence
    numbers taken, arrays ready), `run()` (the round trips: the C call, which
    releases the GIL, so it may run on another thread while this one works),
    then `results()`: per socket, what RtnlSocket.stats64() returns (ifindex ->
    8 counters), None when the namespace had more than its cap of links (ask
    those per interface: RtnlSocket.stats64_of), or the OSError the round trip
    failed with. The sockets must stay open until run() returns. `native=False`:
    the Python path (RtnlSocket's own reads, which a test harness can wrap)."""

    def __init__(self, sockets: Sequence[RtnlSocket], caps: Sequence[int], native: bool = True):
        self.sockets, self.caps = list(sockets), list(caps)
        self._fn = _load() if native else None
        self._python: list | None = None
        if self._fn is None:
            return
        n = len(self.sockets)
        self.first, total = [], 0
        for cap in self.caps:
            self.first.append(total)
            total += cap
        self.fds = (ctypes.c_int * n)(*(s.fileno() for s in self.sockets))
        self.seqs = (ctypes.c_uint32 * n)()
        for i, sock in enumerate(self.sockets):
            self.seqs[i] = (sock._seq + 1) & 0xFFFFFFFF
            sock._seq = (sock._seq + DUMP_TRIES) & 0xFFFFFFFF
        self.rows = (ctypes.c_uint64 * (ROW_WORDS * max(total, 1)))()
        self.result = (ctypes.c_int64 * n)()

    def run(self) -> None:
        if self._fn is None:
            self._python = [_python_dump(sock, cap) for sock, cap in zip(self.sockets, self.caps)]
            return
        n = len(self.sockets)
        if n:
            _, address = _receive_buffer()
            self._fn(n, self.fds, self.seqs, self.rows, (ctypes.c_int64 * n)(*self.first),
                     (ctypes.c_int64 * n)(*self.caps), self.result, address, RECV_BUF)

    def results(self) -> list[dict[int, tuple[int, ...]] | None | OSError]:
        if self._python is not None:
            return self._python
        out: list[dict[int, tuple[int, ...]] | None | OSError] = []
        flat = memoryview(self.rows).cast("B").cast("Q")
        for i, cap in enumerate(self.caps):
            got = self.result[i]
            if got < 0:
                out.append(OSError(-got, os.strerror(-got)))
            elif got > cap:
                out.append(None)
            else:
                start = self.first[i] * ROW_WORDS
                words = flat[start:start + got * ROW_WORDS].tolist()
                out.append({words[k] & 0xFFFFFFFF: tuple(words[k + 1:k + ROW_WORDS])
                            for k in range(0, len(words), ROW_WORDS)})
        return out


def stats64_dumps(sockets: Sequence[RtnlSocket],
                  caps: Sequence[int]) -> list[dict[int, tuple[int, ...]] | None | OSError]:
    """StatsDumps made, run and read in the calling thread."""
    batch = StatsDumps(sockets, caps)
    batch.run()
    return batch.results()


def _python_dump(sock: RtnlSocket, cap: int) -> dict[int, tuple[int, ...]] | None | OSError:
    try:
        stats = sock.stats64()
    except OSError as err:
        return err
    return stats if len(stats) <= cap else None

