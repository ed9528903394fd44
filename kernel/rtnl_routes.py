"""Routes, policy rules and route lookups over kernel/rtnl.py's socket, for the
routes source: the same dicts routes_analysis documents, without pyroute2.

pyroute2 cost the collector's process ~10 MiB of RSS at import (190 modules)
for four message types; these decoders are ~100 lines and are checked against
pyroute2's decoding of the same namespaces (tests/test_rtnl_routes.py).
"""
from __future__ import annotations

import errno
import math
import socket
import struct

from kernel.rtnl import _RTATTR, _U32, NLM_F_REQUEST, NetlinkError, RtnlSocket
from kernel.rtnl import attrs as _attrs
from kernel.rtnl_neighbours import (
    _RTMSG,
    _RTNEXTHOP,
    RTA_DST,
    RTA_GATEWAY,
    RTA_MULTIPATH,
    RTA_OIF,
    RTA_TABLE,
    RTA_VIA,
    RTM_GETROUTE,
    RTM_NEWROUTE,
    _ip,
    _via,
)

RTM_NEWRULE, RTM_GETRULE = 32, 34
RTA_SRC = 2
FRA_SRC, FRA_PRIORITY, FRA_TABLE = 2, 6, 15
FAMILY_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}
# struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags
_FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")


def parse_route(buf: bytes, off: int, end: int) -> dict:
    """One RTM_NEWROUTE as routes.route_from_msg made it from pyroute2's message."""
    family, dst_len, _src_len, _tos, table, _proto, _scope, rtype, _flags = _RTMSG.unpack_from(buf, off)
    dst = gateway = ""
    oif = 0
    hops: list[int] = []
    for kind, vs, ve in _attrs(buf, off + _RTMSG.size, end):
        if kind == RTA_DST:
            dst = _ip(family, buf[vs:ve])
        elif kind == RTA_OIF:
            oif = _U32.unpack_from(buf, vs)[0]
        elif kind == RTA_GATEWAY:
            gateway = _ip(family, buf[vs:ve])
        elif kind == RTA_VIA:
            gateway = _via(buf[vs:ve])
        elif kind == RTA_TABLE:
            table = _U32.unpack_from(buf, vs)[0] or table
        elif kind == RTA_MULTIPATH:
            pos = vs
            while pos + _RTNEXTHOP.size <= ve:
                length, _nh_flags, _weight, ifindex = _RTNEXTHOP.unpack_from(buf, pos)
                if length < _RTNEXTHOP.size:
                    break
                hops.append(ifindex)
                pos += (length + 3) & ~3
    oifs = (oif,) if oif else tuple(hops)
    return {"family": FAMILY_VERSION.get(family, 0), "dst": f"{dst}/{dst_len}" if dst else "default",
            "table": table, "type": rtype, "oifs": tuple(i for i in oifs if i), "gateway": gateway}


def parse_rule(buf: bytes, off: int, end: int) -> dict:
    family, _dst_len, src_len, _tos, table, _r1, _r2, action, _flags = _FIB_RULE_HDR.unpack_from(buf, off)
    src, priority = "", 0
    for kind, vs, ve in _attrs(buf, off + _FIB_RULE_HDR.size, end):
        if kind == FRA_SRC:
            src = _ip(family, buf[vs:ve])
        elif kind == FRA_PRIORITY:
            priority = _U32.unpack_from(buf, vs)[0]
        elif kind == FRA_TABLE:
            table = _U32.unpack_from(buf, vs)[0] or table
    return {"family": FAMILY_VERSION.get(family, 0), "priority": priority,
            "src": f"{src}/{src_len}" if src else "", "table": table, "action": action}


def routes(sock: RtnlSocket, family: int) -> list[dict]:
    return sock._dump(RTM_GETROUTE, RTM_NEWROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), parse_route)


def rules(sock: RtnlSocket, family: int) -> list[dict]:
    return sock._dump(RTM_GETRULE, RTM_NEWRULE, _FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), parse_rule)


def routes_bounded(sock: RtnlSocket, family: int, limit: int) -> tuple[list[dict], bool]:
    """The first `limit` routes the kernel dumps, and whether there were more
    (then the socket is left busy: use it for nothing else)."""
    out, why = sock._dump_bounded(RTM_GETROUTE, RTM_NEWROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0),
                                  parse_route, limit, math.inf)
    return out, bool(why)


def rules_bounded(sock: RtnlSocket, family: int, limit: int) -> tuple[list[dict], bool]:
    out, why = sock._dump_bounded(RTM_GETRULE, RTM_NEWRULE, _FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, 0, 0),
                                  parse_rule, limit, math.inf)
    return out, bool(why)


def addresses(sock: RtnlSocket) -> list[dict]:
    return [_address(*row) for row in sock.addresses()]


def addresses_bounded(sock: RtnlSocket, limit: int) -> tuple[list[dict], bool]:
    """The first `limit` addresses, and whether there were more (the socket is
    then left busy, as by routes_bounded)."""
    rows, why = sock.addresses_bounded(limit, math.inf)
    return [_address(*row) for row in rows], bool(why)


def _address(ifindex: int, ip: str, prefixlen: int) -> dict:
    return {"ifindex": ifindex, "address": f"{ip}/{prefixlen}"}


def _attr(kind: int, value: bytes) -> bytes:
    return _RTATTR.pack(4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def route_get(sock: RtnlSocket, dst: str, src: str = "") -> dict:
    """`ip route get DST from SRC`: {"oif", "table", "type", "error": 0}; raises
    NetlinkError (errno: ENETUNREACH and the like) when the kernel refuses."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    # as pyroute2 and `ip route get` without `fibmatch`: the answer's table is
    # what the kernel reports by default (RTM_F_LOOKUP_TABLE not asked)
    body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0) + _attr(RTA_DST, socket.inet_pton(family, dst))
    if src:
        body += _attr(RTA_SRC, socket.inet_pton(family, src))
    for buf, start, end in sock.replies(sock.send_request(RTM_GETROUTE, NLM_F_REQUEST, body), RTM_NEWROUTE):
        route = parse_route(buf, start, end)
        return {"oif": route["oifs"][0] if route["oifs"] else 0, "table": route["table"],
                "type": route["type"], "error": 0}
    raise NetlinkError(errno.ENODATA, "no route in the answer")
