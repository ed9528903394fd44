"""A gzip member deflated beside the collection that makes its pieces
(kernel/gzstream.c).

`GzipStream(executor)` starts the deflating on one of `executor`'s threads;
`feed(pieces)` hands over pieces as they are rendered (they are not copied:
the stream keeps each alive until the C side has deflated it, then lets it
go), `finish()` waits for the rest and returns the member. The C loop never
needs the GIL between pieces, so the scrape thread's Python does not hold it
up (a Python thread calling zlib did not overlap at all: it waited up to the
switch interval for the GIL after each call). Without the library (not
built, or `PLANEWATCH_NO_GZSTREAM=1`) the same class deflates everything in
`finish` with Python's zlib: the same bytes, after the collection instead of
beside it (tests/test_gzstream.py).
"""
from __future__ import annotations

import ctypes
import logging
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import Executor

from kernel.clib import open_library

log = logging.getLogger(__name__)

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "libplanewatch_gz.so")
LEVEL = 1               # ~8 ms for the ~3.4 MB of 1 000 interfaces, 134 KB on the wire
Z_OK = 0

_lib = None            # the library through PyDLL
_run = None            # its pw_gz_run through CDLL
_lib_state = ""         # "" not tried, "ok", or why it is not used


def _load():
    global _lib, _run, _lib_state
    if _lib_state:
        return _lib
    # Two handles on the one library: pw_gz_run through CDLL, which lets go of
    # the GIL for the call; the rest through PyDLL, which keeps it. They take a
    # mutex for a moment and never wait; letting go of the GIL at each of the
    # ~200 pushes a scrape makes handed it to the netlink batch thread each
    # time and waited to get it back (~2 ms a scrape, py-spy).
    symbols = ("pw_gz_new", "pw_gz_push", "pw_gz_end", "pw_gz_run", "pw_gz_done", "pw_gz_output", "pw_gz_free")
    lib, _lib_state = open_library(LIBRARY, "PLANEWATCH_NO_GZSTREAM", symbols, dll=ctypes.PyDLL)
    if lib is None:
        log.debug("kernel/gzstream: %s; gzip is deflated after the collection", _lib_state)
        return None
    run = ctypes.CDLL(LIBRARY).pw_gz_run
    p = ctypes.c_void_p
    lib.pw_gz_new.argtypes = [ctypes.c_int]
    lib.pw_gz_new.restype = p
    lib.pw_gz_push.argtypes = [p, ctypes.c_char_p, ctypes.c_size_t]
    lib.pw_gz_push.restype = ctypes.c_int
    lib.pw_gz_end.argtypes = [p]
    lib.pw_gz_end.restype = None
    run.argtypes = [p]
    run.restype = ctypes.c_int
    lib.pw_gz_output.argtypes = [p, ctypes.POINTER(ctypes.c_void_p)]
    lib.pw_gz_output.restype = ctypes.c_size_t
    lib.pw_gz_done.argtypes = [p]
    lib.pw_gz_done.restype = ctypes.c_size_t
    lib.pw_gz_free.argtypes = [p]
    lib.pw_gz_free.restype = None
    _lib, _run = lib, run
    return _lib


def available() -> bool:
    return _load() is not None


def gzip(pieces: list[bytes], level: int = LEVEL) -> bytes:
    """One gzip member of the pieces, with Python's zlib."""
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return b"".join([c.compress(piece) for piece in pieces] + [c.flush()])


class GzipStream:
    def __init__(self, executor: Executor, level: int = LEVEL):
        self._level = level
        # Fed pieces the C side may still read (None once deflated: a body
        # nobody asked for plain is then never whole in memory, and each
        # family's text reuses the heap the last one freed)
        self._pieces: list[bytes | None] = []
        self._kept_from = 0                     # _pieces[:_kept_from] are let go
        lib = self._lib = _load()
        self._gz = lib.pw_gz_new(level) if lib is not None else None
        if self._gz is not None:
            assert _run is not None             # loaded with the library
            try:
                self._done = executor.submit(_run, self._gz)
            except BaseException:
                lib.pw_gz_free(self._gz)
                raise

    def feed(self, pieces: Sequence[bytes]) -> None:
        self._pieces.extend(pieces)
        if self._gz is None:
            return
        lib, gz = self._lib, self._gz
        for piece in pieces:
            if lib.pw_gz_push(gz, piece, len(piece)):
                raise MemoryError("gzip stream: no room for one more piece")
        done = lib.pw_gz_done(gz)
        for i in range(self._kept_from, done):
            self._pieces[i] = None
        self._kept_from = max(self._kept_from, done)

    def done(self) -> int:
        """Pieces deflated so far (without the library: none, everything
        waits for `finish`)."""
        return self._lib.pw_gz_done(self._gz) if self._gz is not None else 0

    def finish(self) -> bytes:
        """The member. Call it once, also when the collection failed: the
        deflating thread waits for it."""
        if self._gz is None:
            return gzip([piece for piece in self._pieces if piece is not None], self._level)
        lib, gz = self._lib, self._gz
        self._gz = None
        lib.pw_gz_end(gz)
        try:
            rc = self._done.result()
            if rc != Z_OK:
                raise zlib.error(f"gzip stream: deflate failed ({rc})")
            data = ctypes.c_void_p()
            size = lib.pw_gz_output(gz, ctypes.byref(data))
            return ctypes.string_at(data, size)
        finally:
            lib.pw_gz_free(gz)
            self._pieces = []
