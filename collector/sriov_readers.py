"""Readers of SR-IOV VF counters, as the PF's driver exposes them.

Three layouts, all read from the PF side so VFs bound to vfio-pci (DPDK, no
netdev anywhere) are covered too:

- `sysfs-intel`: Intel out-of-tree drivers (i40e, ice, ...) write one value per
  file under `<pf device>/sriov/<N>/stats/<counter>`.
- `sysfs-mellanox`: Mellanox OFED writes one file `<pf device>/sriov/<N>/stats`
  of `key : value` lines (mlx5 `sriov_sysfs.c` `stats_show`).
- `netlink`: RTM_GETLINK on the PF with IFLA_EXT_MASK = RTEXT_FILTER_VF;
  IFLA_VFINFO_LIST -> IFLA_VF_INFO -> IFLA_VF_STATS. The kernel zero-fills
  IFLA_VF_STATS when the driver has no ndo_get_vf_stats, so a driver without
  VF stats shows zeros here: nothing in the message tells the two apart.

Every reader yields counters under one set of names (`COUNTERS` keys); a
counter the driver does not give is absent, never a zero.

The netlink part is split in two so tests can feed it messages: a transport
(`RtnlGetlink`, a callable pf-name -> reply bytes, on a socket opened once in
the host netns) and a pure decoder (`parse_getlink_reply`). The decoder is a
few struct reads (collector/vfinfo.py) rather than pyroute2: it runs at every scrape, one message
per PF, and tests check it against pyroute2-encoded messages.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping

from collector import vfinfo
from collector.sysfs_safe import SysfsError, as_sysfs
from kernel.nsenter import in_netns
from kernel.rtnl import new_socket, pack_attr, pack_message, receive

INTEL, MELLANOX, NETLINK, NONE = "sysfs-intel", "sysfs-mellanox", "netlink", "none"
DEFAULT_READERS = (INTEL, MELLANOX, NETLINK)

# canonical counter -> (metric name, help). Names follow the drivers' sysfs files.
COUNTERS: Mapping[str, tuple[str, str]] = {
    "rx_bytes": ("planewatch_vf_receive_bytes_total", "Bytes received by the SR-IOV VF, read from its PF."),
    "rx_packets": ("planewatch_vf_receive_packets_total", "Packets received by the SR-IOV VF, read from its PF."),
    "rx_dropped": ("planewatch_vf_receive_drops_total", "Received packets dropped for the SR-IOV VF."),
    "rx_broadcast": ("planewatch_vf_receive_broadcast_packets_total", "Broadcast packets received by the SR-IOV VF."),
    "rx_multicast": ("planewatch_vf_receive_multicast_packets_total", "Multicast packets received by the SR-IOV VF."),
    "tx_bytes": ("planewatch_vf_transmit_bytes_total", "Bytes transmitted by the SR-IOV VF, read from its PF."),
    "tx_packets": ("planewatch_vf_transmit_packets_total", "Packets transmitted by the SR-IOV VF, read from its PF."),
    "tx_dropped": ("planewatch_vf_transmit_drops_total", "Transmitted packets dropped for the SR-IOV VF."),
    "tx_errors": ("planewatch_vf_transmit_errors_total", "Transmit errors of the SR-IOV VF (Intel sysfs only)."),
    "tx_spoofed": ("planewatch_vf_transmit_spoofed_packets_total",
                   "Packets the SR-IOV VF sent with a spoofed source, dropped by the PF (Intel sysfs only)."),
    "tx_broadcast": ("planewatch_vf_transmit_broadcast_packets_total",
                     "Broadcast packets transmitted by the SR-IOV VF (Mellanox OFED sysfs only)."),
    "tx_multicast": ("planewatch_vf_transmit_multicast_packets_total",
                     "Multicast packets transmitted by the SR-IOV VF (Mellanox OFED sysfs only)."),
}

# ---------------------------------------------------------------- sysfs


@dataclass
class Reading:
    """One VF's counters from sysfs, and the files that failed (file -> reason).

    A failed file costs that counter (Intel: one file per counter) or that VF's
    counters (Mellanox: one file), never a neighbour's.
    """

    values: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def intel_stats_files(stats_dir: str, fs=None) -> tuple[str, ...] | None:
    """The counters this driver gives as files, listed once at resolution."""
    fs = as_sysfs(fs if fs is not None else _root_of(stats_dir))
    names = fs.listdir(stats_dir)
    if names is None:
        return None
    return tuple(name for name in COUNTERS if name in names)


def read_intel_stats(stats_dir: str, names: tuple[str, ...] = tuple(COUNTERS), fs=None,
                     real_dir: str = "") -> Reading | None:
    """Counters from a per-file stats directory; None when the directory is gone.

    `real_dir`: the directory as `Sysfs.resolve` gave it when the VF was
    resolved, so a scrape does one lstat per file, not a realpath walk each.
    """
    fs = as_sysfs(fs if fs is not None else _root_of(stats_dir))
    out = Reading()
    try:
        real_dir = real_dir or fs.resolve(stats_dir)
    except SysfsError as err:
        return Reading(errors={"stats": err.reason})
    for name in names:
        try:
            raw = fs.read_at(real_dir, name, limit=64)
        except SysfsError as err:
            out.errors[f"stats/{name}"] = err.reason
            continue
        if raw is None:
            if fs.kind(stats_dir) != "dir":
                return None
            continue            # this driver does not give that counter
        value = _parse_int(raw)
        if value is None:
            out.errors[f"stats/{name}"] = "invalid_value"
        else:
            out.values[name] = value
    return out


def parse_mellanox_stats(text: str) -> dict[str, int]:
    """`tx_packets    : 12` lines -> {name: value}, known names only."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or key not in COUNTERS:
            continue
        number = _parse_int(value.encode())
        if number is not None:
            out[key] = number
    return out


def read_mellanox_stats(path: str, fs=None, real_dir: str = "") -> Reading | None:
    """Counters from the single stats file; None when the file is gone."""
    fs = as_sysfs(fs if fs is not None else _root_of(path))
    try:
        raw = fs.read_at(real_dir, os.path.basename(path)) if real_dir else fs.read(path)
    except SysfsError as err:
        return Reading(errors={"stats": err.reason})
    if raw is None:
        return None
    return Reading(parse_mellanox_stats(raw.decode("ascii", "replace")))


def _root_of(path: str) -> str:
    """The sysfs root a bare `<root>/bus/pci/devices/...` or `<root>/devices/...` path lives in."""
    for marker in ("/bus/pci/devices/", "/devices/"):
        if marker in path:
            return path.split(marker, 1)[0] or "/"
    return "/"


def _parse_int(raw: bytes) -> int | None:
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if value >= 0 else None

# ---------------------------------------------------------------- netlink

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
RTM_NEWLINK, RTM_GETLINK = 16, 18
IFLA_IFNAME, IFLA_EXT_MASK = 3, 29
RTEXT_FILTER_VF = 1
IFLA_VFINFO_LIST, IFLA_VF_INFO, IFLA_VF_STATS = vfinfo.IFLA_VFINFO_LIST, vfinfo.IFLA_VF_INFO, vfinfo.IFLA_VF_STATS
VF_STATS_ATTRS = vfinfo.VF_STATS_ATTRS

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_U32 = struct.Struct("=I")
_ERRNO = struct.Struct("=i")


class PfNotFound(LookupError):
    """The PF netdev is not in the queried network namespace."""


def build_getlink_request(pf: str, seq: int) -> bytes:
    """RTM_GETLINK for one link by name, asking for its VF info."""
    name = pf.encode() + b"\0"
    attrs = (pack_attr(IFLA_IFNAME, name) + pack_attr(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_VF)))
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attrs
    return pack_message(RTM_GETLINK, NLM_F_REQUEST, seq, body)


def parse_getlink_vfs(buf: bytes) -> dict[int, vfinfo.VfInfo]:
    """VF index -> configuration and counters, from the reply to `build_getlink_request`.

    Raises PfNotFound for ENODEV and OSError for any other netlink error.
    A link without VFs (or a driver without SR-IOV) gives {}.
    """
    off = 0
    while off + _NLMSGHDR.size <= len(buf):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size or off + length > len(buf):
            raise OSError(errno.EBADMSG, "truncated netlink message")
        if mtype == NLMSG_ERROR:
            code = -_ERRNO.unpack_from(buf, off + _NLMSGHDR.size)[0]
            if code == errno.ENODEV:
                raise PfNotFound(os.strerror(code))
            if code:
                raise OSError(code, os.strerror(code))
        elif mtype == RTM_NEWLINK:
            return vfinfo.parse_link_vfs(buf, off + _NLMSGHDR.size + _IFINFOMSG.size, off + length)
        off += (length + 3) & ~3
    raise OSError(errno.EBADMSG, "no RTM_NEWLINK in reply")


def parse_getlink_reply(buf: bytes) -> dict[int, dict[str, int]]:
    """VF index -> counters (VFs whose reply carries IFLA_VF_STATS)."""
    return {i: info.stats for i, info in parse_getlink_vfs(buf).items() if info.stats is not None}


class RtnlGetlink:
    """Transport: pf name -> RTM_GETLINK reply bytes, on one kept socket.

    The socket is opened inside `netns` (a path; "" = the caller's own netns)
    the first time it is needed and stays bound there after the thread
    switches back, so scrapes do not setns.
    """

    def __init__(self, netns: str):
        self.netns = netns
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()

    def __call__(self, pf: str) -> bytes:
        with self._lock:
            sock = self._socket()
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            try:
                sock.send(build_getlink_request(pf, self._seq))
                while True:
                    reply = receive(sock)           # a PF with 128 VFs answers with ~60 KB
                    if len(reply) >= _NLMSGHDR.size and _NLMSGHDR.unpack_from(reply)[3] == self._seq:
                        return reply
            except OSError:
                self.close()        # a broken socket is reopened on the next call
                raise

    def _socket(self) -> socket.socket:
        if self._sock is None:
            if self.netns:
                with in_netns(self.netns):
                    self._sock = new_socket()
            else:
                self._sock = new_socket()
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class NetlinkVfStats:
    """The tiny interface the source uses: pf netdev -> {vf index: counters}.

    `transport` is any callable pf -> reply bytes; tests pass one that returns
    messages they built.
    """

    def __init__(self, transport: Callable[[str], bytes]):
        self.transport = transport

    def vf_info(self, pf: str) -> dict[int, vfinfo.VfInfo]:
        return parse_getlink_vfs(self.transport(pf))

    def vf_stats(self, pf: str) -> dict[int, dict[str, int]]:
        return parse_getlink_reply(self.transport(pf))

    def close(self) -> None:
        close = getattr(self.transport, "close", None)
        if close:
            close()
