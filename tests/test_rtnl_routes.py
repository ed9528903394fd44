"""kernel/rtnl_routes.py against pyroute2's decoding of the same namespace:
routes of every table (multipath, blackhole, IPv6), policy rules, addresses and
route lookups with and without a source, including refused ones."""
from __future__ import annotations

import errno
import subprocess

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as Pyroute2Error

from kernel import rtnl_routes
from kernel.nsenter import in_netns
from kernel.rtnl import NetlinkError, RtnlSocket
from tests.conftest import unique_prefix

FAMILY_VERSION = {2: 4, 10: 6}


# pyroute2 messages -> the dicts routes_analysis documents (what collector/routes.py
# did with pyroute2 before rtnl_routes): the reference the decoders must match.
def ref_route(msg) -> dict:
    dst = msg.get_attr("RTA_DST")
    oif = msg.get_attr("RTA_OIF")
    oifs = (oif,) if oif else tuple(hop.get("oif") for hop in msg.get_attr("RTA_MULTIPATH") or ())
    return {"family": FAMILY_VERSION.get(msg["family"], 0),
            "dst": f"{dst}/{msg['dst_len']}" if dst else "default",
            "table": msg.get_attr("RTA_TABLE") or msg["table"], "type": msg["type"],
            "oifs": tuple(i for i in oifs if i), "gateway": msg.get_attr("RTA_GATEWAY") or ""}


def ref_rule(msg) -> dict:
    src = msg.get_attr("FRA_SRC")
    return {"family": FAMILY_VERSION.get(msg["family"], 0), "priority": msg.get_attr("FRA_PRIORITY") or 0,
            "src": f"{src}/{msg['src_len']}" if src else "",
            "table": msg.get_attr("FRA_TABLE") or msg["table"], "action": msg["action"]}


def ref_address(msg) -> dict:
    ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
    return {"ifindex": msg["index"], "address": f"{ip}/{msg['prefixlen']}"}


@pytest.fixture
def routed_ns(root):
    ns = unique_prefix("pwrr")
    sh = [f"ip netns add {ns}",
          f"ip -n {ns} link add a0 type veth peer name a1",
          f"ip -n {ns} link add b0 type veth peer name b1",
          f"ip -n {ns} link set lo up",
          *[f"ip -n {ns} link set {d} up" for d in ("a0", "a1", "b0", "b1")],
          f"ip -n {ns} addr add 10.61.0.2/24 dev a0",
          f"ip -n {ns} addr add 10.62.0.2/24 dev b0",
          f"ip -n {ns} addr add fd61::2/64 dev a0 nodad",
          f"ip -n {ns} route add default via 10.61.0.1 dev a0",
          f"ip -n {ns} route add 10.70.0.0/16 nexthop via 10.61.0.1 dev a0 nexthop via 10.62.0.1 dev b0",
          f"ip -n {ns} route add blackhole 10.99.0.0/16",
          f"ip -n {ns} route add default via 10.62.0.1 dev b0 table 1100",
          f"ip -n {ns} route add unreachable 10.98.0.0/16 table 1100",
          f"ip -n {ns} -6 route add fd70::/48 via fd61::1 dev a0",
          f"ip -n {ns} rule add from 10.62.0.2/32 table 1100 priority 100",
          f"ip -n {ns} -6 rule add from fd61::2/128 table 1100 priority 101"]
    try:
        for line in sh:
            subprocess.run(line.split(), check=True, capture_output=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_routes_rules_and_addresses_match_pyroute2(routed_ns):
    path = f"/run/netns/{routed_ns}"
    with in_netns(path):
        ipr = IPRoute()
        sock = RtnlSocket.open()
    try:
        for family in (2, 10):
            want = [ref_route(m) for m in ipr.route("dump", family=family)]
            got = rtnl_routes.routes(sock, family)
            assert got == want
            assert [ref_rule(m) for m in ipr.rule("dump", family=family)] == rtnl_routes.rules(sock, family)
        assert [ref_address(m) for m in ipr.addr("dump")] == rtnl_routes.addresses(sock)
        routes = rtnl_routes.routes(sock, 2)
        multipath = [r for r in routes if r["dst"] == "10.70.0.0/16"]
        assert len(multipath) == 1 and len(multipath[0]["oifs"]) == 2        # both next hops seen
        assert any(r["table"] == 1100 and r["dst"] == "default" for r in routes)
        assert any(r["src"] == "10.62.0.2/32" and r["table"] == 1100 for r in rtnl_routes.rules(sock, 2))
    finally:
        ipr.close()
        sock.close()


@pytest.mark.parametrize("dst,src", [("10.61.0.9", ""), ("10.70.1.1", "10.62.0.2"), ("8.8.8.8", "10.62.0.2"),
                                     ("8.8.8.8", ""), ("fd70::5", ""), ("fd70::5", "fd61::2"),
                                     ("10.98.1.1", "10.62.0.2"), ("10.99.1.1", "")])
def test_route_lookups_match_pyroute2(routed_ns, dst, src):
    path = f"/run/netns/{routed_ns}"
    with in_netns(path):
        ipr = IPRoute()
        sock = RtnlSocket.open()
    try:
        kwargs = {"dst": dst, **({"src": src} if src else {})}
        try:
            msg = ipr.route("get", **kwargs)[0]
            want = {"oif": msg.get_attr("RTA_OIF") or 0, "table": msg.get_attr("RTA_TABLE") or msg["table"],
                    "type": msg["type"], "error": 0}
        except Pyroute2Error as err:
            want = {"error": err.code}
        try:
            got = rtnl_routes.route_get(sock, dst, src)
        except NetlinkError as err:
            got = {"error": err.errno}
        assert got == want
    finally:
        ipr.close()
        sock.close()


def test_a_refused_lookup_raises_with_its_errno(routed_ns):
    with in_netns(f"/run/netns/{routed_ns}"):
        sock = RtnlSocket.open()
    try:
        with pytest.raises(NetlinkError) as err:
            rtnl_routes.route_get(sock, "10.98.1.1", "10.62.0.2")      # unreachable route in table 1100
        assert err.value.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
    finally:
        sock.close()
