"""Enter a network namespace on the calling thread, and always come back.

setns(2) only moves the calling thread, so kernel work for pods runs on worker
threads, never on the aiohttp event loop. Python 3.11 has no os.setns: libc it is.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_lock = threading.local()


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_inode(path: str) -> int:
    return os.stat(path).st_ino


@contextlib.contextmanager
def in_netns(target: str | int):
    """Run the body with the calling thread inside netns `target` (path or fd).

    Sockets created inside stay bound to that netns after we switch back.
    Raises FileNotFoundError when a path vanished (a pod that just went away).
    """
    if getattr(_lock, "depth", 0):
        raise RuntimeError("nested in_netns on one thread")
    own = isinstance(target, str)
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC) if isinstance(target, str) else target
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(fd)
            _lock.depth = 1
            try:
                yield
            finally:
                setns(home)
                _lock.depth = 0
        finally:
            os.close(home)
    finally:
        if own:
            os.close(fd)
