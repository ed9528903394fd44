"""Raise permitted capabilities to effective at start.

The image gives its interpreter file capabilities as *permitted only* (`+p`,
deploy/Containerfile): exec never fails when a pod grants fewer than the image
lists (an `+ep` file whose capabilities cannot all be granted is refused by the
kernel), and what was granted is made effective here. A capability the pod did
not grant just disables its feature (e.g. no CAP_SYS_ADMIN: no setns, no BPF).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def raise_effective() -> tuple[int, int]:
    """Make every permitted capability effective. Returns (effective before, after)
    as 64-bit masks; (0, 0) when the calls are unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_Data * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            return 0, 0
        before = data[0].effective | data[1].effective << 32
        permitted = data[0].permitted | data[1].permitted << 32
        if before == permitted:
            return before, before
        for d in data:
            d.effective = d.permitted
        if libc.capset(ctypes.byref(header), data) != 0:
            log.warning("could not raise capabilities: errno %d", ctypes.get_errno())
            return before, before
        return before, permitted
    except (OSError, AttributeError) as err:
        log.debug("capabilities: %s", err)
        return 0, 0
