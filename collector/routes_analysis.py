"""Asymmetric routing in one pod, worked out on plain data.

collector/sources/routes.py gathers, inside the pod's netns, the addresses, routes
(every table), rules, rp_filter sysctls and the kernel's answers to route
lookups (RTM_GETROUTE, like `ip route get DST from SRC`). Everything here is
pure: which lookups to ask for (`probe_plan`), what the answers mean
(`analyse`), and how to say it (`findings`).

A reply from an attachment's address should leave by that attachment. The
lookups test that for the destinations the attachment is supposed to serve:
its gateways (annotation), its subnets, every route installed via it (routes
a NAD adds), and every more specific route that carves a piece out of its
subnet through another interface. Asking the kernel (with the source
address) rather than matching prefixes here keeps policy rules, metrics and
route types exact.
"""
from __future__ import annotations

import bisect
import errno
import ipaddress
from dataclasses import dataclass, field, replace
from typing import Mapping

LOCAL_TABLE, MAIN_TABLE, DEFAULT_TABLE = 255, 254, 253
TABLE_NAMES = {LOCAL_TABLE: "local", MAIN_TABLE: "main", DEFAULT_TABLE: "default"}
RTN_UNICAST, RTN_LOCAL = 1, 2
FR_ACT_TO_TBL = 1
NO_ROUTE = "none"                  # egress_interface when the kernel has no route at all
FIRST_SUGGESTED_TABLE = 100        # policy tables suggested in fixes: 100 + attachment position
# Reasons of planewatch_pod_netns_cut_short set by the analysis: the route or rule
# dump stopped at --budget.netns-routes; lookups beyond --budget.pod-route-checks.
CUT_ROUTES, CUT_CHECKS = "routes", "route_checks"

Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Attached:
    """One attachment of the pod whose interface was found in its netns."""

    labels: tuple[str, ...]        # ATTACHMENT_LABELS values
    interface: str
    ifindex: int
    network: str = ""
    ips: tuple[str, ...] = ()      # as annotated, possibly with /len
    gateways: tuple[str, ...] = ()
    default: bool = False


@dataclass(frozen=True)
class PodFacts:
    """What the kernel said in the pod's netns (see collector/sources/routes.py for the shapes)."""

    namespace: str
    pod: str
    attachments: tuple[Attached, ...]
    links: Mapping[int, str] = field(default_factory=dict)      # ifindex -> name
    addresses: tuple[Mapping, ...] = ()    # {"ifindex": int, "address": "ip/len"}
    routes: tuple[Mapping, ...] = ()       # {"family": 4|6, "dst": "net/len"|"default", "table": int,
                                           #  "type": int, "oifs": (ifindex, ...), "gateway": str}
    rules: tuple[Mapping, ...] = ()        # {"family", "priority", "src": "net/len"|"", "table", "action"}
    rp_filter: Mapping[str, int] = field(default_factory=dict)  # "all" and interface -> value
    cut: tuple[str, ...] = ()              # what a budget left out of the reading (CUT_ROUTES, CUT_CHECKS)


@dataclass(frozen=True)
class Probe:
    interface: str       # the attachment asking
    source: str          # its address, the lookup's `from`
    destination: str     # what is checked, as a label: a gateway IP or a prefix
    address: str         # the address looked up
    reason: str          # gateway | subnet | route (installed via it) | carve-out (inside its subnet)


@dataclass(frozen=True)
class Mismatch:
    attached: Attached
    probe: Probe
    egress_interface: str
    table: int = 0
    route: Mapping | None = None   # the route in `table` that decided, when found
    error: int = 0


@dataclass(frozen=True)
class Overlap:
    attached: Attached
    other: Attached
    subnet: str
    other_subnet: str


@dataclass(frozen=True)
class RpFilter:
    attached: Attached
    effective: int
    all: int
    interface: int


@dataclass(frozen=True)
class Analysis:
    namespace: str
    pod: str
    multihomed: bool
    mismatches: tuple[Mismatch, ...] = ()
    overlaps: tuple[Overlap, ...] = ()
    rp_filters: tuple[RpFilter, ...] = ()
    policy_rules: tuple[tuple[str, int], ...] = ()     # (from, table) of source-based rules
    probes: int = 0


# --- subnets and the lookups to ask for ------------------------------------------

def subnets(att: Attached, addresses: tuple[Mapping, ...]) -> tuple[Subnet, ...]:
    """The attachment's subnets: the annotation's /len, else the kernel's prefix
    for that address on that interface. An address known to neither has none."""
    kernel: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, Subnet] = {}
    for a in addresses:
        if a["ifindex"] == att.ifindex:
            iface = ipaddress.ip_interface(a["address"])
            kernel[iface.ip] = iface.network
    out = []
    for ip in att.ips:
        net: Subnet | None
        try:
            if "/" in ip:
                net = ipaddress.ip_interface(ip).network
            else:
                net = kernel.get(ipaddress.ip_address(ip))
        except ValueError:
            continue
        if net is not None and net not in out:
            out.append(net)
    return tuple(out)


def sources(att: Attached, present: set | None = None) -> dict[int, str]:
    """version -> the attachment's first address of that IP version (of those in
    `present`, the pod's kernel addresses, when given: a lookup from an address
    the pod does not have is refused by the kernel and says nothing)."""
    out: dict[int, str] = {}
    for ip in att.ips:
        addr = _ip_or_none(ip)
        if addr is not None and (present is None or addr in present):
            out.setdefault(addr.version, str(addr))
    return out


def representative(net: Subnet, avoid: set) -> str | None:
    """An address inside `net` to look up: the first host that is none of the pod's own."""
    if net.num_addresses == 1:
        return None if net.network_address in avoid else str(net.network_address)
    first = net.network_address + (1 if net.num_addresses > 2 else 0)
    for offset in range(4):
        candidate = first + offset
        if candidate in net and candidate not in avoid:
            return str(candidate)
    return None


def own_addresses(facts: PodFacts) -> set:
    own = {ipaddress.ip_interface(a["address"]).ip for a in facts.addresses}
    for att in facts.attachments:
        own.update(ipaddress.ip_address(ip.split("/", 1)[0]) for ip in att.ips if _is_ip(ip))
    return own


def rule_tables(rules: tuple[Mapping, ...], source: str) -> set[int]:
    """Tables a source-based rule sends `source` to."""
    addr = ipaddress.ip_address(source)
    out = set()
    for r in rules:
        if r.get("src") and r.get("action", FR_ACT_TO_TBL) == FR_ACT_TO_TBL:
            src = ipaddress.ip_network(r["src"], strict=False)
            if src.version == addr.version and addr in src:
                out.add(r["table"])
    return out


def probe_plan(facts: PodFacts, limit: int | None = None) -> list[Probe]:
    """Every (source, destination) lookup the analysis needs, without duplicates;
    with `limit`, at most that many (`within`)."""
    plan = _all_probes(facts)
    return plan if limit is None else within(plan, limit)


def within(plan: list[Probe], limit: int) -> list[Probe]:
    """At most `limit` of the lookups, in their order: each attachment's gateways
    and subnets first, then the routes' prefixes, shorter ones (wider, more
    traffic) first. A pod's owner writes its routes; each lookup is a netlink
    round trip and each mismatch a series."""
    if len(plan) <= limit:
        return plan

    def rank(item: tuple[int, Probe]) -> tuple[int, int, int]:
        i, probe = item
        if probe.reason in ("gateway", "subnet"):
            return 0, 0, i
        return 1, int(probe.destination.rpartition("/")[2] or 0), i

    kept = sorted(sorted(enumerate(plan), key=rank)[:limit])
    return [probe for _, probe in kept]


def _all_probes(facts: PodFacts) -> list[Probe]:
    own = own_addresses(facts)
    kernel = {ipaddress.ip_interface(a["address"]).ip for a in facts.addresses}
    plan: dict[tuple[str, str, str], Probe] = {}
    routes = _RouteSpans(facts.routes)

    def add(att: Attached, source: str, destination: str, address: str | None, reason: str) -> None:
        if address is None or ipaddress.ip_address(address) in own:
            return
        probe = Probe(att.interface, source, destination, address, reason)
        plan.setdefault((att.interface, source, address), probe)

    for att in facts.attachments:
        srcs = sources(att, kernel)
        nets = subnets(att, facts.addresses)
        for gw in att.gateways:
            addr = _ip_or_none(gw)
            if addr is None or addr.is_link_local or addr.version not in srcs:
                continue        # a link-local gateway needs an oif to mean anything
            add(att, srcs[addr.version], str(addr), str(addr), "gateway")
        for net in nets:
            if net.version in srcs:
                add(att, srcs[net.version], str(net), representative(net, own), "subnet")
        tables = {v: {MAIN_TABLE} | rule_tables(facts.rules, src) for v, src in srcs.items()}
        spans = [_span(n) for n in nets]
        own_nets = {(v, lo, length) for v, length, lo, _ in spans}
        # the routes via the attachment, and the main table's routes inside one of
        # its subnets (carve-outs), in table order
        for i in sorted(routes.via(att.ifindex) | routes.inside(spans)):
            route, dst, (v, length, lo, hi) = routes.all[i]
            if v not in srcs or (v, lo, length) in own_nets:
                continue
            via_att = att.ifindex in route.get("oifs", ()) and route["table"] in tables[v]
            carves = route["table"] == MAIN_TABLE and any(
                nv == v and length > n_length and n_lo <= lo and hi <= n_hi for nv, n_length, n_lo, n_hi in spans)
            if via_att or carves:
                reason = "route" if via_att else "carve-out"
                add(att, srcs[v], str(dst), representative(dst, own), reason)
    return list(plan.values())


Span = tuple[int, int, int, int]        # version, prefix length, first and last address as ints


def _span(net: Subnet) -> Span:
    return net.version, net.prefixlen, int(net.network_address), int(net.broadcast_address)


class _RouteSpans:
    """The unicast routes a probe plan looks at (fe80::/64 is on every interface
    and multicast/local/broadcast routes serve nobody), parsed once, with the
    two questions the plan asks of them for each attachment answered without a
    walk of every route: thousands of routes times 32 attachments, all written
    by the pod's owner, were most of a second."""

    def __init__(self, routes: tuple[Mapping, ...]):
        self.all: list[tuple[Mapping, Subnet, Span]] = [
            (r, net, _span(net)) for r in routes if r.get("type", RTN_UNICAST) == RTN_UNICAST
            for net in [_route_network(r)] if net is not None and not net.is_link_local]
        self._by_oif: dict[int, set[int]] = {}
        main: list[tuple[int, int, int]] = []          # (version, first address, index) of main-table routes
        for i, (route, _, (v, _, lo, _)) in enumerate(self.all):
            for oif in route.get("oifs", ()):
                self._by_oif.setdefault(oif, set()).add(i)
            if route["table"] == MAIN_TABLE:
                main.append((v, lo, i))
        main.sort()
        self._main = main

    def via(self, ifindex: int) -> set[int]:
        return self._by_oif.get(ifindex, set())

    def inside(self, spans: list[Span]) -> set[int]:
        """Main-table routes lying within one of `spans` (candidates: the caller
        checks the prefix lengths)."""
        out: set[int] = set()
        for v, _, lo, hi in spans:
            k = bisect.bisect_left(self._main, (v, lo, -1))
            while k < len(self._main) and self._main[k][0] == v and self._main[k][1] <= hi:
                out.add(self._main[k][2])
                k += 1
        return out


# --- what the answers mean ---------------------------------------------------------

def responsible_route(routes: tuple[Mapping, ...], table: int, address: str, oif: int) -> Mapping | None:
    """The longest-prefix route of `table` containing `address` and leaving by `oif`
    (None when there is none: the table changed since the lookup)."""
    return RouteIndex(routes).find(table, address, oif)


class RouteIndex:
    """`responsible_route` for many lookups of one pod: the routes of each
    (table, oif) are parsed once and kept by prefix length and network, so a
    lookup costs one dict probe per prefix length in use, not a walk of every
    route (thousands of routes times hundreds of mismatches, all tenant-made).
    Of routes with the same network the first listed decides, as the walk did."""

    def __init__(self, routes: tuple[Mapping, ...]):
        self._routes = routes
        self._groups: dict[tuple[int, int], list[tuple[int, int, dict]]] = {}

    def _group(self, table: int, oif: int) -> list[tuple[int, int, dict]]:
        group = self._groups.get((table, oif))
        if group is None:
            by_len: dict[tuple[int, int], dict] = {}
            for route in self._routes:
                if route["table"] != table or oif not in route.get("oifs", ()):
                    continue
                dst = _route_network(route, default_too=True)
                if dst is not None:
                    by_len.setdefault((dst.version, dst.prefixlen), {}).setdefault(dst, route)
            group = self._groups[(table, oif)] = sorted(((v, n, nets) for (v, n), nets in by_len.items()),
                                                        key=lambda g: -g[1])
        return group

    def find(self, table: int, address: str, oif: int) -> Mapping | None:
        addr = ipaddress.ip_address(address)
        for version, prefixlen, nets in self._group(table, oif):
            if version == addr.version:
                route = nets.get(ipaddress.ip_network((addr, prefixlen), strict=False))
                if route is not None:
                    return route
        return None


def effective_rp_filter(all_value: int, interface_value: int) -> int:
    """The kernel applies max(conf.all.rp_filter, conf.<if>.rp_filter)."""
    return max(all_value, interface_value)


def policy_rules(rules: tuple[Mapping, ...]) -> tuple[tuple[str, int], ...]:
    """(from, table) of every source-based rule that picks a table of its own."""
    out = []
    for r in rules:
        if r.get("src") and r.get("action", FR_ACT_TO_TBL) == FR_ACT_TO_TBL \
                and r["table"] not in TABLE_NAMES:
            out.append((r["src"], r["table"]))
    return tuple(sorted(set(out)))


def find_overlaps(facts: PodFacts) -> tuple[Overlap, ...]:
    nets = [(att, subnets(att, facts.addresses)) for att in facts.attachments]
    out = []
    for i, (a, a_nets) in enumerate(nets):
        for b, b_nets in nets[i + 1:]:
            for x in a_nets:
                for y in b_nets:
                    if x.version == y.version and x.overlaps(y):
                        out += [Overlap(a, b, str(x), str(y)), Overlap(b, a, str(y), str(x))]
    return tuple(out)


def analyse(facts: PodFacts, answers: Mapping[tuple[str, str], Mapping],
            plan: list[Probe] | None = None, rules_shown: int | None = None) -> Analysis:
    """`answers` maps (source, address) of each probe to the lookup's answer:
    {"oif": int, "table": int, "type": int, "error": errno or 0}. `plan` is
    `probe_plan(facts)`, passed when the caller has it already; `rules_shown`
    bounds the policy rules kept (the first by source and table)."""
    by_if = {a.interface: a for a in facts.attachments}
    mismatches = []
    plan = probe_plan(facts) if plan is None else plan
    index = RouteIndex(facts.routes)
    for probe in plan:
        answer = answers.get((probe.source, probe.address))
        if answer is None:
            continue
        att = by_if[probe.interface]
        if answer.get("error"):
            mismatches.append(Mismatch(att, probe, NO_ROUTE, error=answer["error"]))
            continue
        if answer.get("type", RTN_UNICAST) == RTN_LOCAL or answer.get("oif") == att.ifindex:
            continue
        oif = answer.get("oif", 0)
        table = answer.get("table", MAIN_TABLE)
        mismatches.append(Mismatch(att, probe, facts.links.get(oif, f"if{oif}"), table,
                                   index.find(table, probe.address, oif)))
    rp = []
    for att in facts.attachments:
        if att.interface in facts.rp_filter and "all" in facts.rp_filter:
            all_v, if_v = facts.rp_filter["all"], facts.rp_filter[att.interface]
            rp.append(RpFilter(att, effective_rp_filter(all_v, if_v), all_v, if_v))
    return Analysis(facts.namespace, facts.pod, len(facts.attachments) > 1, tuple(mismatches),
                    find_overlaps(facts), tuple(rp), policy_rules(facts.rules)[:rules_shown], len(plan))


# --- saying it ---------------------------------------------------------------------

def describe_route(route: Mapping, links: Mapping[int, str]) -> str:
    text = route["dst"]
    if route.get("gateway"):
        text += f" via {route['gateway']}"
    devs = [links.get(i, f"if{i}") for i in route.get("oifs", ())]
    if devs:
        text += " dev " + ",".join(devs)
    return text


def table_name(table: int) -> str:
    return TABLE_NAMES.get(table, str(table))


def policy_fix(facts: PodFacts, att: Attached) -> str:
    """`ip rule`/`ip route` commands giving the attachment's sources a table of their own."""
    table = FIRST_SUGGESTED_TABLE + 1 + [a.interface for a in facts.attachments].index(att.interface)
    cmds = []
    nets = subnets(att, facts.addresses)
    for version, src in sorted(sources(att).items()):
        ip = "ip" if version == 4 else "ip -6"
        cmds.append(f"{ip} rule add from {src} table {table}")
        cmds += [f"{ip} route add {n} dev {att.interface} table {table}" for n in nets if n.version == version]
        gws = [g for g in att.gateways if getattr(_ip_or_none(g), "version", 0) == version]
        if gws:
            cmds.append(f"{ip} route add default via {gws[0]} dev {att.interface} table {table}")
    return "; ".join(dict.fromkeys(cmds))


WHAT = {"gateway": "its gateway {}", "subnet": "its subnet {}", "route": "{} (routed via {})",
        "carve-out": "{} (inside the subnet of {})"}


def probe_target(p: Probe) -> str:
    return WHAT.get(p.reason, "{}").format(p.destination, p.interface)


def for_findings(facts: PodFacts) -> PodFacts:
    """The facts as `findings` reads them, for keeping between analyses: without
    the routes and rules (a mismatch carries its route) and with the addresses
    of the attachments' interfaces only. Thousands of routes a pod's owner
    wrote are ~2 MiB kept per pod otherwise."""
    ifindexes = {a.ifindex for a in facts.attachments}
    return replace(facts, routes=(), rules=(),
                   addresses=tuple(a for a in facts.addresses if a["ifindex"] in ifindexes))


def findings(facts: PodFacts, analysis: Analysis) -> list[dict]:
    """One dict per problem: namespace, pod, interface, kind, sentence, fix."""
    out = [mismatch_finding(facts, m) for m in analysis.mismatches]
    out += [overlap_finding(facts, o) for o in analysis.overlaps]
    if analysis.multihomed:
        out += [rp_filter_finding(len(facts.attachments), rp) for rp in analysis.rp_filters if rp.effective == 1]
    return [{"namespace": analysis.namespace, "pod": analysis.pod, **f} for f in out]


def mismatch_finding(facts: PodFacts, m: Mismatch) -> dict:
    att, p = m.attached, m.probe
    what = f"Traffic from {p.source} ({att.interface}, network {att.network}) to {probe_target(p)}"
    if m.egress_interface == NO_ROUTE:
        sentence = (f"{what} has no route at all (lookup error {errno.errorcode.get(m.error, m.error)}); "
                    f"fix: route {att.interface}'s source by a policy routing table of its own.")
    else:
        cause = (f"the route `{describe_route(m.route, facts.links)}` in table {table_name(m.table)}"
                 if m.route is not None else f"the lookup in table {table_name(m.table)}")
        hint = ""
        if m.route is not None and m.route["dst"] == "default":
            hint = (f", or set \"default-route\" on {att.network} in the pod's "
                    "k8s.v1.cni.cncf.io/networks annotation if it should carry the default route")
        sentence = (f"{what} leaves by {m.egress_interface} instead of {att.interface}, because of {cause}; "
                    f"fix: give {att.interface}'s source a policy routing table{hint}.")
    return {"interface": att.interface, "kind": "route_mismatch", "sentence": sentence,
            "fix": policy_fix(facts, att)}


def overlap_finding(facts: PodFacts, o: Overlap) -> dict:
    a, b = o.attached, o.other
    return {"interface": a.interface, "kind": "subnet_overlap",
            "sentence": f"{a.interface} ({o.subnet}, network {a.network}) overlaps {b.interface} "
                        f"({o.other_subnet}, network {b.network}), so addresses in both are routed by one "
                        f"interface only and the other network's replies leave by the wrong one; fix: give "
                        f"the two networks disjoint IPAM ranges, or a policy routing table per interface.",
            "fix": policy_fix(facts, a)}


def rp_filter_finding(interfaces: int, rp: RpFilter) -> dict:
    iface = rp.attached.interface
    return {"interface": iface, "kind": "strict_rp_filter",
            "sentence": f"rp_filter is 1 (strict) on {iface} (max of net.ipv4.conf.all.rp_filter={rp.all} "
                        f"and net.ipv4.conf.{iface}.rp_filter={rp.interface}) in a pod with {interfaces} "
                        f"interfaces, so packets arriving on {iface} from sources the pod routes by another "
                        f"interface are dropped (IP_RPFILTER); fix: set rp_filter=2 (loose), or give each "
                        f"interface a policy routing table.",
            "fix": f"sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{iface}.rp_filter=2 "
                   f"(pod securityContext.sysctls)"}


def _route_network(route: Mapping, default_too: bool = False) -> Subnet | None:
    if route["dst"] == "default":
        if not default_too:
            return None
        return ipaddress.ip_network("::/0" if route.get("family") == 6 else "0.0.0.0/0")
    try:
        return ipaddress.ip_network(route["dst"], strict=False)
    except ValueError:
        return None


def _ip_or_none(text: str):
    try:
        return ipaddress.ip_address(text.split("/", 1)[0])
    except ValueError:
        return None


def _is_ip(text: str) -> bool:
    return _ip_or_none(text) is not None
