"""kernel/gzstream.c: the gzip member deflated on its own thread while the
pieces are still coming, against Python's zlib (the path without the library),
and the HTTP answer Prometheus gets from it."""
from __future__ import annotations

import concurrent.futures
import errno
import gzip
import os
import random
import threading
import time

import pytest

from kernel import gzstream


def test_library_is_built():
    """`make test` builds it (kernel/Makefile): without it every other test
    here would pass on the Python path alone."""
    assert gzstream.available(), gzstream._lib_state


@pytest.fixture(params=["library", "python"])
def path(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(gzstream, "_lib", None)
        monkeypatch.setattr(gzstream, "_lib_state", "not loaded: test")
    return request.param


@pytest.fixture
def executor():
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as ex:
        yield ex


def pieces(seed: int) -> list[bytes]:
    """Exposition-like text and incompressible bytes, empty pieces among them:
    ~4.5 MB, so the member outgrows the first output buffer (256 KiB) twice."""
    rng = random.Random(seed)
    out = []
    for i in range(60):
        kind = rng.choice(("empty", "text", "random", "text"))
        if kind == "empty":
            out.append(b"")
        elif kind == "text":
            out.append(b"".join(b'planewatch_x{pod="p%d",interface="net%d"} %d\n' % (i, j, rng.randrange(10**12))
                                for j in range(rng.randrange(1, 3000))))
        else:
            out.append(os.urandom(rng.randrange(1, 200_000)))
    out.append(os.urandom(1_500_000))
    return out


def test_the_member_is_the_pieces_in_order(path, executor):
    parts = pieces(16)
    stream = gzstream.GzipStream(executor)
    for i in range(0, len(parts), 3):
        stream.feed(parts[i:i + 3])
    member = stream.finish()
    assert gzip.decompress(member) == b"".join(parts)
    assert member[:2] == b"\x1f\x8b"            # one gzip member, as Content-Encoding: gzip says


def test_nothing_fed_is_an_empty_member(path, executor):
    assert gzip.decompress(gzstream.GzipStream(executor).finish()) == b""


def test_pieces_from_another_thread_in_bursts(path, executor):
    """The feeding thread stops and starts: the deflating thread waits for
    pieces in between, and takes what queued up meanwhile."""
    parts = pieces(17)
    stream = gzstream.GzipStream(executor)

    def produce():
        for i, part in enumerate(parts):
            stream.feed([part])
            if i % 7 == 0:
                time.sleep(0.01)
    feeder = threading.Thread(target=produce)
    feeder.start()
    feeder.join()
    assert gzip.decompress(stream.finish()) == b"".join(parts)


def test_the_pieces_are_deflated_before_finish_and_then_let_go(executor):
    """What the library is for: the deflating runs while the feeding thread
    keeps the GIL busy. The feeder here spins in Python without a blocking
    call; the C loop still deflates every piece. (The Python path does none:
    it deflates in finish.) The stream lets go of a piece once deflated: its
    memory is free before the rest of the body is made."""
    parts = pieces(18)
    let_go = Probe()
    stream = gzstream.GzipStream(executor)
    stream.feed(parts + [let_go])
    del let_go
    deadline = time.monotonic() + 20
    while stream.done() < len(parts) + 1 and time.monotonic() < deadline:
        sum(range(1000))
    done = stream.done()
    stream.feed([b"next"])              # a feed drops what is deflated
    alive = Probe.alive
    member = stream.finish()
    assert done == len(parts) + 1
    assert alive == 0
    assert gzip.decompress(member) == b"".join(parts) + Probe.TEXT + b"next"


class Probe(bytes):
    """A piece that counts its live copies."""
    TEXT = b"probe\n" * 1000
    alive = 0

    def __new__(cls):
        Probe.alive += 1
        return super().__new__(cls, cls.TEXT)

    def __del__(self):
        Probe.alive -= 1


def test_finish_after_a_failed_collection(path, executor):
    """The collection raised half way: finish still ends the deflating thread
    (the executor is free again) and what was fed is a valid member."""
    parts = pieces(19)[:10]
    stream = gzstream.GzipStream(executor)
    try:
        stream.feed(parts)
        raise RuntimeError("a source failed")
    except RuntimeError:
        pass
    finally:
        member = stream.finish()
    assert gzip.decompress(member) == b"".join(parts)
    assert executor.submit(lambda: 42).result(timeout=5) == 42


def test_a_push_after_the_end_is_refused():
    lib = gzstream._load()
    assert lib is not None, gzstream._lib_state
    gz = lib.pw_gz_new(1)
    try:
        assert lib.pw_gz_push(gz, b"abc", 3) == 0
        lib.pw_gz_end(gz)
        assert lib.pw_gz_push(gz, b"def", 3) == errno.EINVAL
        assert gzstream._run(gz) == 0
        assert lib.pw_gz_done(gz) == 1
    finally:
        lib.pw_gz_free(gz)


def test_no_library_env_means_python(monkeypatch, executor):
    monkeypatch.setattr(gzstream, "_lib", None)
    monkeypatch.setattr(gzstream, "_lib_state", "")
    monkeypatch.setenv("PLANEWATCH_NO_GZSTREAM", "1")
    stream = gzstream.GzipStream(executor)
    stream.feed([b"a" * 1000])
    assert stream.done() == 0
    assert gzip.decompress(stream.finish()) == b"a" * 1000
    assert "PLANEWATCH_NO_GZSTREAM" in gzstream._lib_state


def test_a_library_lacking_a_symbol_its_python_side_calls_is_not_used(monkeypatch):
    """kernel/clib.py, the loader of both C libraries: a build older than its
    Python (a symbol missing) means the Python path, not an AttributeError at
    the first scrape; the switch variable turns a library off."""
    from kernel.clib import open_library

    monkeypatch.delenv("PLANEWATCH_TEST_NO_LIB", raising=False)
    lib, state = open_library(gzstream.LIBRARY, "PLANEWATCH_TEST_NO_LIB", ("pw_gz_new", "pw_gz_not_there"))
    assert lib is None and state.startswith("not loaded:") and "pw_gz_not_there" in state
    lib, state = open_library(gzstream.LIBRARY, "PLANEWATCH_TEST_NO_LIB", ("pw_gz_new",))
    assert lib is not None and state == "ok"
    monkeypatch.setenv("PLANEWATCH_TEST_NO_LIB", "1")
    assert open_library(gzstream.LIBRARY, "PLANEWATCH_TEST_NO_LIB", ()) == (None, "disabled by PLANEWATCH_TEST_NO_LIB")
