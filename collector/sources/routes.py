"""Routes source: static asymmetric-routing analysis inside each pod's netns.

Per pod, inside its netns (collector/routes_analysis.py says what it means):
addresses, routes of every table, rules, `ip route get DST from SRC` for the
destinations each attachment should serve, and rp_filter from
/proc/sys/net/ipv4/conf — which shows the netns of the *reading thread*, so it
is read while the thread is inside. Exports route_mismatch, subnet_overlap,
interface_rp_filter and the pod's source-based policy rules; `findings()`
explains them for /debug/attachments.

Routes change rarely and the analysis costs a few ms of CPU a pod, so results
are cached. A pod is analysed again when its attachments
or namespace change, when the kernel announces a route/rule/address/link/
rp_filter change in its netns (rtnetlink multicast, `ChangeWatch`; at most once
per `min_gap`), and otherwise every `interval` as a safety net; all within a
per-scrape time budget (new pods first, under `budget_new`, so the first
scrape shows a normal node whole; then changed, then the stalest, under
`budget`): a scrape of 250 pods serves cached results.

Netlink: one rtnetlink socket per analysis (kernel/rtnl_routes.py over
kernel/rtnl.py), created while the thread is inside the netns, closed right
after; it subscribes to no event stream. (pyroute2 did this until its ~10 MiB of
RSS on every node outweighed the ~100 lines of decoding it saved.)

Options: the `--collector.routes.*` flags registered below.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

from collector.budgets import DEFAULT_BUDGETS, Budgets
from collector.family import GAUGE, Family, render_labels
from collector.model import ATTACHMENT_LABELS, PodView
from collector.netns_pool import SHORT_ADDRESSES
from collector.registry import Config, NoData, Option, SameObjects, Snapshot, register
from collector.routes_analysis import (
    CUT_CHECKS,
    CUT_ROUTES,
    LOCAL_TABLE,
    Analysis,
    Attached,
    PodFacts,
    analyse,
    findings,
    for_findings,
    policy_rules,
    probe_plan,
    within,
)
from kernel import rtnl_routes
from kernel.nsenter import in_netns
from kernel.rtnl import NetlinkError, RtnlSocket
from kernel.rtnl_events import ChangeWatch

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 300.0       # a safety net: kernel events trigger re-analysis (ChangeWatch)
DEFAULT_MIN_GAP = 1.0          # a pod whose routing keeps changing: at most one analysis a second
DEFAULT_BUDGET = 0.2           # seconds of analysis per scrape for pods already known
DEFAULT_BUDGET_NEW = 2.0       # ... and for pods never analysed (the first scrape shows them all)
FAMILY_VERSION = rtnl_routes.FAMILY_VERSION
# errnos of a route lookup that mean "no route", not "the analysis failed"
NO_ROUTE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL, errno.EACCES, errno.EPERM}


# --- I/O: one pod --------------------------------------------------------------------

def attached_interfaces(view: PodView) -> tuple[Attached, ...]:
    out = []
    for iv in view.interfaces:
        if iv.link is None:
            continue        # a VF bound to DPDK, or not there yet: no routes to check
        a = iv.attachment
        out.append(Attached(iv.labels, iv.link.name, iv.link.ifindex, a.network, a.ips, a.gateway, a.default))
    return tuple(out)


def read_rp_filter(procfs: str, interfaces) -> dict[str, int]:
    """Call with the thread inside the pod netns: /proc/sys/net is per reader."""
    out = {}
    for name in ("all", *interfaces):
        try:
            with open(os.path.join(procfs, "sys/net/ipv4/conf", name, "rp_filter")) as f:
                out[name] = int(f.read().strip())
        except (OSError, ValueError):
            continue
    return out


def read_pod(netns_fd: int, procfs: str, namespace: str, pod: str,
             atts: tuple[Attached, ...], links: dict[int, str],
             budgets: Budgets = DEFAULT_BUDGETS) -> tuple[PodFacts, list, dict]:
    """Everything the analysis needs from one netns: the facts, the lookups
    planned and their answers."""
    socks: list[RtnlSocket] = []

    def fresh() -> RtnlSocket:          # another socket in the netns (a cut dump leaves one busy)
        socks.append(RtnlSocket.open(netns_fd))
        return socks[-1]
    try:
        with in_netns(netns_fd):
            socks.append(RtnlSocket.open())         # the socket is made here: inside
            rp_filter = read_rp_filter(procfs, [a.interface for a in atts])
        return read_facts(socks[0], rp_filter, namespace, pod, atts, links, budgets, fresh)
    finally:
        for sock in socks:
            sock.close()


def read_facts(sock: RtnlSocket, rp_filter: dict[str, int], namespace: str, pod: str,
               atts: tuple[Attached, ...], links: dict[int, str], budgets: Budgets = DEFAULT_BUDGETS,
               reopen: Callable[[], RtnlSocket] | None = None) -> tuple[PodFacts, list, dict]:
    """The dumps and lookups of `read_pod` on an open rtnetlink socket (one whose
    replies were recorded: tests/replay.py), within the budgets: at most
    `netns_routes` routes and rules of each family (a dump stopped there leaves
    the socket busy: `reopen` gives another), at most `netns_addresses` addresses,
    at most `pod_route_checks` lookups."""
    versions = {6 if ":" in ip else 4 for a in atts for ip in a.ips} or {4}
    families = [f for f, v in FAMILY_VERSION.items() if v in versions]
    routes: list[dict] = []
    rules: list[dict] = []
    cut: list[str] = []

    def bounded(dump, into: list, limit: int, reason: str, *args) -> None:
        nonlocal sock
        got, more = dump(sock, *args, limit)
        into += got
        if more:                # the stopped dump left the socket busy
            if reopen is None:
                raise OSError(errno.EBUSY, "a cut dump left the socket busy and there is no other")
            sock = reopen()
            if reason not in cut:
                cut.append(reason)

    addresses: list[dict] = []
    bounded(rtnl_routes.addresses_bounded, addresses, budgets.netns_addresses, SHORT_ADDRESSES)
    for fam in families:
        bounded(rtnl_routes.routes_bounded, routes, budgets.netns_routes, CUT_ROUTES, fam)
        bounded(rtnl_routes.rules_bounded, rules, budgets.netns_routes, CUT_ROUTES, fam)
    routes = [r for r in routes if r["table"] != LOCAL_TABLE]     # local/broadcast entries: nothing to check
    facts = PodFacts(namespace, pod, atts, links, tuple(addresses), tuple(routes), tuple(rules), rp_filter)
    answers = {}
    wanted = probe_plan(facts)
    plan = within(wanted, budgets.pod_route_checks)
    if len(plan) < len(wanted) or len(policy_rules(facts.rules)) > budgets.pod_route_checks:
        cut.append(CUT_CHECKS)
    facts = replace(facts, cut=tuple(cut))
    for probe in plan:
        try:
            answers[(probe.source, probe.address)] = rtnl_routes.route_get(sock, probe.address, probe.source)
        except NetlinkError as err:
            if err.errno not in NO_ROUTE_ERRNOS:
                raise
            answers[(probe.source, probe.address)] = {"error": err.errno}
    return facts, plan, answers


# --- the source ----------------------------------------------------------------------

@dataclass
class Cached:
    fingerprint: tuple
    facts: PodFacts
    analysis: Analysis
    at: float
    seconds: float          # what the analysis cost: wall clock
    cpu_seconds: float      # and this thread's CPU time


@register("routes", help="Asymmetric-routing analysis (route lookups, overlaps, rp_filter) in each pod netns.",
          options=(
              Option("interval", DEFAULT_INTERVAL, "seconds after which a pod's routing is analysed again "
                     "even without a kernel change event", float),
              Option("min_gap", DEFAULT_MIN_GAP, "least seconds between two analyses of one pod "
                     "whose routing keeps changing", float),
              Option("budget", DEFAULT_BUDGET, "seconds of analysis per scrape for pods analysed before "
                     "(the rest waits for the next scrape)", float),
              Option("budget_new", DEFAULT_BUDGET_NEW, "seconds of analysis per scrape for pods never "
                     "analysed", float),
          ))
class RoutesSource:
    def __init__(self, config: Config, clock=time.monotonic):
        opts = config.settings("routes")
        self.procfs = config.paths.procfs
        self.interval = opts["interval"]
        self.min_gap = opts["min_gap"]
        self.budget = opts["budget"]
        self.budget_new = opts["budget_new"]
        self._clock = clock
        self._cache: dict[str, Cached] = {}
        self._dirty: set[str] = set()          # the kernel announced a change since the last analysis
        # uid -> its attached interfaces: a view the resolver handed out again (the
        # same object: pod and links unchanged) keeps the same tuple, so the
        # fingerprint comparison is one identity check
        self._attached = SameObjects()
        self.watch = ChangeWatch()
        self.read_pod = read_pod            # replaced by tests/replay.py with recorded replies
        self._rows = SameObjects()          # id(analysis) -> its series
        self._lock = threading.Lock()       # collect() and findings() may come from two threads

    def refresh(self, snapshot: Snapshot) -> list[Cached]:
        """Analyse what is new, changed or stale (within the budget); the cached
        result of every live pod, in snapshot order."""
        with self._lock:
            return self._refresh(snapshot)

    def _refresh(self, snapshot: Snapshot) -> list[Cached]:
        live = self._live(snapshot)
        for uid in [u for u in self._cache if u not in live]:
            del self._cache[uid]
        self._dirty &= set(live)
        for uid, (view, ns, _, _) in live.items():
            try:
                if self.watch.changed(ns):
                    self._dirty.add(uid)
            except OSError as err:
                log.debug("pod %s: change watch: %s", view.pod.key, err)
                self._dirty.add(uid)
        self.watch.keep_only({v[1].inode for v in live.values()})
        now, started = self._clock(), time.perf_counter()
        budgets = snapshot.budgets or DEFAULT_BUDGETS
        for n, uid in enumerate(self._due(live, now)):
            limit = self.budget_new if uid not in self._cache else self.budget
            if n and time.perf_counter() - started > limit:
                break       # the rest waits for the next scrape; at least one pod progresses
            view, ns, atts, fp = live[uid]
            self._analyse(uid, view, ns, atts, fp, now, budgets)
        for uid, (_, ns, _, _) in live.items():
            if uid in self._cache:      # (a netns reopened since keeps saying it)
                ns.read_cuts["routes"] = self._cache[uid].facts.cut
        return [self._cache[u] for u in live if u in self._cache]

    def _live(self, snapshot: Snapshot) -> dict[str, tuple]:
        """uid -> (view, namespace, attachments, fingerprint) of every pod to analyse."""
        live = {}
        for view in snapshot.pods:
            ns = snapshot.netns_of(view)
            if ns is None or view.pod.host_network:
                continue
            atts = self._attached.get(view.pod.uid, (view,), attached_interfaces)
            if atts:
                live[view.pod.uid] = (view, ns, atts, (view.netns_inode, atts))
            else:
                ns.read_cuts.pop("routes", None)        # nothing of it is analysed any more
        self._attached.sweep()
        return live

    def _due(self, live: dict[str, tuple], now: float) -> list[str]:
        """New or re-attached pods first, then those the kernel changed, then the stalest."""
        cache = self._cache
        new = [u for u, v in live.items() if u not in cache or cache[u].fingerprint != v[3]]
        changed = [u for u in live if u not in new and u in self._dirty and now - cache[u].at >= self.min_gap]
        stale = sorted((u for u in live if u not in new and u not in changed
                        and now - cache[u].at >= self.interval), key=lambda u: cache[u].at)
        return new + changed + stale

    def _analyse(self, uid: str, view: PodView, ns, atts, fp, now: float, budgets: Budgets) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        self._dirty.discard(uid)        # events from here on are after what we read
        try:
            # the link table the pool read within its budget, not another dump of it
            links = {ifindex: link.name for ifindex, link in ns.by_index.items()}
            facts, plan, answers = self.read_pod(ns.fd, self.procfs, view.pod.namespace, view.pod.name,
                                                 atts, links, budgets)
        except OSError as err:          # the pod's netns went away meanwhile: not a failure
            log.debug("pod %s: %s", view.pod.key, err)
            self._cache.pop(uid, None)
            return
        analysis = analyse(facts, answers, plan, budgets.pod_route_checks)
        self._cache[uid] = Cached(fp, for_findings(facts), analysis, now, time.perf_counter() - t0,
                                  time.thread_time() - c0)

    def collect(self, snapshot: Snapshot) -> list[Family]:
        results = self.refresh(snapshot)
        if not results and not snapshot.pods:
            raise NoData("no pods")
        # a pod's series change only with its analysis (the same object until the
        # next one): rendered once each
        fams = families([c.analysis for c in results], lambda a: self._rows.get(id(a), (a,), analysis_rows))
        self._rows.sweep()
        return fams

    def findings(self, snapshot: Snapshot) -> list[dict]:
        out = []
        for cached in self.refresh(snapshot):
            out.extend(findings(cached.facts, cached.analysis))
        return out

    def costs(self) -> list[tuple[float, float]]:
        """(wall, CPU) seconds each cached analysis took, for benchmarks and tests."""
        return [(c.seconds, c.cpu_seconds) for c in self._cache.values()]

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self.watch.keep_only(set())


_FAMILIES = (
    ("planewatch_route_mismatch",
     "1 when, in the pod, the route lookup from the attachment's address to a destination "
     "it serves (its gateway, its subnet, a route via it) leaves by egress_interface "
     "instead (\"none\": no route). destination is the gateway address or the prefix "
     "checked.", ATTACHMENT_LABELS + ("destination", "egress_interface")),
    ("planewatch_subnet_overlap",
     "1 when a subnet of the attachment overlaps a subnet of the pod's other_interface.",
     ATTACHMENT_LABELS + ("other_interface",)),
    ("planewatch_interface_rp_filter",
     "Effective rp_filter of the pod interface: max(net.ipv4.conf.all, net.ipv4.conf.<if>); "
     "0 off, 1 strict, 2 loose.", ATTACHMENT_LABELS),
    ("planewatch_pod_policy_routing",
     "1 when the pod has source-based policy rules (ip rule from ... table N).", ("namespace", "pod")),
    ("planewatch_pod_policy_rule_info",
     "One series per source-based policy rule in the pod (value 1).", ("namespace", "pod", "source", "table")),
)

Rows = tuple[tuple[tuple[bytes, ...], tuple[int, ...]], ...]


def analysis_rows(a: Analysis) -> Rows:
    """One pod's series, as (rendered label sets, values) per family of _FAMILIES."""
    (_, _, mismatch), (_, _, overlap), (_, _, rp), (_, _, policy), (_, _, rules) = _FAMILIES
    out = (
        [(render_labels(mismatch, labels), 1) for labels in sorted(
            {m.attached.labels + (m.probe.destination, m.egress_interface) for m in a.mismatches})],
        [(render_labels(overlap, labels), 1) for labels in sorted(
            {o.attached.labels + (o.other.interface,) for o in a.overlaps})],
        [(render_labels(rp, r.attached.labels), r.effective) for r in a.rp_filters],
        [(render_labels(policy, (a.namespace, a.pod)), 1 if a.policy_rules else 0)],
        [(render_labels(rules, (a.namespace, a.pod, source, str(table))), 1) for source, table in a.policy_rules],
    )
    return tuple((tuple(labels for labels, _ in rows), tuple(value for _, value in rows)) for rows in out)


def families(analyses: list[Analysis], rows=analysis_rows) -> list[Family]:
    """The families of the pods' analyses; `rows` gives a pod's series (the
    source passes one that keeps them while the analysis is the same)."""
    fams = [Family(name, GAUGE, text, labelnames) for name, text, labelnames in _FAMILIES]
    for a in analyses:
        for fam, (labels, values) in zip(fams, rows(a)):
            fam.extend_rendered(labels, values)
    return fams
