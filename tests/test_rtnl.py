"""The raw rtnetlink reader against pyroute2's decoding of the same namespace."""
from __future__ import annotations

import subprocess

import pytest
from pyroute2 import IPRoute

from kernel.nsenter import in_netns
from kernel.rtnl import RtnlSocket, new_socket, parse_link
from lab.traffic import udp_exchange
from tests.conftest import unique_prefix

STATS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_errors", "tx_errors",
         "rx_dropped", "tx_dropped")


@pytest.fixture
def two_ns(root):
    p = unique_prefix("pwrt")
    a, b = f"{p}-a", f"{p}-b"
    cmds = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
            ["ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b],
            ["ip", "-n", a, "link", "add", "dummyish", "mtu", "9000", "type", "veth", "peer", "name", "down0"],
            ["ip", "-n", a, "addr", "add", "10.252.0.1/24", "dev", "eth0"],
            ["ip", "-n", a, "addr", "add", "fd00:252::1/64", "dev", "eth0", "nodad"],
            ["ip", "-n", b, "addr", "add", "10.252.0.2/24", "dev", "eth0"],
            ["ip", "-n", a, "link", "set", "eth0", "up"], ["ip", "-n", b, "link", "set", "eth0", "up"],
            ["ip", "-n", a, "link", "set", "lo", "up"]]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def pyroute2_links(ns: str) -> dict[int, dict]:
    with in_netns(f"/run/netns/{ns}"):
        ipr = IPRoute()
    try:
        out = {}
        for msg in ipr.get_links():
            stats = msg.get("stats64") or {}
            out[msg["index"]] = {
                "name": msg.get("ifname"), "mac": msg.get("address"), "mtu": msg.get("mtu"),
                # our rule: operstate up, or unknown while admin-up with carrier (lo, tun)
                "up": msg.get("operstate") == "UP" or (
                    msg.get("operstate") == "UNKNOWN" and msg["flags"] & 0x10001 == 0x10001),
                "kind": msg.get(("linkinfo", "kind")) or "",
                **{k: stats.get(k, 0) for k in STATS}}
        addrs = sorted((m["index"], m.get("local") or m.get("address"), m["prefixlen"])
                       for m in ipr.get_addr())
        return out, addrs
    finally:
        ipr.close()


def test_links_match_pyroute2(two_ns):
    a, b = two_ns
    assert udp_exchange(b, a, "10.252.0.1", count=20, size=300) == 20
    sock = RtnlSocket.open(f"/run/netns/{a}")
    try:
        ours = {l.ifindex: l for l in sock.links()}
        theirs, their_addrs = pyroute2_links(a)
        # counters move with background traffic (ND, ARP); re-read ours right after theirs
        ours_again = {l.ifindex: l for l in sock.links()}
        ours_addrs = sorted(sock.addresses())
    finally:
        sock.close()
    assert set(ours) == set(theirs) and len(ours) == 4
    for idx, want in theirs.items():
        for field in ("name", "mac", "mtu", "up", "kind"):
            assert getattr(ours[idx], field) == want[field], (idx, field)
        for field in STATS:
            lo, hi = getattr(ours[idx], field), getattr(ours_again[idx], field)
            assert lo <= want[field] <= hi, (idx, field, lo, want[field], hi)
    eth0 = next(l for l in ours_again.values() if l.name == "eth0")
    assert eth0.rx_packets >= 20 and eth0.rx_bytes >= 20 * 300
    assert next(l for l in ours.values() if l.name == "dummyish").mtu == 9000
    assert next(l for l in ours.values() if l.name == "dummyish").up is False
    assert ours_addrs == their_addrs


def test_socket_stays_in_its_namespace(two_ns):
    a, _ = two_ns
    sock = RtnlSocket.open(f"/run/netns/{a}")
    try:
        names = {l.name for l in sock.links()}
    finally:
        sock.close()
    assert names == {"lo", "eth0", "dummyish", "down0"}
    # and the thread came back: the host namespace has none of those veths
    host = {l.name for l in RtnlSocket.open().links()}
    assert "dummyish" not in host


def test_parse_link_skips_unknown_and_truncated_attributes():
    import struct
    ifinfo = struct.pack("=BxHiII", 0, 1, 7, 0x10001, 0)
    name = b"net1\0"
    attr_name = struct.pack("=HH", 4 + len(name), 3) + name + b"\0" * ((4 - len(name) % 4) % 4)
    unknown = struct.pack("=HH", 8, 999) + b"\1\2\3\4"
    short_stats = struct.pack("=HH", 12, 23) + b"\0" * 8          # too short: ignored
    mtu = struct.pack("=HHI", 8, 4, 1450)
    buf = ifinfo + attr_name + unknown + short_stats + mtu
    link = parse_link(buf, 0, len(buf))
    assert (link.ifindex, link.name, link.mtu, link.rx_packets) == (7, "net1", 1450, 0)
    assert link.up is True      # operstate unknown, IFF_UP and IFF_LOWER_UP set


def test_getstats_matches_getlink_counters(two_ns):
    a, b = two_ns
    assert udp_exchange(b, a, "10.252.0.1", count=15, size=500) == 15
    sock = RtnlSocket.open(f"/run/netns/{a}")
    try:
        before = {l.ifindex: l for l in sock.links()}
        stats = sock.stats64()
        after = {l.ifindex: l for l in sock.links()}
    finally:
        sock.close()
    assert set(stats) == set(before)
    for idx, values in stats.items():
        for i, field in enumerate(("rx_packets", "tx_packets", "rx_bytes", "tx_bytes",
                                   "rx_errors", "tx_errors", "rx_dropped", "tx_dropped")):
            assert getattr(before[idx], field) <= values[i] <= getattr(after[idx], field), (idx, field)
    eth0 = next(l.ifindex for l in after.values() if l.name == "eth0")
    assert stats[eth0][0] >= 15 and stats[eth0][2] >= 15 * 500


def test_netns_events_count_what_changes_a_reader(two_ns):
    """One socket per netns, polled through one epoll: a link, an address, a route,
    a rule and an rp_filter change each move the generation once they are polled;
    nothing pending moves nothing; neighbour traffic is not subscribed."""
    from kernel.rtnl_events import EventPoller, NetnsEvents
    a, b = two_ns
    poller = EventPoller()
    events = {ns: NetnsEvents.open(f"/run/netns/{ns}") for ns in (a, b)}
    quiet = NetnsEvents.quiet()
    try:
        for e in (*events.values(), quiet):
            poller.add(e)
        ea, eb = events[a], events[b]

        def moved(*cmd) -> tuple[int, int]:
            before = ea.generation, eb.generation
            if cmd:
                subprocess.run(["ip", "-n", a, *cmd], check=True, capture_output=True)
            poller.poll()
            return ea.generation - before[0], eb.generation - before[1]

        assert moved() == (0, 0)
        assert moved("link", "set", "dummyish", "mtu", "1400") == (1, 0)
        assert moved() == (0, 0)                       # drained
        assert moved("addr", "add", "10.252.9.1/32", "dev", "dummyish") == (1, 0)
        assert moved("route", "add", "10.97.0.0/16", "via", "10.252.0.2") == (1, 0)
        assert moved("rule", "add", "from", "10.252.9.1", "table", "100") == (1, 0)
        assert moved("neigh", "add", "10.252.0.77", "lladdr", "02:00:00:00:00:77", "dev", "eth0") == (0, 0)
        with in_netns(f"/run/netns/{a}"):
            with open("/proc/sys/net/ipv4/conf/eth0/rp_filter", "w") as f:
                f.write("2")
        assert moved() == (1, 0)
        assert quiet.generation == 0
        # what a reader drains itself (update) is not counted twice by the next poll
        subprocess.run(["ip", "-n", b, "link", "set", "eth0", "mtu", "1300"], check=True)
        assert eb.update() == 1 and moved() == (0, 0)
        # removed before close: the poller forgets it, the others still work
        poller.remove(ea)
        ea.close()
        subprocess.run(["ip", "-n", b, "link", "set", "eth0", "mtu", "1280"], check=True)
        poller.poll()
        assert eb.generation == 2 and len(poller) == 2
    finally:
        for e in (*events.values(), quiet):
            e.close()
        poller.close()


def test_netns_events_overflow_counts_as_a_change(two_ns):
    """More notifications than the receive buffer holds: the kernel drops them and
    reports ENOBUFS (EPOLLERR); that is a change, not an error, and the socket
    goes on working."""
    from kernel.rtnl_events import EventPoller, NetnsEvents
    a, _ = two_ns
    with in_netns(f"/run/netns/{a}"):
        sock = new_socket(1, nonblocking=True, rcvbuf=1024)      # RTNLGRP_LINK, a tiny buffer
    events, poller = NetnsEvents(sock), EventPoller()
    try:
        poller.add(events)
        batch = "".join(f"link set dummyish mtu {1300 + i}\n" for i in range(200))
        subprocess.run(["ip", "-n", a, "-batch", "-"], input=batch, text=True, check=True)
        poller.poll()
        assert events.generation == 1
        poller.poll()
        assert events.generation == 1                 # drained, error cleared
        subprocess.run(["ip", "-n", a, "link", "set", "dummyish", "mtu", "1500"], check=True)
        poller.poll()
        assert events.generation == 2
    finally:
        events.close()
        poller.close()
