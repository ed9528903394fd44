"""Gateway reachability: the neighbour/route codec against pyroute2 on a real
namespace, which gateways belong to which attachment, probe-target validation,
the metric families, the rate bound, and ARP/NDP probes on real veths."""
from __future__ import annotations

import os
import socket
import subprocess

import pytest
from pyroute2 import IPRoute

from collector import gateway_probe as gp
from collector.budgets import Budgets
from collector.model import Attachment, InterfaceView, Link, Pod, PodView
from collector.planes import PlaneSelector
from collector.sources.neighbours import (
    STATE_NAMES,
    Gateway,
    canonical,
    gateways_of,
    neighbour_families,
    on_link_source,
    probe_families,
    probe_targets,
    read_gateways,
    state_name,
)
from exporters.exposition import render
from kernel.nsenter import in_netns
from kernel.rtnl import RtnlSocket
from kernel.rtnl_neighbours import Neighbour, NextHop, neighbours, neighbours_of, next_hops
from tests.conftest import parse_metrics, unique_prefix, wait_for

A_MAC = "02:52:00:00:00:01"


def tentative(ns: str) -> str:
    return subprocess.run(["ip", "-n", ns, "-6", "addr", "show", "dev", "eth0", "tentative"],
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def two_ns(root):
    """a:eth0 10.252.0.1/24 + fd00:252::1/64 <-> b:eth0 10.252.0.2/24 + fd00:252::2/64,
    with routes of every shape through b, and a few neighbour entries in a."""
    p = unique_prefix("pwnb")
    a, b = f"{p}-a", f"{p}-b"
    cmds = [["netns", "add", a], ["netns", "add", b],
            ["-n", a, "link", "add", "eth0", "address", A_MAC, "type", "veth", "peer", "name", "eth0", "netns", b],
            ["-n", a, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p"],
            ["-n", a, "addr", "add", "10.252.0.1/24", "dev", "eth0"],
            ["-n", a, "addr", "add", "fd00:252::1/64", "dev", "eth0", "nodad"],
            ["-n", a, "addr", "add", "10.253.0.1/24", "dev", "eth1"],
            ["-n", b, "addr", "add", "10.252.0.2/24", "dev", "eth0"],
            ["-n", b, "addr", "add", "fd00:252::2/64", "dev", "eth0", "nodad"],
            ["-n", a, "link", "set", "eth0", "up"], ["-n", b, "link", "set", "eth0", "up"],
            ["-n", a, "link", "set", "eth1", "up"], ["-n", a, "link", "set", "eth1p", "up"],
            ["-n", a, "route", "add", "default", "via", "10.252.0.2"],
            ["-n", a, "route", "add", "10.99.0.0/16", "table", "100", "nexthop", "via", "10.252.0.3", "dev", "eth0",
             "nexthop", "via", "10.253.0.9", "dev", "eth1"],
            ["-n", a, "route", "add", "172.31.0.0/16", "via", "192.0.2.77", "dev", "eth0", "onlink"],
            ["-n", a, "route", "add", "fd99::/64", "via", "fd00:252::2"],
            ["-n", a, "route", "add", "blackhole", "10.98.0.0/16"],
            ["-n", a, "neigh", "add", "10.252.0.5", "lladdr", "02:00:00:00:00:05", "dev", "eth0", "nud", "permanent"],
            ["-n", a, "neigh", "add", "10.252.0.6", "lladdr", "02:00:00:00:00:06", "dev", "eth0", "nud", "stale"]]
    try:
        for c in cmds:
            subprocess.run(["ip", *c], check=True, capture_output=True)
        wait_for(lambda: not any(tentative(ns) for ns in (a, b)), timeout=10,
                 what="IPv6 on the new veths out of DAD (a fresh link answers no NS)")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# --- the codec -------------------------------------------------------------------------

def test_neighbours_and_next_hops_match_pyroute2(two_ns):
    a, _ = two_ns
    subprocess.run(["ip", "netns", "exec", a, "ping", "-c1", "-W1", "10.252.0.2"], capture_output=True)
    sock = RtnlSocket.open(f"/run/netns/{a}")
    with in_netns(f"/run/netns/{a}"):
        ipr = IPRoute()
    try:
        ours = {(n.ifindex, n.address): (n.state, n.lladdr) for n in neighbours(sock)}
        theirs = {(m["ifindex"], m.get_attr("NDA_DST")): (m["state"], m.get_attr("NDA_LLADDR") or "")
                  for m in ipr.get_neighbours()}
        assert ours == theirs
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        eth1 = ipr.link_lookup(ifname="eth1")[0]
        assert ours[(eth0, "10.252.0.2")][0] == 0x02            # reachable after the ping
        assert ours[(eth0, "10.252.0.5")] == (0x80, "02:00:00:00:00:05")
        hops = {(h.ifindex, h.gateway, h.destination, h.table, h.onlink) for h in next_hops(sock)}
        assert hops == {(eth0, "10.252.0.2", "default", 254, False),
                        (eth0, "10.252.0.3", "10.99.0.0/16", 100, False),
                        (eth1, "10.253.0.9", "10.99.0.0/16", 100, False),
                        (eth0, "192.0.2.77", "172.31.0.0/16", 254, True),
                        (eth0, "fd00:252::2", "fd99::/64", 254, False)}
    finally:
        ipr.close()
        sock.close()


def test_neighbour_gets_return_the_dumped_entries_asked_for(two_ns):
    """The per-scrape read asks for the gateways' entries one get each, all in one
    datagram: the same entries the dump holds, and nothing for an address with no
    entry (or an unknown interface) while the other answers still come."""
    a, _ = two_ns
    sock = RtnlSocket.open(f"/run/netns/{a}")
    try:
        table = {(n.ifindex, n.address): n for n in neighbours(sock)}
        eth0 = next(i for i, addr in table if addr == "10.252.0.5")
        wanted = [(eth0, "10.252.0.5"), (eth0, "10.252.0.77"), (eth0, "10.252.0.6"), (999, "10.252.0.5"),
                  (eth0, "fd00:252::99")]
        got = neighbours_of(sock, wanted)
        assert [(n.ifindex, n.address) for n in got] == [(eth0, "10.252.0.5"), (eth0, "10.252.0.6")]
        for n in got:
            dumped = table[(n.ifindex, n.address)]
            assert (n.state, n.lladdr) == (dumped.state, dumped.lladdr)
            assert n.updated_age is not None and abs(n.updated_age - dumped.updated_age) < 2
        assert neighbours_of(sock, []) == []
    finally:
        sock.close()


def test_batched_gets_answer_as_the_python_path(two_ns):
    """kernel/nlbatch.py's Requests (every socket's gets in one C call) against
    neighbours_of on the same sockets: the same entries, in the same places; a
    socket with nothing to ask answers nothing; a closed one is its own error."""
    from kernel import nlbatch
    from kernel.rtnl_neighbours import RTM_GETNEIGH, RTM_NEWNEIGH, neighbour_gets, parse_neigh
    a, b = two_ns
    sa, sb = RtnlSocket.open(f"/run/netns/{a}"), RtnlSocket.open(f"/run/netns/{b}")
    closed = RtnlSocket.open(f"/run/netns/{b}")
    closed.close()
    try:
        eth0 = next(l.ifindex for l in sa.links() if l.name == "eth0")
        wanted = [(eth0, "10.252.0.5"), (eth0, "10.252.0.77"), (eth0, "10.252.0.6"), (999, "10.252.0.5"),
                  (eth0, "fd00:252::99")]
        bodies = neighbour_gets(wanted)
        assert nlbatch.available()
        gets = nlbatch.Requests([(sa, RTM_GETNEIGH, bodies), (sb, RTM_GETNEIGH, []), (closed, RTM_GETNEIGH, bodies),
                                 (sa, RTM_GETNEIGH, bodies[2:3])])
        gets.run(RTM_NEWNEIGH)
        got = [[(i, parse_neigh(buf, st, e)) for i, buf, st, e in gets.answers(k, RTM_NEWNEIGH)] for k in (0, 1, 3)]
        with pytest.raises(OSError) as err:
            list(gets.answers(2, RTM_NEWNEIGH))
        assert err.value.errno == 9         # EBADF
        python = neighbours_of(sa, wanted)
    finally:
        sa.close()
        sb.close()
    assert [i for i, _ in got[0]] == [0, 2] and got[1] == [] and [i for i, _ in got[2]] == [0]
    for (_, ours), theirs in zip(got[0], python):
        assert (ours.ifindex, ours.address, ours.state, ours.lladdr) == \
            (theirs.ifindex, theirs.address, theirs.state, theirs.lladdr)
    assert got[2][0][1].address == "10.252.0.6"


def test_neighbours_source_reads_the_same_with_the_gets_started_early(two_ns):
    """What the scraper does (prefetch(), then collect()) against the Python path
    on the same pod: the same gateways in the same states."""
    from collector.netns_pool import NetnsPool
    from collector.registry import Config, Snapshot
    from collector.sources.neighbours import NeighboursSource
    a, _ = two_ns
    subprocess.run(["ip", "netns", "exec", a, "ping", "-c1", "-W1", "10.252.0.2"], capture_output=True)
    pool = NetnsPool()
    try:
        ns = pool.open(f"/run/netns/{a}")
        ns.refresh(0.0)
        links = {l.name: l for l in ns.links}
        pv = PodView(Pod("ns", "p", "uid-1", attachments=(att("default", "eth0", "management", ["10.252.0.6"]),)),
                     ns.path, ns.inode, "cgroup",
                     (InterfaceView(att("default", "eth0", "management", ["10.252.0.6"]),
                                    Link(links["eth0"].ifindex, "eth0")),))
        snapshot = Snapshot((pv,), netns=pool)

        def states(native: bool, early: bool) -> dict:
            source = NeighboursSource(Config())
            source.native = native
            try:
                if early:
                    source.prefetch(snapshot)
                    assert source._started.started_for is snapshot
                gateways, _, _ = source.read(snapshot)
                return {g.address: g.state for g in gateways}
            finally:
                source.close()

        early, late, python = states(True, True), states(True, False), states(False, False)

        def no_fd():
            raise OSError(24, "Too many open files")
        ns.batch_socket = no_fd         # that pod read on the scrape thread's socket instead
        unbatched = states(True, True)
        del ns.batch_socket
    finally:
        pool.keep_only(set())
    assert early == late == python == unbatched
    assert python["10.252.0.2"] == "reachable" and python["10.252.0.6"] == "stale" and python["10.252.0.3"] == "none"


def test_gateway_states_read_from_the_kernel_per_gateway(two_ns):
    """NeighboursSource.read's reading of one pod, on a real netns: the gateways of
    the annotation and the routes, their entries fetched one get each: a gateway
    that answered is reachable, a hand-set stale one stale, one never resolved none,
    with the route it came from."""
    a, _ = two_ns
    subprocess.run(["ip", "netns", "exec", a, "ping", "-c1", "-W1", "10.252.0.2"], capture_output=True)
    sock = RtnlSocket.open(f"/run/netns/{a}")
    try:
        links = {l.name: l for l in sock.links()}
        eth0 = Link(links["eth0"].ifindex, "eth0")
        pv = view((att("default", "eth0", "management", ["10.252.0.2", "10.252.0.6"]), eth0))
        got = {g.address: (g.state, g.sources) for g in read_gateways(pv, next_hops(sock), sock)}
        assert got["10.252.0.2"] == ("reachable", ("annotation", "route default table 254"))
        assert got["10.252.0.6"] == ("stale", ("annotation",))
        assert got["10.252.0.3"] == ("none", ("route 10.99.0.0/16 table 100",))
        assert got["fd00:252::2"][0] in ("none", "reachable", "stale", "delay", "probe", "incomplete")
        assert set(got) == {"10.252.0.2", "10.252.0.6", "10.252.0.3", "192.0.2.77", "fd00:252::2"}
    finally:
        sock.close()


def test_cacheinfo_ages_are_seconds(two_ns):
    a, _ = two_ns
    sock = RtnlSocket.open(f"/run/netns/{a}")
    try:
        entry = next(n for n in neighbours(sock) if n.address == "10.252.0.6")
        # made a moment ago: ages in seconds (clock_t / USER_HZ), not ticks
        assert 0 <= entry.updated_age < 5 and entry.confirmed_age is not None and entry.used_age is not None
        assert state_name(entry.state) == "stale"
    finally:
        sock.close()


# --- which gateways are whose ----------------------------------------------------------

def view(*interfaces: tuple[Attachment, Link | None]) -> PodView:
    atts = tuple(a for a, _ in interfaces)
    pod = Pod("ns", "p", "uid-1", attachments=atts)
    return PodView(pod, "/run/netns/x", 42, "cgroup", tuple(InterfaceView(a, l) for a, l in interfaces))


def att(network: str, interface: str, plane: str, gateway=(), ips=()) -> Attachment:
    return Attachment("ns", "p", "uid-1", network, interface, gateway=tuple(gateway), ips=tuple(ips), plane=plane)


ETH0 = Link(2, "eth0", "0a:58:00:00:00:02")
NET1 = Link(3, "net1", "02:00:00:00:01:01")
NET2 = Link(4, "net2", "02:00:00:00:02:02")


def test_gateways_from_annotation_and_routes_per_interface():
    pv = view((att("default", "eth0", "management", ["10.244.0.1"]), ETH0),
              (att("core/n4", "net1", "signaling"), NET1),
              (att("core/n3", "net2", "data", ["FD00:3:0:0::1"]), NET2),
              (att("core/dpdk", "", "data", ["192.168.9.1"]), None))
    hops = [NextHop(2, "10.244.0.1", "default", 254, False),
            NextHop(3, "172.16.4.1", "172.16.0.0/12", 254, False),
            NextHop(3, "172.16.4.2", "10.0.0.0/8", 100, False),
            NextHop(4, "fd00:3::1", "fd99::/64", 254, False),
            NextHop(9, "10.9.9.9", "default", 254, False)]          # another interface of the pod
    table = [Neighbour(2, "10.244.0.1", 0x02, "aa:bb:cc:dd:ee:ff", 1.0, 2.0, 3.0),
             Neighbour(3, "172.16.4.1", 0x20, "", 9.0, 1.0, 8.0),
             Neighbour(2, "172.16.4.2", 0x02, "aa:aa:aa:aa:aa:aa", 1.0, 1.0, 1.0)]  # right IP, wrong link
    got = {(g.labels[3], g.address): (g.sources, g.state) for g in gateways_of(pv, hops, table)}
    assert got == {
        ("eth0", "10.244.0.1"): (("annotation", "route default table 254"), "reachable"),
        ("net1", "172.16.4.1"): (("route 172.16.0.0/12 table 254",), "failed"),
        ("net1", "172.16.4.2"): (("route 10.0.0.0/8 table 100",), "none"),
        ("net2", "fd00:3::1"): (("annotation", "route fd99::/64 table 254"), "none"),
    }


def test_gateways_beyond_the_budget_are_counted_not_exported():
    """A pod's owner writes its routes: each attachment keeps its annotation's
    gateways, then its routes' by importance (default routes, shorter prefixes,
    the main table first), whatever order the kernel dumps them in, up to the
    budget; the rest is counted per attachment."""
    import random

    from collector.sources.neighbours import SOURCES_KEPT, GatewayPlan
    pv = view((att("default", "eth0", "management", ["10.244.0.1"]), ETH0), (att("core/n4", "net1", "signaling"), NET1))
    hops = [NextHop(2, f"10.244.{n >> 8}.{n & 255}", f"172.16.{n >> 8}.{n & 255}/32", 254, False)
            for n in range(10, 510)]
    hops += [NextHop(2, "10.244.9.9", "10.0.0.0/8", 100, False), NextHop(2, "10.244.9.8", "10.0.0.0/8", 254, False),
             NextHop(2, "10.244.7.7", "default", 254, False), NextHop(3, "172.16.4.1", "default", 254, False)]
    hops += [NextHop(2, "10.244.0.10", f"192.168.{n}.0/24", 254, False) for n in range(40)]   # one gateway, many routes
    expected = None
    for _ in range(5):
        random.shuffle(hops)
        plan = GatewayPlan(pv, hops, 4)
        got = [(iv.attachment.interface, list(found), n) for iv, _, found, n in plan.addresses]
        if expected is None:
            expected = got
        assert got == expected          # not the dump order
    eth0, net1 = expected
    assert eth0[:2] == ("eth0", ["10.244.0.1", "10.244.7.7", "10.244.9.8", "10.244.9.9"])
    assert eth0[2] == 500               # the /32 routes' gateways (10.244.0.10 among them)
    assert net1 == ("net1", ["172.16.4.1"], 0)
    assert plan.left_out == [(pv.interfaces[0].labels, 500)]
    assert len(plan.gets) > 0
    # one gateway behind many routes: its sources are kept short
    wide = GatewayPlan(pv, hops, 1000)
    sources = {address: found[address][0] for _, _, found, _ in wide.addresses for address in found}
    assert len(sources["10.244.0.10"]) == SOURCES_KEPT
    families = {f.name: f for f in neighbour_families([], plan.left_out)}
    parsed = parse_metrics(render(list(families.values())).decode())
    assert [v for (n, _), v in parsed.items() if n == "planewatch_gateway_budget_cut"] == [500]


@pytest.mark.parametrize("nud,name", [(0, "none"), (0x01, "incomplete"), (0x02, "reachable"), (0x04, "stale"),
                                      (0x08, "delay"), (0x10, "probe"), (0x20, "failed"), (0x40, "noarp"),
                                      (0x80, "permanent")])
def test_state_names(nud, name):
    assert state_name(nud) == name


def test_canonical_addresses():
    assert canonical("FD00:0:0::1/64") == "fd00::1"
    assert canonical(" 10.0.0.1 ") == "10.0.0.1"
    assert canonical("gateway.example") == ""


# --- probe targets: only the attachment's own, on-link gateways -------------------------

def gw(ifindex: int, address: str, plane: str = "data", ifname: str = "net2") -> Gateway:
    return Gateway(("ns", "p", "core/n3", ifname, plane), ifindex, ifname, address, ("annotation",), False, None)


ADDRS = [(4, "192.168.3.5", 24), (4, "fd00:3::5", 64), (4, "fe80::1:2", 64), (3, "172.16.4.5", 16)]


@pytest.mark.parametrize("address,source", [
    ("192.168.3.1", "192.168.3.5"),        # in the connected /24
    ("192.168.4.1", ""),                   # off-subnet: not on-link, never probed
    ("172.16.4.1", ""),                    # on-link for net1, not for net2
    ("fd00:3::1", "fd00:3::5"),
    ("fe80::1", "fe80::1:2"),              # link-local: on-link by definition, link-local source
    ("fd00:4::1", ""),
])
def test_on_link_source(address, source):
    assert on_link_source(gw(4, address), ADDRS) == source


def test_probe_targets_only_for_opted_in_planes_and_on_link():
    pv = view((att("core/n3", "net2", "data"), NET2), (att("core/n4", "net1", "signaling"), NET1))
    gateways = [gw(4, "192.168.3.1"), gw(4, "192.168.4.1"),
                gw(3, "172.16.4.1", "signaling", "net1")]
    targets = probe_targets(pv, gateways, ADDRS, PlaneSelector("data"))
    assert [(t.gateway, t.ifname, t.source, t.mac, t.netns_inode) for t in targets] == \
        [("192.168.3.1", "net2", "192.168.3.5", NET2.mac, 42)]
    both = probe_targets(pv, gateways, ADDRS, PlaneSelector("data,signaling"))
    assert [t.gateway for t in both] == ["192.168.3.1", "172.16.4.1"]
    assert probe_targets(pv, gateways, ADDRS, PlaneSelector("")) == []


# --- metric families -----------------------------------------------------------------------

def test_state_set_has_one_current_state_and_ages_when_known():
    gateways = [Gateway(("ns", "p", "n", "net1", "signaling"), 3, "net1", "172.16.4.1", ("annotation",), False,
                        Neighbour(3, "172.16.4.1", 0x20, "", 12.5, 3.0, 7.25)),
                Gateway(("ns", "p", "n", "net2", "data"), 4, "net2", "192.168.3.1", ("annotation",), False, None)]
    parsed = parse_metrics(render(neighbour_families(gateways)).decode())
    states = {(dict(k)["gateway"], dict(k)["state"]): v for (n, k), v in parsed.items()
              if n == "planewatch_gateway_neighbour_state"}
    assert len(states) == 2 * len(STATE_NAMES)
    assert {k for k, v in states.items() if v == 1} == {("172.16.4.1", "failed"), ("192.168.3.1", "none")}
    ages = {n: v for (n, k), v in parsed.items() if n.endswith("_age_seconds")}
    assert ages == {"planewatch_gateway_neighbour_confirmed_age_seconds": 12.5,
                    "planewatch_gateway_neighbour_updated_age_seconds": 7.25,
                    "planewatch_gateway_neighbour_used_age_seconds": 3.0}


def test_probe_families_histogram():
    target = gp.Target(("ns", "p", "n", "net2", "data"), "192.168.3.1", "/x", 1, "net2", 4, NET2.mac, "192.168.3.5")
    r = gp.Results()
    for rtt in (0.00004, 0.00007, 0.0003, 0.2, None, None):
        r.record(rtt)
    parsed = parse_metrics(render(probe_families([(target, r)], 3)).decode())
    value = {(n, dict(k).get("le")): v for (n, k), v in parsed.items()}
    assert value[("planewatch_gateway_probes_total", None)] == 6
    assert value[("planewatch_gateway_probe_failures_total", None)] == 2
    assert value[("planewatch_gateway_probe_rtt_seconds_bucket", "5e-05")] == 1
    assert value[("planewatch_gateway_probe_rtt_seconds_bucket", "0.0001")] == 2
    assert value[("planewatch_gateway_probe_rtt_seconds_bucket", "0.1")] == 3
    assert value[("planewatch_gateway_probe_rtt_seconds_bucket", "+Inf")] == 4     # answered, one slow
    assert value[("planewatch_gateway_probe_rtt_seconds_count", None)] == 4
    assert value[("planewatch_gateway_probe_rtt_seconds_sum", None)] == pytest.approx(0.20041)
    assert value[("planewatch_gateway_probes_delayed_total", None)] == 3


# --- the rate bound ------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_holds_the_rate():
    clock = FakeClock()
    bucket = gp.TokenBucket(rate=5, burst=5, clock=clock)
    taken = 0
    for _ in range(20000):                      # 20 s in 1 ms steps, asking all the time
        if bucket.wait_time() == 0:
            taken += 1
        clock.now += 0.001
    assert 100 <= taken <= 5 * 20 + 5


def test_prober_probes_each_target_within_the_bound_oldest_first():
    clock = FakeClock()
    sent = []

    def fake_probe(target, timeout):
        sent.append((clock.now, target.gateway))
        return None if target.gateway.endswith(".9") else 0.0002

    prober = gp.Prober(rate=2, interval=1.0, probe=fake_probe, clock=clock)
    prober._stop.wait = lambda seconds: (setattr(clock, "now", clock.now + seconds), False)[1]
    targets = [gp.Target(("ns", f"p{i}", "n", "net1", "data"), f"10.0.0.{i}", "/x", 1, "net1", 3, NET1.mac,
                         "10.0.0.100") for i in range(1, 10)]
    prober._targets = {t.key: t for t in targets}
    prober._due = {t.key: 0.0 for t in targets}
    while clock.now < 1030:
        wait = prober.step()            # (step moves the clock itself while it waits for a token)
        clock.now += wait
    per_second = {}
    for at, _ in sent:
        per_second[int(at)] = per_second.get(int(at), 0) + 1
    assert max(per_second.values()) <= 2 + 1                 # rate + the first second's burst
    assert 2 * 30 - 2 <= len(sent) <= 2 * 30 + 2
    assert {g for _, g in sent} == {t.gateway for t in targets}          # nobody starved
    results = {t.gateway: r for t, r in prober.snapshot()}
    assert results["10.0.0.9"].failures == results["10.0.0.9"].probes > 0
    assert results["10.0.0.1"].failures == 0
    assert prober.delayed > 0
    prober.set_targets(targets[:1])
    assert [t.gateway for t, _ in prober.snapshot()] == ["10.0.0.1"]
    prober.close()


# --- packets ---------------------------------------------------------------------------------

def test_arp_request_layout_and_reply_match():
    req = gp.arp_request(A_MAC, "10.252.0.1", "10.252.0.2")
    assert len(req) == 28
    assert req[:8] == bytes.fromhex("0001 0800 06 04 0001")
    assert req[8:14] == bytes.fromhex("025200000001") and req[14:18] == socket.inet_aton("10.252.0.1")
    assert req[24:28] == socket.inet_aton("10.252.0.2")
    reply = bytes.fromhex("0001 0800 06 04 0002") + bytes(6) + socket.inet_aton("10.252.0.2") \
        + bytes.fromhex("025200000001") + socket.inet_aton("10.252.0.1")
    assert gp.is_arp_reply(reply, "10.252.0.1", "10.252.0.2")
    assert not gp.is_arp_reply(reply, "10.252.0.1", "10.252.0.3")      # another host answering
    assert not gp.is_arp_reply(req, "10.252.0.1", "10.252.0.2")        # a request is no answer
    assert not gp.is_arp_reply(reply[:20], "10.252.0.1", "10.252.0.2")


def test_ndp_packets():
    assert gp.solicited_node("2001:db8::1:800:200e:8c6c") == "ff02::1:ff0e:8c6c"      # RFC 4291 2.7.1
    ns = gp.neighbour_solicitation("fd00:252::2", A_MAC)
    assert ns[0] == 135 and ns[8:24] == socket.inet_pton(socket.AF_INET6, "fd00:252::2")
    assert ns[24:26] == b"\x01\x01" and ns[26:32] == bytes.fromhex("025200000001")
    na = bytes((136, 0)) + bytes(6) + socket.inet_pton(socket.AF_INET6, "fd00:252::2")
    assert gp.is_neighbour_advert(na, "fd00:252::2")
    assert not gp.is_neighbour_advert(na, "fd00:252::3")
    assert not gp.is_neighbour_advert(ns, "fd00:252::2")


# --- real probes on the veth pair ----------------------------------------------------------

def target_in(ns: str, gateway: str, source: str) -> gp.Target:
    path = f"/run/netns/{ns}"
    with in_netns(path):
        ifindex = socket.if_nametoindex("eth0")
    return gp.Target(("ns", "p", "n", "eth0", "data"), gateway, path, os.stat(path).st_ino, "eth0", ifindex,
                     A_MAC, source)


@pytest.mark.parametrize("gateway,source", [("10.252.0.2", "10.252.0.1"), ("fd00:252::2", "fd00:252::1")])
def test_real_probe_answered_and_unanswered(two_ns, gateway, source):
    a, _ = two_ns
    rtt = gp.probe_once(target_in(a, gateway, source), timeout=1.0)
    assert rtt is not None and 0 < rtt < 0.1
    silent = gateway[:-1] + "7"             # nobody has it
    assert gp.probe_once(target_in(a, silent, source), timeout=0.3) is None


def test_probe_refuses_a_reused_netns_path(two_ns):
    a, b = two_ns
    wrong = target_in(a, "10.252.0.2", "10.252.0.1")
    wrong = gp.Target(wrong.labels, wrong.gateway, f"/run/netns/{b}", wrong.netns_inode, wrong.ifname,
                      wrong.ifindex, wrong.mac, wrong.source)
    with pytest.raises(FileNotFoundError):
        gp.probe_once(wrong, timeout=0.3)


def test_hop_cache_reads_at_most_the_route_budget_and_says_so(two_ns):
    """A pod's owner writes its routes: the next-hop dump stops at the budget,
    the pod is marked cut short ("routes"), and the netns socket the dump left
    busy is replaced, so the other readers of the pod still get their answers."""
    import collector.sources.neighbours as nb
    from collector.netns_pool import NetnsPool
    a, _ = two_ns
    pool = NetnsPool()
    try:
        ns = pool.open(f"/run/netns/{a}")
        whole = nb.HopCache().hops(ns, Budgets(netns_routes=10_000))
        assert ns.read_cuts["neighbours"] == ()
        busy = ns.rtnl
        part = nb.HopCache().hops(ns, Budgets(netns_routes=2))
        assert ns.read_cuts["neighbours"] == ("routes",)
        assert len(part) < len(whole) and set(part) <= set(whole)
        assert ns.rtnl is not busy and busy._sock.fileno() == -1       # replaced and closed
        assert {l.name for l in ns.rtnl.links()} >= {"lo", "eth0"}       # the new socket answers
    finally:
        pool.close()


def test_hop_cache_defers_costly_rereads_of_a_flapping_netns(two_ns):
    """A tenant flapping one of many routes: the next hops are read again at
    most at the refresh share of the time (always after CUT_BACKOFF when the
    dump was cut), the pod says refresh_deferred meanwhile; small tables are
    read again at once."""
    import collector.sources.neighbours as nb
    from collector.netns_pool import CUT_BACKOFF, NetnsPool
    a, _ = two_ns
    subprocess.run(["ip", "-n", a, "-batch", "-"], check=True, text=True,
                   input="".join(f"route add 10.90.{n}.0/24 via 10.252.0.2\n" for n in range(200)))
    now = [1000.0]
    pool = NetnsPool()
    try:
        ns = pool.open(f"/run/netns/{a}")
        for budgets, cut in ((Budgets(), False), (Budgets(netns_routes=150), True)):
            cache = nb.HopCache(clock=lambda: now[0])
            first = {h.destination for h in cache.hops(ns, budgets)}
            assert ("routes" in ns.read_cuts["neighbours"]) is cut
            subprocess.run(["ip", "-n", a, "route", "replace", "10.90.0.0/24", "via", "10.252.0.9"], check=True)
            pool.poll()
            now[0] += 0.000_001         # well under any dump's cost / 5 %
            assert {h.destination for h in cache.hops(ns, budgets)} == first
            assert "refresh_deferred" in ns.read_cuts["neighbours"]
            now[0] += CUT_BACKOFF + 1
            got = cache.hops(ns, budgets)
            assert any(h.gateway == "10.252.0.9" for h in got) or cut      # a cut dump may not reach it
            assert ns.read_cuts["neighbours"] == (("routes",) if cut else ())
            subprocess.run(["ip", "-n", a, "route", "replace", "10.90.0.0/24", "via", "10.252.0.2"], check=True)
            pool.poll()
        # a small table is read again at the next look, whatever it cost
        small = nb.HopCache(clock=lambda: now[0])
        subprocess.run(["ip", "-n", a, "-batch", "-"], check=True, text=True,
                       input="".join(f"route del 10.90.{n}.0/24\n" for n in range(200)))
        pool.poll()
        small.hops(ns)
        subprocess.run(["ip", "-n", a, "route", "add", "10.91.0.0/24", "via", "10.252.0.7"], check=True)
        pool.poll()
        now[0] += 0.000_001
        assert any(h.gateway == "10.252.0.7" for h in small.hops(ns))
        assert ns.read_cuts["neighbours"] == ()
    finally:
        pool.close()


def test_hop_cache_rereads_routes_only_after_a_route_event(two_ns, monkeypatch):
    import collector.sources.neighbours as nb
    from collector.netns_pool import NetnsPool
    a, _ = two_ns
    path = f"/run/netns/{a}"
    dumps = []
    real = nb.next_hops_bounded
    monkeypatch.setattr(nb, "next_hops_bounded", lambda sock, limit: dumps.append(1) or real(sock, limit))
    cache, pool, other = nb.HopCache(), NetnsPool(), NetnsPool()
    try:
        ns = pool.open(path)
        first = {h.gateway for h in cache.hops(ns)}
        assert "10.252.0.2" in first and len(dumps) == 1
        pool.poll()
        assert {h.gateway for h in cache.hops(ns)} == first and len(dumps) == 1     # nothing changed
        subprocess.run(["ip", "-n", a, "route", "add", "10.97.0.0/16", "via", "10.252.0.4"], check=True)
        pool.poll()                             # the scrape's one look at every netns
        assert {h.gateway for h in cache.hops(ns)} == first | {"10.252.0.4"} and len(dumps) == 2
        pool.poll()
        assert len(cache.hops(ns)) and len(dumps) == 2
        # the same inode with other events (the netns was closed and reopened
        # between two scrapes): read again, even at an equal generation
        again = other.open(path)
        again.events.generation = ns.events.generation
        assert again.inode == ns.inode
        cache.hops(again)
        assert len(dumps) == 3
        cache.keep_only(set())
        assert cache._by_inode == {}
    finally:
        pool.close()
        other.close()


def test_source_keeps_a_pods_gateway_plan_until_its_view_or_routes_change(two_ns, monkeypatch):
    """NeighboursSource works out a pod's gateways (and the gets asking for them)
    once, and again when the kernel announced a route change or the pod's view is
    another object; the neighbour states themselves are read at every scrape."""
    import collector.sources.neighbours as nb
    from collector.netns_pool import NetnsPool
    from collector.registry import Config, Snapshot
    a, _ = two_ns
    plans = []
    real = nb.gateway_addresses
    monkeypatch.setattr(nb, "gateway_addresses", lambda v, h, limit: plans.append(1) or real(v, h, limit))
    pool, source = NetnsPool(), nb.NeighboursSource(Config())
    try:
        ns = pool.open(f"/run/netns/{a}")
        eth0 = Link(next(l.ifindex for l in ns.rtnl.links() if l.name == "eth0"), "eth0")
        pv = PodView(view((att("default", "eth0", "management"), eth0)).pod, ns.path, ns.inode, "pinned",
                     (InterfaceView(att("default", "eth0", "management"), eth0),))

        def states():
            pool.poll()
            return {g.address: g.state for g in source.read(Snapshot((pv,), netns=pool))[0]}

        first = states()
        assert first["10.252.0.2"] == "none" and len(plans) == 1
        subprocess.run(["ip", "netns", "exec", a, "ping", "-c1", "-W1", "10.252.0.2"], capture_output=True)
        assert states()["10.252.0.2"] == "reachable" and len(plans) == 1       # read, not planned again
        subprocess.run(["ip", "-n", a, "route", "add", "10.97.0.0/16", "via", "10.252.0.4"], check=True)
        assert set(states()) == set(first) | {"10.252.0.4"} and len(plans) == 2
        pv = PodView(pv.pod, pv.netns_path, pv.netns_inode, pv.resolved_by, pv.interfaces)
        states()
        assert len(plans) == 3          # another view of the pod: planned again
        source.read(Snapshot((), netns=pool))
        assert len(source._plans) == 0  # a pod gone: its plan too
    finally:
        source.close()
        pool.close()
