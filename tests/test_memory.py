"""collector/memory.py: the malloc trim after a collection happens only when
enough lies free in the arenas to be worth the page faults it causes."""
from __future__ import annotations

import ctypes

import pytest

from collector import memory

glibc = pytest.mark.skipif(not memory._glibc(), reason="not glibc: nothing to tune")


@glibc
def test_free_bytes_follows_what_was_freed():
    before = memory.free_bytes()
    assert before is not None and before >= 0
    # 64 KiB blocks stay below the fixed 128 KiB mmap threshold: heap chunks
    memory.tune_malloc()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(64)]
    # keep every other block: the freed ones cannot merge into the top chunk
    for block in blocks[::2]:
        libc.free(block)
    freed = memory.free_bytes()
    try:
        assert freed >= before + (1 << 20)       # 2 MiB freed (Python may reuse some)
        assert memory.trim(min_free=freed + (1 << 30)) is False     # not worth it: left alone
        assert memory.free_bytes() == freed
        assert memory.trim(min_free=0) is True
    finally:
        for block in blocks[1::2]:
            libc.free(block)
