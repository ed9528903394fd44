"""Is each plane reachable? The neighbour state of every gateway an attachment
routes through, read in the pod's netns, and (opt-in) active probes of them.

Gateways of an attachment: the `gateway` list of its network-status entry, plus
the next hop of every route (any table, both families, multipath included) that
leaves by its interface. For each, the pod kernel's neighbour entry
(RTM_GETNEIGH): its NUD state and the NDA_CACHEINFO ages.

What the state means for an idle plane: the kernel resolves a gateway only
when something sends through it. An entry goes FAILED (or stays INCOMPLETE)
when a sender tried and the gateway never answered: the plane is down even if
the counters show no loss, because nothing left. A plane where nothing at all
is sent keeps a STALE entry whose confirmed age only grows; that is what the
active probes (collector/gateway_probe.py, off by default, per plane) are for.
A gateway with no entry at all is state "none".

Per pod netns per scrape, one RTM_GETNEIGH get per gateway, sent together on
a socket kept open there (collector/netns_pool.py), every pod's in one call of
kernel/nlbatch.py started before the sources run, and decoded by
kernel/rtnl_neighbours.py: a dump would walk the kernel's whole neighbour table,
every namespace's entries, once per pod. The routes' next
hops are dumped again only when the kernel announced a route change in that
netns (`HopCache`): the dump of every table (local routes included) is larger
than the neighbour table, and routes rarely change. Which gateways a pod has,
and the gets that ask for them, are worked out again only when its view or
its next hops changed (`GatewayPlan`).

Options: the `--collector.neighbours.*` flags registered below (no probes by default).
"""
from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from functools import lru_cache

from collector.budgets import DEFAULT_BUDGETS, Budgets
from collector.family import COUNTER, GAUGE, HISTOGRAM, Family, render_labels
from collector.gateway_probe import RTT_BUCKETS, Prober, Target
from collector.model import ATTACHMENT_LABELS, InterfaceView, Link, PodView
from collector.netns_pool import SHORT_DEFERRED, refresh_backoff
from collector.planes import PlaneSelector
from collector.registry import Config, NoData, Option, PodNetns, SameObjects, Snapshot, register
from collector.routes_analysis import CUT_ROUTES, MAIN_TABLE
from kernel import nlbatch
from kernel.rtnl_events import ChangeWatch
from kernel.rtnl_neighbours import (
    RTM_GETNEIGH,
    RTM_NEWNEIGH,
    Neighbour,
    NextHop,
    neighbour_gets,
    next_hops_bounded,
    parse_neigh,
    read_neighbours,
)

log = logging.getLogger(__name__)

# NUD_* bits (include/uapi/linux/neighbour.h); "none" = no entry, or NUD_NONE.
STATES = (("incomplete", 0x01), ("reachable", 0x02), ("stale", 0x04), ("delay", 0x08),
          ("probe", 0x10), ("failed", 0x20), ("noarp", 0x40), ("permanent", 0x80))
STATE_NAMES = ("none",) + tuple(name for name, _ in STATES)
DEFAULT_PROBE_RATE = 10.0
DEFAULT_PROBE_INTERVAL = 10.0
DEFAULT_PROBE_TIMEOUT = 1.0


def state_name(nud: int) -> str:
    for name, bit in STATES:
        if nud & bit:
            return name
    return "none"


@lru_cache(maxsize=4096)
def canonical(address: str) -> str:
    """One spelling per address (annotations may write IPv6 long-hand or with /len).
    Cached: every scrape asks again for every gateway and neighbour entry; a
    tenant adding addresses only churns the (bounded) cache."""
    try:
        return str(ipaddress.ip_address(address.split("/", 1)[0].strip()))
    except ValueError:
        return ""


@dataclass(frozen=True)
class Gateway:
    labels: tuple[str, ...]         # ATTACHMENT_LABELS values
    ifindex: int
    ifname: str
    address: str
    sources: tuple[str, ...]        # "annotation", "route <destination> table <n>"
    onlink_route: bool              # a route declares it on-link (RTNH_F_ONLINK)
    neighbour: Neighbour | None

    @property
    def state(self) -> str:
        return state_name(self.neighbour.state) if self.neighbour else "none"


SOURCES_KEPT = 8            # route sources remembered per gateway (debug detail, not exported)


def _importance(hop: NextHop) -> tuple[int, bool, int]:
    """Which of a pod's route gateways matter most to its plane, when not all
    can be kept: default routes first, then shorter prefixes; the main table
    before the others (a stable sort keeps the dump order among equals)."""
    prefixlen = 0 if hop.destination == "default" else int(hop.destination.rpartition("/")[2] or 0)
    return prefixlen, hop.table != MAIN_TABLE, hop.table


def gateway_addresses(view: PodView, hops: list[NextHop], limit: int = Budgets.attachment_gateways,
                      ) -> list[tuple[InterfaceView, Link, dict[str, list], int]]:
    """Per live interface of the pod: gateway address -> [sources, on-link route],
    at most `limit` addresses (the annotation's gateways first, then the routes'
    by `_importance`), and how many more there were. A pod's owner writes its
    routes: without the limit, routes through thousands of gateways were nine
    series each."""
    ranked = sorted(hops, key=_importance)
    out = []
    for iv in view.interfaces:
        if iv.link is None:
            continue            # a DPDK VF: no kernel neighbour table to read
        found: dict[str, list] = {}
        left_out: set[str] = set()
        candidates: list[tuple[str, str | NextHop, bool]] = [
            (canonical(gw), "annotation", False) for gw in iv.attachment.gateway]
        candidates += [(canonical(hop.gateway), hop, hop.onlink) for hop in ranked if hop.ifindex == iv.link.ifindex]
        for address, source, onlink in candidates:
            if not address:
                continue
            entry = found.get(address)
            if entry is None:
                if len(found) >= limit:
                    left_out.add(address)
                    continue
                entry = found[address] = [[], False]
            if len(entry[0]) < SOURCES_KEPT:
                entry[0].append(source if isinstance(source, str)
                                else f"route {source.destination} table {source.table}")
            entry[1] = entry[1] or onlink
        out.append((iv, iv.link, found, len(left_out)))
    return out


def _with_entries(addresses: list[tuple[InterfaceView, Link, dict[str, list], int]],
                  table: list[Neighbour]) -> list[Gateway]:
    by_key = {(n.ifindex, canonical(n.address)): n for n in table}
    return [Gateway(iv.labels, link.ifindex, link.name, address, tuple(sources), onlink,
                    by_key.get((link.ifindex, address)))
            for iv, link, found, _ in addresses for address, (sources, onlink) in found.items()]


def gateways_of(view: PodView, hops: list[NextHop], table: list[Neighbour],
                limit: int = Budgets.attachment_gateways) -> list[Gateway]:
    """Every gateway each live attachment of the pod routes through (within
    `limit` an attachment), with its entry in `table` (a neighbour table, or part
    of one)."""
    return _with_entries(gateway_addresses(view, hops, limit), table)


class GatewayPlan:
    """What reading a pod's gateways needs that changes only with its view or its
    next hops: the gateways of each interface, the neighbour gets to send, and
    the gateways left out by the budget ((labels, count) per attachment). NeighboursSource keeps
    it per pod netns while both are the same objects (the resolver and HopCache
    hand out the same ones while nothing changed)."""

    __slots__ = ("addresses", "gets", "left_out")

    def __init__(self, view: PodView, hops: list[NextHop], limit: int = Budgets.attachment_gateways):
        self.addresses = gateway_addresses(view, hops, limit)
        self.gets = neighbour_gets(sorted({(link.ifindex, address)
                                           for _, link, found, _ in self.addresses for address in found}))
        self.left_out = [(iv.labels, n) for iv, _, _, n in self.addresses if n]

    def read(self, rtnl) -> list[Gateway]:
        """The gateways with their entries read now (`rtnl` open in the pod's netns):
        one RTM_GETNEIGH get per gateway, all in one datagram."""
        return self.with_entries(read_neighbours(rtnl, self.gets))

    def with_entries(self, table: list[Neighbour]) -> list[Gateway]:
        """The gateways with their entries in `table` (the answers to `gets`)."""
        return _with_entries(self.addresses, table)


def read_gateways(view: PodView, hops: list[NextHop], rtnl, limit: int = Budgets.attachment_gateways) -> list[Gateway]:
    """`gateways_of` with the entries read from the pod's netns (`rtnl` open there)."""
    return GatewayPlan(view, hops, limit).read(rtnl)


def on_link_source(gateway: Gateway, addresses: list[tuple[int, str, int]]) -> str:
    """The pod's address on `gateway`'s interface whose prefix holds the gateway
    (for IPv6 link-local gateways: any IPv6 address there); "" when the gateway is
    not on-link for that interface, which rules it out as a probe target."""
    gw = ipaddress.ip_address(gateway.address)
    fallback = ""
    for ifindex, text, prefixlen in addresses:
        if ifindex != gateway.ifindex or not text:
            continue
        own = ipaddress.ip_address(text)
        if own.version != gw.version:
            continue
        if gw in ipaddress.ip_network(f"{text}/{prefixlen}", strict=False):
            return text
        if gw.version == 6 and gw.is_link_local:
            fallback = fallback if fallback and ipaddress.ip_address(fallback).is_link_local else text
    return fallback


def probe_targets(view: PodView, gateways: list[Gateway], addresses, planes: PlaneSelector) -> list[Target]:
    """The gateways of opted-in planes that may be probed: only the attachment's own
    gateways (by construction) and only when on-link for its interface."""
    macs = {iv.link.ifindex: iv.link.mac for iv in view.interfaces if iv.link}
    out = []
    for gw in gateways:
        if not planes(gw.labels[4]):
            continue
        source = on_link_source(gw, addresses)
        if not source or not macs.get(gw.ifindex):
            log.debug("pod %s: gateway %s is not on-link for %s: not probed",
                      view.pod.key, gw.address, gw.ifname)
            continue
        out.append(Target(gw.labels, gw.address, view.netns_path, view.netns_inode, gw.ifname, gw.ifindex,
                          macs[gw.ifindex], source))
    return out


GW_LABELS = ATTACHMENT_LABELS + ("gateway",)
HOPS_TTL = 300.0            # a safety net: route notifications trigger the re-read


@dataclass
class _Hops:
    hops: list[NextHop]
    when: float             # clock() of the dump
    cost: float             # seconds it took
    cut: bool               # stopped at the routes budget


class HopCache:
    """Next hops per pod netns, re-read when the kernel announced a change there
    (kernel/rtnl_events.py) or past the TTL, within the budgets: at most
    `netns_routes` routes a dump, and a netns whose dump is costly (a tenant
    flapping one of thousands of routes) re-read at most at the refresh share
    of the time (at most every CUT_BACKOFF when cut), as the pool does for links."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._watch = ChangeWatch()
        self._by_inode: dict[int, _Hops] = {}
        self._pending: set[int] = set()         # a change announced, its re-read deferred

    def hops(self, ns, budgets: Budgets = DEFAULT_BUDGETS) -> list[NextHop]:
        """The next hops of the first `netns_routes` routes the kernel dumps (more:
        planewatch_pod_netns_cut_short{reason="routes"} for the pod)."""
        known = self._by_inode.get(ns.inode)
        now = self._clock()
        # changed() drains the notifications before the dump: no change is missed
        if self._watch.changed(ns):
            self._pending.add(ns.inode)
        if known is not None and now - known.when <= HOPS_TTL:
            if ns.inode not in self._pending:
                return known.hops
            if now - known.when < refresh_backoff(known.cost, budgets.netns_refresh_share, known.cut,
                                                  len(known.hops)):
                ns.read_cuts["neighbours"] = ((CUT_ROUTES,) if known.cut else ()) + (SHORT_DEFERRED,)
                return known.hops
        started = time.monotonic()
        try:
            hops, more = next_hops_bounded(ns.rtnl, budgets.netns_routes)
            if more:
                ns.reopen()         # the stopped dump left the socket busy
        except OSError:
            self._by_inode.pop(ns.inode, None)
            self._pending.discard(ns.inode)
            self._watch.forget(ns.inode)
            raise
        self._pending.discard(ns.inode)
        ns.read_cuts["neighbours"] = (CUT_ROUTES,) if more else ()
        self._by_inode[ns.inode] = _Hops(hops, now, time.monotonic() - started, more)
        return hops

    def keep_only(self, inodes: set[int]) -> None:
        for inode in [i for i in self._by_inode if i not in inodes]:
            del self._by_inode[inode]
        self._pending &= inodes
        self._watch.keep_only(inodes)


@lru_cache(maxsize=2048)
def _gateway_series(labels: tuple[str, ...]) -> tuple[bytes, tuple[bytes, ...]]:
    """One gateway's rendered label sets: the ages' (GW_LABELS), and the state
    series', one per STATE_NAMES: the same strings as long as it exists."""
    return (render_labels(GW_LABELS, labels),
            tuple(render_labels(GW_LABELS + ("state",), labels + (name,)) for name in STATE_NAMES))


# the state series' values for each current state: 1 for it, 0 for the others
_ONE_HOT = {name: tuple(int(other == name) for other in STATE_NAMES) for name in STATE_NAMES}


def neighbour_families(gateways: list[Gateway], left_out=()) -> list[Family]:
    state = Family("planewatch_gateway_neighbour_state", GAUGE,
                   "Neighbour (ARP/NDP) state of a gateway the attachment routes through, in the pod's "
                   "netns: 1 for the current state. failed/incomplete: the gateway did not answer when the "
                   "pod last sent through it; none: no entry.", GW_LABELS + ("state",))
    ages = [Family(f"planewatch_gateway_neighbour_{what}_age_seconds", GAUGE, text, GW_LABELS)
            for what, text in (
                ("confirmed", "Seconds since the gateway last confirmed it is reachable (NDA_CACHEINFO)."),
                ("updated", "Seconds since the gateway's neighbour state last changed: how long it has been so."),
                ("used", "Seconds since the pod last sent through the gateway's neighbour entry."))]
    for gw in gateways:
        labels, states = _gateway_series(gw.labels + (gw.address,))
        state.extend_rendered(states, _ONE_HOT[gw.state])
        n = gw.neighbour
        if n is not None and n.confirmed_age is not None:
            for fam, value in zip(ages, (n.confirmed_age, n.updated_age, n.used_age)):
                if value is not None:       # NDA_CACHEINFO gives all three or none
                    fam.add_rendered(labels, value)
    cut = Family("planewatch_gateway_budget_cut", GAUGE,
                 "Gateways of the attachment (its annotation's, its routes' next hops) left out of "
                 "planewatch_gateway_neighbour_* by --budget.attachment-gateways.", ATTACHMENT_LABELS)
    for labels, n in left_out:
        cut.add(labels, n)
    return [state, *ages, cut]


def probe_families(results, delayed: int) -> list[Family]:
    probes = Family("planewatch_gateway_probes_total", COUNTER,
                    "Active ARP/NDP probes of the gateway from the pod's netns with a known outcome "
                    "(opt-in per plane).", GW_LABELS)
    failures = Family("planewatch_gateway_probe_failures_total", COUNTER,
                      "Active gateway probes left unanswered within the timeout.", GW_LABELS)
    rtt = Family("planewatch_gateway_probe_rtt_seconds", HISTOGRAM,
                 "Round-trip time of answered gateway probes (request sent to reply read).", GW_LABELS)
    waits = Family("planewatch_gateway_probes_delayed_total", COUNTER,
                   "Probes that waited for the per-node packets-per-second bound.")
    for target, r in results:
        labels = target.labels + (target.gateway,)
        probes.add(labels, r.probes)
        failures.add(labels, r.failures)
        rtt.add_histogram(labels, RTT_BUCKETS, r.cumulative(), r.rtt_sum, r.probes - r.failures)
    waits.add((), delayed)
    return [probes, failures, rtt, waits]


@register("neighbours", help="Neighbour state of each attachment's gateways (and opt-in ARP/NDP probes).",
          options=(
              Option("probe_planes", "", "planes (comma-separated, globs allowed) whose gateways are probed "
                     "(ARP/NDP from the pod's netns); none by default"),
              Option("probe_rate", DEFAULT_PROBE_RATE, "most probe packets per second, for the whole node", float),
              Option("probe_interval", DEFAULT_PROBE_INTERVAL, "seconds between two probes of one gateway", float),
              Option("probe_timeout", DEFAULT_PROBE_TIMEOUT, "seconds a probe waits for its reply", float),
          ))
class NeighboursSource:
    def __init__(self, config: Config):
        opts = config.settings("neighbours")
        self.probe_planes = PlaneSelector(opts["probe_planes"])
        self.prober = None
        if self.probe_planes:
            self.prober = Prober(opts["probe_rate"], opts["probe_interval"], opts["probe_timeout"])
        self.last: list[Gateway] = []
        self.hop_cache = HopCache()
        self._plans = SameObjects()         # pod netns inode -> GatewayPlan
        self.native = True          # kernel/nlbatch.py's C batch when built (False: RtnlSocket's reads)
        self._started = nlbatch.Started()

    def plan(self, snapshot: Snapshot) -> list[tuple[PodView, PodNetns, GatewayPlan]]:
        """Each pod netns to read and what to ask there (the next hops re-read
        where the kernel announced a route change)."""
        planned = []
        live = set()
        budgets = snapshot.budgets or DEFAULT_BUDGETS
        limit = budgets.attachment_gateways

        def make(view: PodView, hops: list[NextHop]) -> GatewayPlan:
            return GatewayPlan(view, hops, limit)

        for view in snapshot.pods:
            ns = snapshot.netns_of(view)
            if ns is None or view.pod.host_network or not any(iv.link for iv in view.interfaces):
                continue
            live.add(ns.inode)
            try:
                hops = self.hop_cache.hops(ns, budgets)
            except OSError as err:      # the pod went away mid-scrape: not a failure
                log.debug("pod %s: %s", view.pod.key, err)
                continue
            planned.append((view, ns, self._plans.get(ns.inode, (view, hops), make)))
        self.hop_cache.keep_only(live)
        self._plans.sweep()
        return planned

    @staticmethod
    def _gets(planned, native: bool) -> tuple[nlbatch.Requests, set[int]]:
        """The batch of every planned pod's gets (native: on kernel/nlbatch.py's
        thread and its sockets), and the pods left out of it: those whose batch
        socket cannot be opened (no fd left, the netns going away), which read()
        reads on the scrape thread's socket instead."""
        asks = []
        for view, ns, plan in planned:
            sock = ns.rtnl
            if native:
                try:
                    sock = ns.batch_socket()
                except OSError as err:
                    log.debug("pod %s: no batch socket: %s", view.pod.key, err)
                    sock = None
            asks.append((sock, RTM_GETNEIGH, plan.gets) if sock is not None else None)
        return (nlbatch.Requests([ask for ask in asks if ask is not None], native),
                {i for i, ask in enumerate(asks) if ask is None})

    def prefetch(self, snapshot: Snapshot) -> None:
        """Start this snapshot's neighbour gets on kernel/nlbatch.py's thread (the
        scraper calls this before any source runs); read() takes the answers."""
        if not (self.native and nlbatch.available()):
            return
        planned = self.plan(snapshot)
        gets, unbatched = self._gets(planned, True)
        self._started.start(snapshot, (planned, gets, unbatched), gets.run, RTM_NEWNEIGH)

    def read(self, snapshot: Snapshot) -> tuple[list[Gateway], list[Target], list[tuple[tuple[str, ...], int]]]:
        """The gateways of every pod with their entries, the probe targets among
        them, and (attachment labels, gateways left out by the budget)."""
        started = self._started.take(snapshot)
        if started is not None:
            planned, gets, unbatched = started
        else:
            planned = self.plan(snapshot)
            native = self.native and nlbatch.available()     # else the scrape thread's sockets, as ever
            gets, unbatched = self._gets(planned, native)
            nlbatch.run(native, gets.run, RTM_NEWNEIGH)
        gateways: list[Gateway] = []
        targets: list[Target] = []
        left_out = [cut for _, _, plan in planned for cut in plan.left_out]
        k = 0                   # the pod's place in the batch
        for i, (view, ns, plan) in enumerate(planned):
            try:
                if i in unbatched:
                    found = plan.read(ns.rtnl)
                else:
                    k += 1
                    found = plan.with_entries([parse_neigh(buf, s, e)
                                               for _, buf, s, e in gets.answers(k - 1, RTM_NEWNEIGH)])
                if self.probe_planes and any(self.probe_planes(g.labels[4]) for g in found):
                    targets += probe_targets(view, found, ns.prefixes, self.probe_planes)
            except OSError as err:      # the pod went away mid-scrape: not a failure
                log.debug("pod %s: %s", view.pod.key, err)
                continue
            gateways += found
        return gateways, targets, left_out

    def collect(self, snapshot: Snapshot) -> list[Family]:
        gateways, targets, left_out = self.read(snapshot)
        self.last = gateways
        if not snapshot.pods:
            raise NoData("no pods")
        families = neighbour_families(gateways, left_out)
        if self.prober is None:         # off: the families stay listed, empty
            return families + probe_families([], 0)
        self.prober.set_targets(targets)            # probing itself runs on the prober's thread
        return families + probe_families(self.prober.snapshot(), self.prober.delayed)

    def close(self) -> None:
        self._started.take(None)
        self.hop_cache.keep_only(set())
        self._plans.clear()
        if self.prober is not None:
            self.prober.close()
