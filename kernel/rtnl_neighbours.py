"""Neighbour entries and route next hops over the same rtnetlink socket
(kernel/rtnl.py's framing and attribute walk), for collector/sources/neighbours.py:
RTM_GETNEIGH and RTM_GETROUTE dumps decoded into `Neighbour` and `NextHop`."""
from __future__ import annotations

import math
import socket
import struct
from dataclasses import dataclass

from kernel.rtnl import RtnlSocket, attrs, mac_text, pack_attr

_U32 = struct.Struct("=I")

RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NDA_DST, NDA_LLADDR, NDA_CACHEINFO = 1, 2, 3
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_MULTIPATH, RTA_TABLE, RTA_VIA = 1, 4, 5, 9, 15, 18
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
USER_HZ = 100           # nda_cacheinfo ages are clock_t: jiffies_to_clock_t() ticks

_NDMSG = struct.Struct("=BxxxiHBB")         # family, ifindex, state, flags, type
_CACHEINFO = struct.Struct("=IIII")         # confirmed, used, updated (ages), refcnt
_RTMSG = struct.Struct("=BBBBBBBBI")        # family, dst_len, src_len, tos, table, proto, scope, type, flags
_ROUTE_DUMP = _RTMSG.pack(0, 0, 0, 0, 0, 0, 0, 0, 0)     # every table, both families
_RTNEXTHOP = struct.Struct("=HBBi")         # len, flags, hops, ifindex
_FAMILY_LEN = {socket.AF_INET: 4, socket.AF_INET6: 16}


@dataclass(frozen=True, slots=True)
class Neighbour:
    ifindex: int
    address: str
    state: int                  # NUD_* bit
    lladdr: str = ""
    confirmed_age: float | None = None      # seconds; None without NDA_CACHEINFO
    used_age: float | None = None
    updated_age: float | None = None


@dataclass(frozen=True, slots=True)
class NextHop:
    """A route's gateway: the neighbour the route sends through."""
    ifindex: int
    gateway: str
    destination: str            # "default" or "prefix/len"
    table: int
    onlink: bool


def _ip(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw) if len(raw) == _FAMILY_LEN.get(socket.AddressFamily(family)) else ""


def parse_neigh(buf: bytes, off: int, end: int) -> Neighbour:
    """Decode one RTM_NEWNEIGH payload (ndmsg + attributes)."""
    family, ifindex, state, _flags, _type = _NDMSG.unpack_from(buf, off)
    address = lladdr = ""
    ages = (None, None, None)
    for kind_id, vs, ve in attrs(buf, off + _NDMSG.size, end):
        if kind_id == NDA_DST:
            address = _ip(family, buf[vs:ve])
        elif kind_id == NDA_LLADDR:
            lladdr = mac_text(buf[vs:ve])
        elif kind_id == NDA_CACHEINFO and ve - vs >= _CACHEINFO.size:
            confirmed, used, updated, _ = _CACHEINFO.unpack_from(buf, vs)
            ages = (confirmed / USER_HZ, used / USER_HZ, updated / USER_HZ)
    return Neighbour(ifindex, address, state, lladdr, *ages)


def _via(raw: bytes) -> str:
    """RTA_VIA: struct rtvia {u16 family; u8 addr[]} (an IPv4 route via an IPv6 next hop)."""
    if len(raw) < 2:
        return ""
    family = struct.unpack_from("=H", raw)[0]
    return _ip(family, raw[2:])


def parse_route_hops(buf: bytes, off: int, end: int) -> list[NextHop]:
    """The next hops (gateway + outgoing interface) of one RTM_NEWROUTE payload;
    none for a connected, local or blackhole route."""
    family, dst_len, _src, _tos, table, _proto, _scope, rtype, flags = _RTMSG.unpack_from(buf, off)
    if rtype != RTN_UNICAST:
        return []
    dst, oif, gateway = "", 0, ""
    multipath = None
    for kind_id, vs, ve in attrs(buf, off + _RTMSG.size, end):
        if kind_id == RTA_DST:
            dst = _ip(family, buf[vs:ve])
        elif kind_id == RTA_OIF:
            oif = _U32.unpack_from(buf, vs)[0]
        elif kind_id == RTA_GATEWAY:
            gateway = _ip(family, buf[vs:ve])
        elif kind_id == RTA_VIA:
            gateway = _via(buf[vs:ve])
        elif kind_id == RTA_TABLE:
            table = _U32.unpack_from(buf, vs)[0]
        elif kind_id == RTA_MULTIPATH:
            multipath = (vs, ve)
    destination = f"{dst}/{dst_len}" if dst else "default"
    hops = []
    if gateway and oif:
        hops.append(NextHop(oif, gateway, destination, table, bool(flags & RTNH_F_ONLINK)))
    if multipath:
        pos, stop = multipath
        while pos + _RTNEXTHOP.size <= stop:
            length, nh_flags, _hops, ifindex = _RTNEXTHOP.unpack_from(buf, pos)
            if length < _RTNEXTHOP.size:
                break
            for kind_id, vs, ve in attrs(buf, pos + _RTNEXTHOP.size, pos + length):
                if kind_id == RTA_GATEWAY:
                    hops.append(NextHop(ifindex, _ip(family, buf[vs:ve]), destination, table,
                                        bool(nh_flags & RTNH_F_ONLINK)))
                elif kind_id == RTA_VIA:
                    hops.append(NextHop(ifindex, _via(buf[vs:ve]), destination, table,
                                        bool(nh_flags & RTNH_F_ONLINK)))
            pos += (length + 3) & ~3
    return [h for h in hops if h.gateway]


def neighbours(sock: RtnlSocket) -> list[Neighbour]:
    """The netns's neighbour table, both families (RTM_GETNEIGH dump)."""
    return sock._dump(RTM_GETNEIGH, RTM_NEWNEIGH, _NDMSG.pack(0, 0, 0, 0, 0), parse_neigh)


def neighbour_gets(wanted) -> list[bytes]:
    """The RTM_GETNEIGH request bodies for (ifindex, address) pairs (an address
    that is not one is left out): built once, sent at every `read_neighbours`."""
    bodies = []
    for ifindex, address in wanted:
        try:
            raw = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        except OSError:
            continue
        family = socket.AF_INET6 if len(raw) == 16 else socket.AF_INET
        bodies.append(_NDMSG.pack(family, ifindex, 0, 0, 0) + pack_attr(NDA_DST, raw))
    return bodies


def read_neighbours(sock: RtnlSocket, bodies: list[bytes]) -> list[Neighbour]:
    """The entries `neighbour_gets` bodies ask for, one get each (all sent at
    once); an address with no entry is left out."""
    return [parse_neigh(buf, s, e) for _, buf, s, e in sock._requests(RTM_GETNEIGH, RTM_NEWNEIGH, bodies)]


def neighbours_of(sock: RtnlSocket, wanted) -> list[Neighbour]:
    """The entries of the (ifindex, address) pairs asked for, one RTM_GETNEIGH
    get each (all sent at once); an address with no entry is left out. A dump
    walks the kernel's whole neighbour table, every namespace's entries, to
    keep this one's: at 250 pod namespaces that is 250 walks of all of them."""
    return read_neighbours(sock, neighbour_gets(wanted))


def next_hops(sock: RtnlSocket) -> list[NextHop]:
    """Every unicast route's gateway in every table, both families (RTM_GETROUTE dump)."""
    per_route = sock._dump(RTM_GETROUTE, RTM_NEWROUTE, _ROUTE_DUMP, parse_route_hops)
    return [hop for hops in per_route for hop in hops]


def next_hops_bounded(sock: RtnlSocket, limit: int) -> tuple[list[NextHop], bool]:
    """`next_hops` of the first `limit` routes the kernel dumps, and whether
    there were more (then the dump was stopped half-way: reopen the socket)."""
    per_route, why = sock._dump_bounded(RTM_GETROUTE, RTM_NEWROUTE, _ROUTE_DUMP, parse_route_hops, limit, math.inf)
    return [hop for hops in per_route for hop in hops], bool(why)
