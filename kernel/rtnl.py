"""A narrow rtnetlink reader for the per-scrape hot path.

pyroute2 is not loaded by `serve` (routes and rules: kernel/rtnl_routes.py).
Reading every pod interface's counters at every scrape is the one place where
its per-message parsing and per-netns socket set-up cost more than the kernel
does: bench/codecs.py decodes the same RTM_GETLINK bytes both ways (24 us a
link here against pyroute2's 144 us, on a loaded 2-core machine).
tests/test_rtnl.py checks every field against pyroute2's decoding of the same
namespace; bench/scrape.py holds the scrape's numbers.

A socket is opened while the thread is inside the target netns and stays bound
to it afterwards, so one kept socket per pod netns avoids setns at scrape time.
"""
from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Self, TypeVar

from kernel.nsenter import in_netns

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWSTATS, RTM_GETSTATS = 92, 94
IFLA_STATS_LINK_64 = 1

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_STATS64, IFLA_EXT_MASK = 16, 18, 23, 29
IFLA_CARRIER_CHANGES = 35
IFLA_INFO_KIND = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
IF_OPER_UNKNOWN, IF_OPER_UP = 0, 6
IFF_UP, IFF_LOWER_UP = 0x1, 0x10000

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_IF_STATS_MSG = struct.Struct("=BBHII")     # family, pad, pad, ifindex, filter_mask
_RTATTR = struct.Struct("=HH")
# rtnl_link_stats64: rx/tx packets, rx/tx bytes, rx/tx errors, rx/tx dropped.
_STATS8 = struct.Struct("=8Q")
# if_stats_msg's ifindex, then the first attribute's header and 8 u64s
_STATS_FIRST = struct.Struct("=4xIIHH8Q")
_U32 = struct.Struct("=I")
# RTM_GETSTATS for every link, IFLA_STATS_LINK_64 only
_STATS_DUMP = _IF_STATS_MSG.pack(0, 0, 0, 0, 1 << (IFLA_STATS_LINK_64 - 1))
T = TypeVar("T")

RECV_BUF = 1 << 20
_receive = threading.local()


def receive(sock: socket.socket) -> bytes:
    """One datagram of `sock`, up to RECV_BUF bytes, as bytes of its own length.

    `sock.recv(RECV_BUF)` would allocate 1 MiB for each datagram, which malloc
    serves with mmap/munmap (collector/memory.py fixes the threshold at 128 KiB)
    and the page faults after it: ~1 000 datagrams a scrape at 1 000 interfaces.
    Here each thread receives into one anonymous mapping of RECV_BUF, resident
    only as far as the largest datagram reached (dumps come in <= 32 KiB parts),
    and copies out the datagram."""
    buf = _receive_buffer()
    n = sock.recv_into(buf)
    return buf[:n]


def _receive_buffer() -> mmap.mmap:
    buf = getattr(_receive, "buf", None)
    if buf is None:
        buf = _receive.buf = mmap.mmap(-1, RECV_BUF)
    return buf


# Why a bounded dump stopped early.
CUT_LIMIT, CUT_TIME = "limit", "time"
# The time budget applies only past this many messages: a small (honest)
# namespace whose read was slow because the machine was busy is never cut.
TIME_CUT_AFTER = 128


class NetlinkError(OSError):
    pass


@dataclass(frozen=True, slots=True)
class LinkStats:
    ifindex: int
    name: str
    mac: str
    mtu: int
    up: bool
    kind: str
    rx_packets: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_errors: int = 0
    tx_errors: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0
    master: int = 0         # IFLA_MASTER: the bridge/bond this link is a port of
    carrier_changes: int = 0        # IFLA_CARRIER_CHANGES: up and down transitions since creation


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def attrs(buf, start: int, end: int):
    """(type without the NLA_F_* flags, value_start, value_end) of each rtattr in
    buf[start:end]. The one bounds check every decoder here relies on: an
    attribute shorter than its header or reaching past `end` ends the walk, so a
    value slice never extends beyond its message (or its parent attribute)."""
    while start + 4 <= end:
        length, kind = _RTATTR.unpack_from(buf, start)
        if length < 4 or start + length > end:
            return
        yield kind & 0x3FFF, start + 4, start + length
        start += (length + 3) & ~3


def pack_attr(kind: int, payload: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    raw = _RTATTR.pack(_RTATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def pack_message(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def drain(sock: socket.socket) -> bool:
    """Read every pending notification of a non-blocking subscribed socket; True
    when there was any (or some were lost: ENOBUFS means something changed)."""
    seen = False
    while True:
        try:
            if not sock.recv_into(_receive_buffer()):      # read and dropped: no copy
                return seen
            seen = True
        except BlockingIOError:
            return seen
        except OSError as err:
            if err.errno != errno.ENOBUFS:
                raise
            seen = True


def parse_link(buf: bytes, off: int, end: int) -> LinkStats:
    """Decode one RTM_NEWLINK payload (ifinfomsg + attributes)."""
    _family, _type, ifindex, flags, _change = _IFINFOMSG.unpack_from(buf, off)
    name = mac = kind = ""
    mtu = master = carrier_changes = 0
    operstate = IF_OPER_UNKNOWN
    stats = (0,) * 8
    for kind_id, vs, ve in attrs(buf, off + _IFINFOMSG.size, end):
        if kind_id == IFLA_IFNAME:
            name = buf[vs:ve].split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind_id == IFLA_STATS64 and ve - vs >= _STATS8.size:
            stats = _STATS8.unpack_from(buf, vs)
        elif kind_id == IFLA_MTU and ve - vs >= 4:
            mtu = _U32.unpack_from(buf, vs)[0]
        elif kind_id == IFLA_MASTER and ve - vs >= 4:
            master = _U32.unpack_from(buf, vs)[0]
        elif kind_id == IFLA_OPERSTATE and ve > vs:
            operstate = buf[vs]
        elif kind_id == IFLA_CARRIER_CHANGES and ve - vs >= 4:
            carrier_changes = _U32.unpack_from(buf, vs)[0]
        elif kind_id == IFLA_ADDRESS:
            mac = mac_text(buf[vs:ve])
        elif kind_id == IFLA_LINKINFO:
            for sub, ss, se in attrs(buf, vs, ve):
                if sub == IFLA_INFO_KIND:
                    kind = buf[ss:se].split(b"\0", 1)[0].decode("ascii", "replace")
    # node_exporter's `up` is operstate == up; devices that never report an
    # operstate (tun, some virtual ones) count as up when admin-up with carrier.
    up = operstate == IF_OPER_UP or (
        operstate == IF_OPER_UNKNOWN and flags & IFF_UP and flags & IFF_LOWER_UP)
    rxp, txp, rxb, txb, rxe, txe, rxd, txd = stats
    return LinkStats(ifindex, name, mac, mtu, bool(up), kind, rxp, txp, rxb, txb, rxe, txe, rxd, txd, master,
                     carrier_changes)


def parse_addr(buf: bytes, off: int, end: int) -> tuple[int, str, int]:
    """Decode one RTM_NEWADDR payload into (ifindex, address, prefixlen)."""
    family, prefixlen, _flags, _scope, ifindex = _IFADDRMSG.unpack_from(buf, off)
    local = address = None
    for kind_id, vs, ve in attrs(buf, off + _IFADDRMSG.size, end):
        if kind_id == IFA_LOCAL:
            local = buf[vs:ve]
        elif kind_id == IFA_ADDRESS:
            address = buf[vs:ve]
    raw = local or address or b""
    fam = socket.AF_INET if family == socket.AF_INET else socket.AF_INET6
    text = socket.inet_ntop(fam, raw) if len(raw) in (4, 16) else ""
    return ifindex, text, prefixlen


def parse_stats(buf: bytes, off: int, end: int) -> tuple[int, tuple[int, ...]]:
    """Decode one RTM_NEWSTATS payload into (ifindex, 8 counters)."""
    if end - off >= _STATS_FIRST.size:
        # what the kernel sends for our filter: the stats64 attribute first, so
        # one unpack (this runs for every link of every pod, every scrape)
        fields = _STATS_FIRST.unpack_from(buf, off)
        if fields[3] == IFLA_STATS_LINK_64 and fields[2] >= 4 + _STATS8.size:
            return fields[0], fields[4:]
    ifindex = _IF_STATS_MSG.unpack_from(buf, off)[3]
    for kind, vs, ve in attrs(buf, off + _IF_STATS_MSG.size, end):
        if kind == IFLA_STATS_LINK_64 and ve - vs >= _STATS8.size:
            return ifindex, _STATS8.unpack_from(buf, vs)
    return ifindex, (0,) * 8


class RtnlSocket:
    """One NETLINK_ROUTE socket, bound to the netns it was opened in."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._seq = 0

    @classmethod
    def open(cls, netns: str | int | None = None) -> "RtnlSocket":
        """Open in the calling thread's netns, or inside `netns` (path or fd)."""
        if netns is None:
            return cls(new_socket())
        with in_netns(netns):
            return cls(new_socket())

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def links(self) -> list[LinkStats]:
        return self._dump(RTM_GETLINK, RTM_NEWLINK, _IFINFOMSG.pack(0, 0, 0, 0, 0), parse_link)

    def links_bounded(self, limit: int, deadline: float) -> tuple[list[LinkStats], str]:
        """At most `limit` links, read and decoded until `deadline` (time.monotonic):
        (links, "" | CUT_LIMIT | CUT_TIME). A cut dump leaves the socket busy: reopen it."""
        return self._dump_bounded(RTM_GETLINK, RTM_NEWLINK, _IFINFOMSG.pack(0, 0, 0, 0, 0),
                                  parse_link, limit, deadline)

    def addresses_bounded(self, limit: int, deadline: float) -> tuple[list[tuple[int, str, int]], str]:
        return self._dump_bounded(RTM_GETADDR, RTM_NEWADDR, _IFADDRMSG.pack(0, 0, 0, 0, 0),
                                  parse_addr, limit, deadline)

    def link_by_name(self, name: str) -> LinkStats | None:
        """One link by name (RTM_GETLINK with IFLA_IFNAME, no dump); None when absent."""
        raw = name.encode()
        if not raw or len(raw) > 15 or b"\0" in raw:     # no such interface name can exist (IFNAMSIZ)
            return None
        raw += b"\0"
        attr = _RTATTR.pack(4 + len(raw), IFLA_IFNAME) + raw + b"\0" * (-len(raw) % 4)
        for _, buf, s, e in self._requests(RTM_GETLINK, RTM_NEWLINK, [_IFINFOMSG.pack(0, 0, 0, 0, 0) + attr]):
            return parse_link(buf, s, e)
        return None

    def stats64_of(self, ifindexes) -> dict[int, tuple[int, ...]]:
        """stats64() for the given interfaces only, one RTM_GETSTATS each (no dump):
        a namespace holding thousands of links costs what its attachments cost."""
        mask = 1 << (IFLA_STATS_LINK_64 - 1)
        bodies = [_IF_STATS_MSG.pack(0, 0, 0, i, mask) for i in ifindexes]
        return dict(parse_stats(buf, s, e) for _, buf, s, e in self._requests(RTM_GETSTATS, RTM_NEWSTATS, bodies))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, msg_type: int, flags: int, body: bytes) -> list[bytes]:
        """One request (a change, with NLM_F_ACK, or a dump): the payloads of its
        replies; a negative acknowledgement raises OSError with its errno."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._sock.send(pack_message(msg_type, flags | NLM_F_REQUEST, self._seq, body))
        replies: list[bytes] = []
        while True:
            buf = receive(self._sock)
            for mtype, mseq, start, end in messages(buf):
                payload = buf[start:end]
                if mseq != self._seq:
                    continue
                if mtype == NLMSG_DONE:
                    return replies
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload, 0)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return replies
                replies.append(payload)
                if flags & NLM_F_DUMP != NLM_F_DUMP:
                    return replies

    def requests_datagram(self, request: int, bodies: list[bytes]) -> tuple[int, bytes]:
        """One datagram of non-dump requests, one per body (the kernel answers its
        messages one after the other), and the first one's sequence number."""
        first = (self._seq + 1) & 0xFFFFFFFF
        out = [pack_message(request, NLM_F_REQUEST, (first + i) & 0xFFFFFFFF, body) for i, body in enumerate(bodies)]
        self._seq = (first + len(bodies) - 1) & 0xFFFFFFFF
        return first, b"".join(out)

    def _requests(self, request: int, reply: int, bodies: list[bytes]):
        """Send one non-dump request per body, yield (index, buf, start, end) of
        each answer; an absent object (ENODEV and the like) yields nothing."""
        if not bodies:
            return
        first, datagram = self.requests_datagram(request, bodies)
        self._sock.send(datagram)
        waiting = waiting_for(first, len(bodies))
        while waiting:
            yield from answers(receive(self._sock), waiting, reply)

    def stats64(self) -> dict[int, tuple[int, ...]]:
        """ifindex -> the first 8 rtnl_link_stats64 counters (rx/tx packets, bytes,
        errors, dropped), by RTM_GETSTATS: ~250 bytes a link instead of ~1.5 KB."""
        return dict(self._dump(RTM_GETSTATS, RTM_NEWSTATS, _STATS_DUMP, parse_stats))

    def addresses(self) -> list[tuple[int, str, int]]:
        return self._dump(RTM_GETADDR, RTM_NEWADDR, _IFADDRMSG.pack(0, 0, 0, 0, 0), parse_addr)

    def _dump_bounded(self, request: int, reply: int, body: bytes, parse, limit: int, deadline: float):
        for _ in range(3):
            out: list = []
            try:
                for buf, start, end in self._dump_iter(request, reply, body):
                    if len(out) >= limit:
                        return out, CUT_LIMIT
                    if len(out) >= TIME_CUT_AFTER and time.monotonic() > deadline:
                        return out, CUT_TIME
                    out.append(parse(buf, start, end))
                return out, ""
            except NetlinkError as err:
                if err.errno != errno.EINTR:        # dump interrupted by a change: start over
                    raise
        return out, CUT_TIME

    def send_request(self, msg_type: int, flags: int, body: bytes) -> int:
        """Send one request; its sequence number, for `replies`."""
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        self._sock.send(pack_message(msg_type, flags, seq, body))
        return seq

    def replies(self, seq: int, reply: int):
        """(buf, start, end) of each `reply` message answering `seq`, as they arrive,
        until NLMSG_DONE or an ack; an NLMSG_ERROR with a code raises NetlinkError."""
        while True:
            buf = receive(self._sock)
            for mtype, mseq, start, end in messages(buf):
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", buf, start)[0]
                    if code == 0:
                        return                      # an ack
                    raise NetlinkError(code, os.strerror(code))
                if mtype == reply:
                    yield buf, start, end

    def _dump_iter(self, request: int, reply: int, body: bytes):
        """The messages of one dump as they arrive (the kernel fills the dump as it
        is read, so stopping early also stops the kernel's work)."""
        yield from self.replies(self.send_request(request, NLM_F_REQUEST | NLM_F_DUMP, body), reply)

    def _dump(self, request: int, reply: int, body: bytes, parse: Callable[[bytes, int, int], T]) -> list[T]:
        """Every reply of one dump, each as `parse(buf, start, end)` makes it (as
        they arrive: no list of spans in between)."""
        while True:
            try:
                return [parse(buf, start, end) for buf, start, end in self._dump_iter(request, reply, body)]
            except NetlinkError as err:
                if err.errno != errno.EINTR:        # dump interrupted by a change: start over
                    raise


def waiting_for(first: int, count: int) -> dict[int, int]:
    """Sequence number -> index of `count` requests numbered from `first`."""
    return {(first + i) & 0xFFFFFFFF: i for i in range(count)}


def answers(buf, waiting: dict[int, int], reply: int):
    """(index, buf, start, end) of each `reply` message in `buf` answering a
    request still in `waiting` (which each answer, reply or error, leaves)."""
    for mtype, mseq, start, end in messages(buf):
        index = waiting.pop(mseq, None)
        if index is not None and mtype == reply:
            yield index, buf, start, end


def messages(buf: bytes):
    """(type, seq, payload start, payload end) of each netlink message in one
    receive buffer; a header claiming less than itself is EBADMSG."""
    off = 0
    while off + _NLMSGHDR.size <= len(buf):
        length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size:
            raise NetlinkError(errno.EBADMSG, "short netlink message")
        yield mtype, mseq, off + _NLMSGHDR.size, off + length
        off += (length + 3) & ~3


def new_socket(groups: int = 0, *, nonblocking: bool = False, rcvbuf: int | None = RECV_BUF) -> socket.socket:
    """A NETLINK_ROUTE socket bound in the calling thread's netns (it stays bound
    there), subscribed to the multicast `groups` bitmask."""
    flags = socket.SOCK_RAW | socket.SOCK_CLOEXEC | (socket.SOCK_NONBLOCK if nonblocking else 0)
    sock = socket.socket(socket.AF_NETLINK, flags, NETLINK_ROUTE)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock
