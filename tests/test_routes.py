"""The asymmetric-routing analysis on plain data (collector/routes_analysis.py):
which lookups it asks for, what the answers mean, the findings and the families."""
from __future__ import annotations

import errno
import ipaddress

import pytest

from collector.routes_analysis import (
    NO_ROUTE,
    RTN_LOCAL,
    Attached,
    PodFacts,
    RouteIndex,
    analyse,
    effective_rp_filter,
    findings,
    for_findings,
    policy_rules,
    probe_plan,
    representative,
    responsible_route,
    rule_tables,
    subnets,
    within,
)
from collector.sources.routes import families
from exporters.exposition import render
from tests.conftest import parse_metrics, series

ETH0, NET1, NET2 = 2, 7, 3
LINKS = {1: "lo", ETH0: "eth0", NET1: "net1", NET2: "net2"}


def att(interface, ifindex, ips, network, gateways=(), default=False, plane="", pod=("telco", "upf")):
    return Attached((*pod, network, interface, plane or network), interface, ifindex, network,
                    tuple(ips), tuple(gateways), default)


A_ETH0 = att("eth0", ETH0, ["10.70.0.10"], "k8s-pod-network", ["10.70.255.254"], default=True, plane="management")
A_NET1 = att("net1", NET1, ["10.71.0.10"], "telco/signaling")
A_NET2 = att("net2", NET2, ["10.72.0.10", "fd00:72::a"], "telco/data")

ADDRESSES = (
    {"ifindex": 1, "address": "127.0.0.1/8"},
    {"ifindex": ETH0, "address": "10.70.0.10/16"},
    {"ifindex": NET1, "address": "10.71.0.10/16"},
    {"ifindex": NET2, "address": "10.72.0.10/16"},
    {"ifindex": NET2, "address": "fd00:72::a/64"},
    {"ifindex": NET2, "address": "fe80::1/64"},
)


def route(dst, oif, table=254, gateway="", family=4, type=1):
    return {"family": family, "dst": dst, "table": table, "type": type, "oifs": (oif,), "gateway": gateway}


BASE_ROUTES = (
    route("default", ETH0, gateway="10.70.255.254"),
    route("10.70.0.0/16", ETH0),
    route("10.71.0.0/16", NET1),
    route("10.72.0.0/16", NET2),
    route("fd00:72::/64", NET2, family=6),
    route("fe80::/64", NET2, family=6),
    route("fe80::/64", ETH0, family=6),
)
DEFAULT_RULES = (
    {"family": 4, "priority": 0, "src": "", "table": 255, "action": 1},
    {"family": 4, "priority": 32766, "src": "", "table": 254, "action": 1},
    {"family": 4, "priority": 32767, "src": "", "table": 253, "action": 1},
)


def facts(atts=(A_ETH0, A_NET1, A_NET2), routes=BASE_ROUTES, rules=DEFAULT_RULES, addresses=ADDRESSES,
          rp_filter=None):
    return PodFacts("telco", "upf", tuple(atts), LINKS, tuple(addresses), tuple(routes), tuple(rules),
                    rp_filter if rp_filter is not None else {"all": 0, "eth0": 0, "net1": 0, "net2": 0})


def plan_set(f):
    return {(p.interface, p.source, p.destination, p.address, p.reason) for p in probe_plan(f)}


BASE_PLAN = {
    ("eth0", "10.70.0.10", "10.70.255.254", "10.70.255.254", "gateway"),
    ("eth0", "10.70.0.10", "10.70.0.0/16", "10.70.0.1", "subnet"),
    ("net1", "10.71.0.10", "10.71.0.0/16", "10.71.0.1", "subnet"),
    ("net2", "10.72.0.10", "10.72.0.0/16", "10.72.0.1", "subnet"),
    ("net2", "fd00:72::a", "fd00:72::/64", "fd00:72::1", "subnet"),
}


# --- subnets and representatives ---------------------------------------------------

@pytest.mark.parametrize("ips, addresses, want", [
    (["10.71.0.10"], ({"ifindex": NET1, "address": "10.71.0.10/16"},), ["10.71.0.0/16"]),
    # the annotation's /len wins over the kernel's prefix
    (["10.71.0.10/24"], ({"ifindex": NET1, "address": "10.71.0.10/16"},), ["10.71.0.0/24"]),
    # an address the kernel has on another interface says nothing about this one
    (["10.71.0.10"], ({"ifindex": ETH0, "address": "10.71.0.10/16"},), []),
    (["10.71.0.10", "fd00::5"], ({"ifindex": NET1, "address": "10.71.0.10/16"},
                                 {"ifindex": NET1, "address": "fd00::5/64"}), ["10.71.0.0/16", "fd00::/64"]),
    (["not-an-ip"], (), []),
])
def test_subnets(ips, addresses, want):
    a = att("net1", NET1, ips, "telco/signaling")
    assert [str(n) for n in subnets(a, addresses)] == want


@pytest.mark.parametrize("net, own, want", [
    ("10.71.0.0/16", set(), "10.71.0.1"),
    ("10.71.0.0/16", {"10.71.0.1"}, "10.71.0.2"),
    ("10.71.5.7/32", set(), "10.71.5.7"),
    ("10.71.5.7/32", {"10.71.5.7"}, None),
    ("10.71.5.6/31", set(), "10.71.5.6"),
    ("fd00::/64", set(), "fd00::1"),
])
def test_representative(net, own, want):
    assert representative(ipaddress.ip_network(net), {ipaddress.ip_address(a) for a in own}) == want


# --- the plan: which lookups -------------------------------------------------------------

@pytest.mark.parametrize("extra_routes, extra_rules, added, removed", [
    # nothing more: gateways and subnets only; link-local and the default route are not probed
    ((), (), set(), set()),
    # scenario 2: a more specific route via eth0 carves a piece out of net1's subnet
    # (and, being a route via eth0, it is checked for eth0 too)
    ((route("10.71.5.0/24", ETH0, gateway="10.70.255.254"),), (),
     {("net1", "10.71.0.10", "10.71.5.0/24", "10.71.5.1", "carve-out"),
      ("eth0", "10.70.0.10", "10.71.5.0/24", "10.71.5.1", "route")}, set()),
    # a route a NAD installs via net1
    ((route("10.80.0.0/16", NET1, gateway="10.71.255.254"),), (),
     {("net1", "10.71.0.10", "10.80.0.0/16", "10.80.0.1", "route")}, set()),
    # a route via net1 in a table no rule sends net1's source to: not net1's business
    ((route("10.81.0.0/16", NET1, table=101),), (), set(), set()),
    # ... unless a rule does
    ((route("10.81.0.0/16", NET1, table=101),),
     ({"family": 4, "priority": 1000, "src": "10.71.0.10/32", "table": 101, "action": 1},),
     {("net1", "10.71.0.10", "10.81.0.0/16", "10.81.0.1", "route")}, set()),
    # local-type routes serve nobody
    ((route("10.71.9.0/24", NET1, type=RTN_LOCAL),), (), set(), set()),
    # a carve-out in a table other than main does not carve main's subnet
    ((route("10.71.5.0/24", ETH0, table=101),), (), set(), set()),
])
def test_probe_plan(extra_routes, extra_rules, added, removed):
    f = facts(routes=BASE_ROUTES + extra_routes, rules=DEFAULT_RULES + extra_rules)
    assert plan_set(f) == (BASE_PLAN | added) - removed


def test_probe_plan_skips_own_addresses_and_link_local_gateways():
    eth0 = att("eth0", ETH0, ["10.70.0.10"], "k8s-pod-network", ["10.70.0.10", "fe80::1"], default=True)
    f = facts(atts=(eth0,), addresses=ADDRESSES[:2])
    assert plan_set(f) == {("eth0", "10.70.0.10", "10.70.0.0/16", "10.70.0.1", "subnet")}


def test_no_lookup_from_an_address_the_pod_does_not_have():
    # a stale annotation: net1's annotated address is not in the kernel
    net1 = att("net1", NET1, ["10.71.0.99"], "telco/signaling")
    f = facts(atts=(A_ETH0, net1))
    assert {p[0] for p in plan_set(f)} == {"eth0"}
    net1 = att("net1", NET1, ["10.71.0.99", "10.71.0.10"], "telco/signaling")
    assert ("net1", "10.71.0.10", "10.71.0.0/16", "10.71.0.1", "subnet") in plan_set(facts(atts=(A_ETH0, net1)))


def test_rule_tables():
    rules = DEFAULT_RULES + ({"family": 4, "priority": 10, "src": "10.71.0.0/16", "table": 101, "action": 1},
                             {"family": 4, "priority": 11, "src": "10.71.0.10/32", "table": 102, "action": 1},
                             {"family": 4, "priority": 12, "src": "10.71.0.10/32", "table": 0, "action": 6},
                             {"family": 6, "priority": 13, "src": "fd00::/8", "table": 103, "action": 1})
    assert rule_tables(rules, "10.71.0.10") == {101, 102}
    assert rule_tables(rules, "10.72.0.10") == set()
    assert rule_tables(rules, "fd00::5") == {103}


# --- what the answers mean -------------------------------------------------------------

def answers_all_by_their_interface(f, **overrides):
    by_if = {a.interface: a.ifindex for a in f.attachments}
    out = {(p.source, p.address): {"oif": by_if[p.interface], "table": 254, "type": 1, "error": 0}
           for p in probe_plan(f)}
    out.update(overrides)
    return out


def test_no_mismatch_when_every_answer_leaves_by_its_interface():
    f = facts()
    a = analyse(f, answers_all_by_their_interface(f))
    assert a.mismatches == () and a.probes == len(BASE_PLAN)
    assert findings(f, a) == []


@pytest.mark.parametrize("answer, egress, route_text", [
    ({"oif": ETH0, "table": 254, "type": 1}, "eth0", "`10.71.5.0/24 via 10.70.255.254 dev eth0` in table main"),
    # no route of that table leaves by the answer's interface (changed meanwhile): say what is known
    ({"oif": NET2, "table": 254, "type": 1}, "net2", "the lookup in table main"),
    ({"oif": 99, "table": 101, "type": 1}, "if99", "the lookup in table 101"),
    ({"error": errno.ENETUNREACH}, NO_ROUTE, None),
])
def test_mismatch(answer, egress, route_text):
    f = facts(routes=BASE_ROUTES + (route("10.71.5.0/24", ETH0, gateway="10.70.255.254"),))
    answers = answers_all_by_their_interface(f, **{})
    answers[("10.71.0.10", "10.71.5.1")] = answer
    a = analyse(f, answers)
    assert [(m.attached.interface, m.probe.destination, m.egress_interface) for m in a.mismatches] == [
        ("net1", "10.71.5.0/24", egress)]
    (finding,) = findings(f, a)
    kept = for_findings(f)              # what the source keeps between analyses
    assert findings(kept, a) == [finding] and kept.routes == () and kept.rules == ()
    assert finding["kind"] == "route_mismatch" and finding["interface"] == "net1"
    assert set(finding) == {"namespace", "pod", "interface", "kind", "sentence", "fix"}
    assert "ip rule add from 10.71.0.10 table 102" in finding["fix"]
    assert "ip route add 10.71.0.0/16 dev net1 table 102" in finding["fix"]
    if route_text:
        assert route_text in finding["sentence"] and f"leaves by {egress} instead of net1" in finding["sentence"]
    else:
        assert "no route" in finding["sentence"] and "ENETUNREACH" in finding["sentence"]


def test_a_local_answer_is_no_mismatch():
    f = facts()
    answers = answers_all_by_their_interface(f)
    answers[("10.71.0.10", "10.71.0.1")] = {"oif": 1, "table": 255, "type": RTN_LOCAL}
    assert analyse(f, answers).mismatches == ()


def test_gateway_via_the_default_route_hints_at_multus_default_route():
    net1 = att("net1", NET1, ["10.71.0.10"], "telco/signaling", ["10.99.0.1"])
    f = facts(atts=(A_ETH0, net1))
    answers = answers_all_by_their_interface(f)
    answers[("10.71.0.10", "10.99.0.1")] = {"oif": ETH0, "table": 254, "type": 1}
    (finding,) = findings(f, analyse(f, answers))
    assert "its gateway 10.99.0.1" in finding["sentence"] and "`default via 10.70.255.254 dev eth0`" in \
        finding["sentence"]
    assert '"default-route"' in finding["sentence"]
    assert "ip route add default via 10.99.0.1 dev net1 table 102" in finding["fix"]


@pytest.mark.parametrize("table, address, oif, want", [
    (254, "10.71.5.9", ETH0, "10.71.5.0/24"),
    (254, "10.71.6.9", NET1, "10.71.0.0/16"),
    (254, "192.0.2.1", ETH0, "default"),
    (101, "10.71.5.9", NET1, "default"),
    (254, "fd00:72::9", NET2, "fd00:72::/64"),
    # the longest prefix leaving by the answer's interface, not the longest overall
    (254, "10.71.5.9", NET1, "10.71.0.0/16"),
    (254, "10.71.5.9", NET2, None),
    (102, "10.71.5.9", ETH0, None),
])
def test_responsible_route(table, address, oif, want):
    routes = BASE_ROUTES + (route("10.71.5.0/24", ETH0), route("default", NET1, table=101))
    found = responsible_route(routes, table, address, oif)
    assert (found["dst"] if found else None) == want


def walk(routes, table, address, oif):
    """What responsible_route did before RouteIndex: a walk of every route."""
    addr = ipaddress.ip_address(address)
    best, best_len = None, -1
    for r in routes:
        if r["table"] != table or oif not in r.get("oifs", ()):
            continue
        dst = ipaddress.ip_network("0.0.0.0/0" if r["dst"] == "default" and r["family"] == 4 else
                                   "::/0" if r["dst"] == "default" else r["dst"], strict=False)
        if dst.version == addr.version and addr in dst and dst.prefixlen > best_len:
            best, best_len = r, dst.prefixlen
    return best


def test_route_index_finds_what_the_walk_of_every_route_found():
    """Random tables of overlapping prefixes (both families, several tables and
    interfaces, the same network twice): the index decides as the walk did."""
    import random
    rng = random.Random(16)
    for _ in range(20):
        routes = []
        for _ in range(rng.randrange(1, 200)):
            table, oif = rng.choice((254, 100, 101)), rng.choice((ETH0, NET1, NET2))
            if rng.random() < 0.8:
                plen = rng.choice((0, 8, 12, 16, 20, 24, 28, 32))
                net = ipaddress.ip_network((rng.randrange(1 << 32) & ~((1 << (32 - plen)) - 1) if plen else 0, plen))
                routes.append(route("default" if plen == 0 else str(net), oif, table))
                routes[-1]["mark"] = len(routes)          # which of two equal networks decided
            else:
                plen = rng.choice((0, 48, 64, 128))
                net = ipaddress.ip_network(((0xfd00 << 112) | rng.randrange(1 << 16) << 96) >> (128 - plen) << (128 - plen)
                                           if plen else 0, plen) if plen else ipaddress.ip_network("::/0")
                routes.append(route("default" if plen == 0 else str(net), oif, table, family=6))
            if rng.random() < 0.1:
                routes.append(dict(routes[-1], mark=-len(routes)))      # the same network again
        index = RouteIndex(tuple(routes))
        for _ in range(100):
            r = rng.choice(routes)
            base = ipaddress.ip_network("0.0.0.0/0" if r["dst"] == "default" and r["family"] == 4 else
                                        "::/0" if r["dst"] == "default" else r["dst"])
            address = str(base.network_address + rng.randrange(base.num_addresses))
            table, oif = rng.choice((254, 100, 101, 7)), rng.choice((ETH0, NET1, NET2))
            assert index.find(table, address, oif) is walk(routes, table, address, oif), (table, address, oif)


def walked_plan(f):
    """The probe plan as it was made before _RouteSpans: every route looked at
    for every attachment (the oracle of the test below)."""
    from collector.routes_analysis import MAIN_TABLE, _ip_or_none, _route_network, own_addresses, sources
    own = own_addresses(f)
    kernel = {ipaddress.ip_interface(a["address"]).ip for a in f.addresses}
    plan = {}
    routes = [(r, net) for r in f.routes if r.get("type", 1) == 1
              for net in [_route_network(r)] if net is not None and not net.is_link_local]
    for a in f.attachments:
        srcs, nets = sources(a, kernel), subnets(a, f.addresses)

        def add(a, source, destination, address, reason):
            if address is not None and ipaddress.ip_address(address) not in own:
                plan.setdefault((a.interface, source, address), (a.interface, source, destination, address, reason))
        for gw in a.gateways:
            addr = _ip_or_none(gw)
            if addr is not None and not addr.is_link_local and addr.version in srcs:
                add(a, srcs[addr.version], str(addr), str(addr), "gateway")
        for net in nets:
            if net.version in srcs:
                add(a, srcs[net.version], str(net), representative(net, own), "subnet")
        tables = {v: {MAIN_TABLE} | rule_tables(f.rules, src) for v, src in srcs.items()}
        for r, dst in routes:
            if dst.version not in srcs or dst in nets:
                continue
            via = a.ifindex in r.get("oifs", ()) and r["table"] in tables[dst.version]
            carves = r["table"] == MAIN_TABLE and any(
                n.version == dst.version and dst.prefixlen > n.prefixlen and dst.subnet_of(n) for n in nets)
            if via or carves:
                add(a, srcs[dst.version], str(dst), representative(dst, own), "route" if via else "carve-out")
    return list(plan.values())


def test_probe_plan_is_the_walk_of_every_route_for_every_attachment():
    """Random pods (attachments with and without prefix lengths, rules, routes
    in several tables, carve-outs, duplicates, link-local, other types): the
    plan made from _RouteSpans is the walk's, probe for probe, in order."""
    import random
    rng = random.Random(8)
    seen = set()
    for _ in range(60):
        atts, addresses = [], [{"ifindex": 1, "address": "127.0.0.1/8"}]
        for k in range(rng.randrange(1, 5)):
            ifindex = 10 + k
            ip4, ip6 = f"10.{k}.{rng.randrange(4)}.{rng.randrange(2, 250)}", f"fd00:{k}::{rng.randrange(2, 999):x}"
            ips = [ip4 + rng.choice(("", "/16", "/24")), ip6 + rng.choice(("", "/64"))][:rng.randrange(1, 3)]
            atts.append(att(f"net{k}", ifindex, ips, f"n{k}", [f"10.{k}.0.1"] if rng.random() < 0.5 else []))
            addresses += [{"ifindex": ifindex, "address": f"{ip4}/{rng.choice((16, 24))}"},
                          {"ifindex": ifindex, "address": f"{ip6}/64"}]
        routes = []
        for _ in range(rng.randrange(0, 80)):
            k, table = rng.randrange(len(atts) + 1), rng.choice((254, 254, 100, 255))
            if rng.random() < 0.7:
                length = rng.choice((8, 16, 20, 24, 28, 32))
                base = (10 << 24) | (rng.randrange(len(atts)) << 16) | rng.randrange(1 << 16)
                dst = str(ipaddress.ip_network((base >> (32 - length) << (32 - length), length)))
                routes.append(route(rng.choice((dst, dst, "default")), 10 + k, table, type=rng.choice((1, 1, 1, 2))))
            else:
                length = rng.choice((48, 64, 96, 128))
                net = ipaddress.ip_network((((0xfd00 << 112) | (rng.randrange(len(atts)) << 96) | rng.randrange(1 << 60))
                                            >> (128 - length) << (128 - length), length))
                routes.append(route(rng.choice((str(net), "fe80::/64")), 10 + k, table, family=6))
            if rng.random() < 0.1:
                routes.append(dict(routes[-1]))
        for a in addresses[1:]:         # the edges of a subnet: its first and last address
            net = ipaddress.ip_interface(a["address"]).network
            for edge in (net.network_address, net.broadcast_address):
                if rng.random() < 0.3:
                    routes.append(route(f"{edge}/{edge.max_prefixlen}", 10 + rng.randrange(len(atts)), 254,
                                        family=edge.version))
        rules = DEFAULT_RULES + tuple({"family": 4, "priority": 100 + k, "src": a.ips[0].split("/")[0] + "/32",
                                       "table": 100, "action": 1} for k, a in enumerate(atts) if rng.random() < 0.3)
        f = facts(atts=atts, routes=tuple(routes), rules=rules, addresses=tuple(addresses))
        want = walked_plan(f)
        assert [(p.interface, p.source, p.destination, p.address, p.reason) for p in probe_plan(f)] == want
        seen.update(p[4] for p in want)
    assert seen == {"gateway", "subnet", "route", "carve-out"}      # every kind of lookup was compared


def test_lookups_beyond_the_budget_keep_gateways_subnets_and_wider_prefixes():
    """A pod's owner writes its routes, and each lookup is a netlink round trip
    (and a mismatch a series): within the budget, every attachment's gateway and
    subnets come first, then the routes' prefixes, wider first, in plan order."""
    extra = tuple(route(f"10.{80 + n // 250}.{n % 250}.0/24", NET1) for n in range(300))
    extra += (route("10.60.0.0/14", NET1), route("10.61.0.0/16", NET2))
    f = facts(routes=BASE_ROUTES + extra)
    plan = probe_plan(f)
    assert len(plan) > 300
    kept = within(plan, 10)
    assert len(kept) == 10
    assert [p for p in plan if p in kept] == kept                       # plan order
    first = [p for p in plan if p.reason in ("gateway", "subnet")]
    assert set(first) <= set(kept) and len(first) < 10
    prefix = lambda p: int(p.destination.rpartition("/")[2])     # noqa: E731
    routes_kept = [p for p in kept if p not in first]
    dropped = [p for p in plan if p not in kept]
    assert {p.destination for p in routes_kept} >= {"10.60.0.0/14", "10.61.0.0/16"}
    assert max(map(prefix, routes_kept)) <= min(map(prefix, dropped))
    assert within(plan, len(plan)) == plan and probe_plan(f, 10) == kept


# --- overlaps, rp_filter, policy rules -------------------------------------------------------

@pytest.mark.parametrize("net2_ips, net2_addresses, want", [
    (["10.72.0.10"], ({"ifindex": NET2, "address": "10.72.0.10/16"},), set()),
    (["10.72.0.10", "10.71.200.11"], ({"ifindex": NET2, "address": "10.72.0.10/16"},
                                      {"ifindex": NET2, "address": "10.71.200.11/24"}),
     {("net1", "net2", "10.71.0.0/16", "10.71.200.0/24"), ("net2", "net1", "10.71.200.0/24", "10.71.0.0/16")}),
    (["10.71.128.5/17"], (), {("net1", "net2", "10.71.0.0/16", "10.71.128.0/17"),
                              ("net2", "net1", "10.71.128.0/17", "10.71.0.0/16")}),
    (["fd00:71::5/64"], (), set()),        # another IP version never overlaps
])
def test_overlaps(net2_ips, net2_addresses, want):
    net2 = att("net2", NET2, net2_ips, "telco/data")
    f = facts(atts=(A_ETH0, A_NET1, net2), addresses=ADDRESSES[:3] + net2_addresses)
    a = analyse(f, answers_all_by_their_interface(f))
    assert {(o.attached.interface, o.other.interface, o.subnet, o.other_subnet) for o in a.overlaps} == want
    kinds = [(x["interface"], x["kind"]) for x in findings(f, a) if x["kind"] == "subnet_overlap"]
    assert sorted(kinds) == sorted((w[0], "subnet_overlap") for w in want)
    assert findings(for_findings(f), a) == findings(f, a)


@pytest.mark.parametrize("all_value, if_value, want", [
    (0, 0, 0), (1, 0, 1), (0, 1, 1), (0, 2, 2), (1, 2, 2), (2, 1, 2), (2, 0, 2),
])
def test_effective_rp_filter(all_value, if_value, want):
    assert effective_rp_filter(all_value, if_value) == want


@pytest.mark.parametrize("atts, rp, want", [
    # strict on a multi-homed pod: a finding per strict interface
    ((A_ETH0, A_NET1), {"all": 1, "eth0": 0, "net1": 0}, {"eth0", "net1"}),
    ((A_ETH0, A_NET1), {"all": 0, "eth0": 0, "net1": 1}, {"net1"}),
    # loose wins over strict (max)
    ((A_ETH0, A_NET1), {"all": 1, "eth0": 2, "net1": 2}, set()),
    # single-homed: strict is fine
    ((A_ETH0,), {"all": 1, "eth0": 1}, set()),
])
def test_strict_rp_filter_findings(atts, rp, want):
    f = facts(atts=atts, rp_filter=rp)
    a = analyse(f, answers_all_by_their_interface(f))
    got = {x["interface"] for x in findings(f, a) if x["kind"] == "strict_rp_filter"}
    assert got == want
    for x in findings(f, a):
        assert "net.ipv4.conf.all.rp_filter=1" in x["sentence"] or f"net.ipv4.conf.{x['interface']}.rp_filter=1" \
            in x["sentence"]
        assert "rp_filter=2" in x["fix"]


@pytest.mark.parametrize("rules, want", [
    (DEFAULT_RULES, ()),
    (DEFAULT_RULES + ({"family": 4, "priority": 1000, "src": "10.71.0.10/32", "table": 102, "action": 1},),
     (("10.71.0.10/32", 102),)),
    # a source rule into main is no table of its own; a blackhole rule selects no table
    (DEFAULT_RULES + ({"family": 4, "priority": 1000, "src": "10.71.0.10/32", "table": 254, "action": 1},
                      {"family": 4, "priority": 1001, "src": "10.72.0.0/16", "table": 0, "action": 6}), ()),
    # fwmark/iif rules without a source are not source-based
    (DEFAULT_RULES + ({"family": 4, "priority": 1000, "src": "", "table": 105, "action": 1},), ()),
])
def test_policy_rules(rules, want):
    assert policy_rules(rules) == want


# --- families ---------------------------------------------------------------------------

def test_families_round_trip_through_the_parser():
    f = facts(routes=BASE_ROUTES + (route("10.71.5.0/24", ETH0, gateway="10.70.255.254"),),
              rules=DEFAULT_RULES + ({"family": 4, "priority": 1000, "src": "10.72.0.10/32", "table": 103,
                                      "action": 1},),
              rp_filter={"all": 0, "eth0": 1, "net1": 2, "net2": 0})
    answers = answers_all_by_their_interface(f)
    answers[("10.71.0.10", "10.71.5.1")] = {"oif": ETH0, "table": 254, "type": 1}
    nginx = att("eth0", ETH0, ["10.70.0.20"], "k8s-pod-network", pod=("web", "nginx"))
    single = PodFacts("web", "nginx", (nginx,), LINKS,
                      ({"ifindex": ETH0, "address": "10.70.0.20/16"},), BASE_ROUTES[:2], DEFAULT_RULES,
                      {"all": 1, "eth0": 0})
    parsed = parse_metrics(render(families([analyse(f, answers), analyse(single, {})])).decode())
    mismatch = series(parsed, "planewatch_route_mismatch")
    assert {tuple(sorted(dict(k).items())): v for k, v in mismatch.items()} == {
        (("destination", "10.71.5.0/24"), ("egress_interface", "eth0"), ("interface", "net1"),
         ("namespace", "telco"), ("network", "telco/signaling"), ("plane", "telco/signaling"),
         ("pod", "upf")): 1}
    rp = {dict(k)["interface"] + "@" + dict(k)["pod"]: v for k, v in
          series(parsed, "planewatch_interface_rp_filter").items()}
    assert rp == {"eth0@upf": 1, "net1@upf": 2, "net2@upf": 0, "eth0@nginx": 1}
    policy = {dict(k)["pod"]: v for k, v in series(parsed, "planewatch_pod_policy_routing").items()}
    assert policy == {"upf": 1, "nginx": 0}
    (rule,) = series(parsed, "planewatch_pod_policy_rule_info")
    assert dict(rule) == {"namespace": "telco", "pod": "upf", "source": "10.72.0.10/32", "table": "103"}
    assert series(parsed, "planewatch_subnet_overlap") == {}


def test_a_pod_no_longer_analysed_stops_saying_its_cuts():
    """The routes source marks what its last analysis of a pod left out on the
    pod's netns (planewatch_pod_netns_cut_short); a pod with nothing left to
    analyse (its attachments' interfaces gone) says it no more."""
    from collector.model import Attachment, InterfaceView, Pod, PodView
    from collector.registry import Config, Snapshot
    from collector.sources.routes import RoutesSource

    class Netns:
        inode, fd = 7, -1
        read_cuts = {"routes": ("routes", "route_checks"), "neighbours": ("routes",)}

    a = Attachment("ns", "p", "uid-1", "core/n4", "net1", ips=("10.71.0.10",), plane="signaling")
    view = PodView(Pod("ns", "p", "uid-1", attachments=(a,)), "/run/netns/x", 7, "", (InterfaceView(a, None),))
    source = RoutesSource(Config())
    assert source.refresh(Snapshot((view,), netns={7: Netns()})) == []
    assert Netns.read_cuts == {"neighbours": ("routes",)}
