"""Netlink round trips of every pod netns in one call (kernel/nlbatch.c).

A scrape asks each pod netns for its links' counters (an RTM_GETSTATS dump)
and its gateways' neighbour entries (RTM_GETNEIGH gets). `StatsDumps` and
`Requests` make those requests for every namespace in one ctypes call, which
releases the GIL; the sources start them before any source runs (`prefetch`)
on the one thread that reads the batch sockets (`submit`), so the kernel's
work overlaps the Python of the sources collected meanwhile. At 250 pod
namespaces the counters took 4.1-4.8 ms of Python and take 2.3-2.7 ms, 1.9 of
them outside the GIL (bench/RESULTS.md). The library is built by `make -C
kernel` (the top Makefile's `deps`, the image's build stage); when it is not
there, or fails to load, the same classes run the Python path, with the same
results (tests/test_nlbatch.py and tests/test_neighbours.py run both).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from kernel.clib import open_library
from kernel.rtnl import RECV_BUF, RtnlSocket, answers, waiting_for

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
    lib, _lib_state = open_library(LIBRARY, "PLANEWATCH_NO_NLBATCH", ("pw_stats64_dumps", "pw_requests"))
    if lib is None:
        log.debug("kernel/nlbatch: %s; counters are read by the Python path", _lib_state)
        return None
    p = ctypes.c_void_p
    lib.pw_stats64_dumps.argtypes = [ctypes.c_int, p, p, p, p, p, p, p, ctypes.c_size_t]
    lib.pw_stats64_dumps.restype = ctypes.c_int
    lib.pw_requests.argtypes = [ctypes.c_int, p, p, p, p, p, p, ctypes.c_size_t, p, p, p, ctypes.c_size_t]
    lib.pw_requests.restype = ctypes.c_int
    _lib = lib
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
        lib = _load() if native else None
        self._fn = lib.pw_stats64_dumps if lib is not None else None
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


class Requests:
    """Non-dump requests (gets) on each socket, in the same three steps as
    StatsDumps: made here from (socket, request type, bodies), `run()` (one C
    call for every socket, GIL released), then `answers(i, reply)`: (index into
    that socket's bodies, buf, start, end) of each `reply` message, as
    RtnlSocket._requests yields them; a socket whose round trip failed raises
    its OSError there. Without the library (or native=False) run() reads each
    socket through RtnlSocket._requests."""

    ANSWER_ROOM = 256       # bytes of out reserved per request (a neighbour answer is 60-110)

    def __init__(self, asks: Sequence[tuple[RtnlSocket, int, list[bytes]]], native: bool = True):
        self.asks = list(asks)
        lib = _load() if native else None
        self._fn = lib.pw_requests if lib is not None else None
        self._python: list | None = None
        if self._fn is None:
            return
        n = len(self.asks)
        self.first = []
        datagrams = []
        for sock, request, bodies in self.asks:
            first, datagram = sock.requests_datagram(request, bodies) if bodies else (0, b"")
            self.first.append(first)
            datagrams.append(datagram)
        offsets, total = [0], 0
        for d in datagrams:
            total += len(d)
            offsets.append(total)
        self.requests = b"".join(datagrams)
        self.offsets = (ctypes.c_uint64 * (n + 1))(*offsets)
        self.fds = (ctypes.c_int * n)(*(sock.fileno() for sock, _, _ in self.asks))
        self.first_seq = (ctypes.c_uint32 * n)(*self.first)
        self.expect = (ctypes.c_uint32 * n)(*(len(bodies) for _, _, bodies in self.asks))
        self.cap = self.ANSWER_ROOM * sum(len(bodies) for _, _, bodies in self.asks) + 4096
        self.out = ctypes.create_string_buffer(self.cap)
        self.spans = (ctypes.c_uint64 * (2 * max(n, 1)))()
        self.result = (ctypes.c_int64 * max(n, 1))()

    def run(self, reply: int) -> None:
        """The round trips; `reply`: the message type a request's answer has
        (the Python path reads and keeps the replies right away)."""
        if self._fn is None:
            self._python = []
            for sock, request, bodies in self.asks:
                try:
                    self._python.append(list(sock._requests(request, reply, bodies)))
                except OSError as err:
                    self._python.append(err)
            return
        if self.asks:
            _, address = _receive_buffer()
            self._fn(len(self.asks), self.fds, self.requests, self.offsets, self.first_seq, self.expect,
                     self.out, self.cap, self.spans, self.result, address, RECV_BUF)

    def answers(self, i: int, reply: int):
        if self._python is not None:
            got = self._python[i]
            if isinstance(got, OSError):
                raise got
            yield from got
            return
        code = self.result[i]
        sock, request, bodies = self.asks[i]
        if code == -errno.ENOSPC:
            # more than ANSWER_ROOM a request: ask again, in Python, on the thread
            # that reads this socket (another batch may be reading it right now)
            yield from submit(lambda: list(sock._requests(request, reply, bodies))).result()
            return
        if code < 0:
            raise OSError(-code, os.strerror(-code))
        start = self.spans[2 * i]
        buf = ctypes.string_at(ctypes.addressof(self.out) + start, self.spans[2 * i + 1] - start)
        yield from answers(buf, waiting_for(self.first[i], len(bodies)), reply)


_worker: ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def submit(fn, *args) -> Future:
    """Run `fn(*args)` on the one thread that reads the batch sockets (a socket
    read by two threads at once mixes their replies): batches of several
    sources queue there one after the other."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlbatch")
        return _worker.submit(fn, *args)


def run(native: bool, fn, *args):
    """`fn(*args)` where the sockets it reads may be read: on the batch thread
    when `native` (they are batch sockets), else here (the caller's own)."""
    return submit(fn, *args).result() if native else fn(*args)


class Started:
    """What a source started in prefetch() for one snapshot: its work (the batch
    and what goes with it) and the run on the batch thread."""

    __slots__ = ("started_for", "_work", "_future")

    def __init__(self) -> None:
        self.started_for: object = None
        self._work: object = None
        self._future: Future | None = None

    def start(self, snapshot, work, fn, *args) -> None:
        self.started_for, self._work, self._future = snapshot, work, submit(fn, *args)

    def take(self, snapshot):
        """The work started for `snapshot`, its run done; None when none was. Either
        way nothing of it is in flight afterwards (its sockets are free)."""
        made_for, work, future = self.started_for, self._work, self._future
        self.started_for = self._work = self._future = None
        if future is None:
            return None
        future.result()
        return work if made_for is snapshot else None


def _python_dump(sock: RtnlSocket, cap: int) -> dict[int, tuple[int, ...]] | None | OSError:
    try:
        stats = sock.stats64()
    except OSError as err:
        return err
    return stats if len(stats) <= cap else None

