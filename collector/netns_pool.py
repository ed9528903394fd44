"""Pod network namespaces kept open across scrapes: an fd (so the inode stays
valid), a netlink socket bound inside, its notification socket
(kernel/rtnl_events.py), and the link and address tables, re-read within the
netns budgets (collector/budgets.py) when the kernel announces a change. The
resolver (collector/netns.py) decides which pod a namespace belongs to; sources
read it through `Snapshot.netns_of`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from collector.budgets import Budgets
from kernel.rtnl import CUT_TIME, TIME_CUT_AFTER, LinkStats, RtnlSocket
from kernel.rtnl_events import EventPoller, NetnsEvents

LINKS_TTL = 300.0          # notifications keep the tables fresh; this is a safety net

# Reasons of planewatch_pod_netns_cut_short: the link table of the pod's netns was
# read only in part (the budget in links, addresses or time ran out), or a
# link change is known but its re-read deferred (refresh_deferred). The sources
# that read more of the netns add theirs in Namespace.read_cuts: "routes" (a
# route or rule dump stopped at --budget.netns-routes), "route_checks"
# (--budget.pod-route-checks), and "addresses" / "refresh_deferred" of their own
# reads (collector/sources/routes.py, neighbours.py).
SHORT_LINKS, SHORT_ADDRESSES, SHORT_TIME, SHORT_DEFERRED = "links", "addresses", "time", "refresh_deferred"
SHORT_REASONS = (SHORT_LINKS, SHORT_ADDRESSES, SHORT_TIME, SHORT_DEFERRED)
# Above this many links more than the ones wanted, counters are asked for per
# interface rather than by one dump of the whole namespace.
STATS_DUMP_SLACK = 16
# A namespace over its budgets is re-read on link events at most this often:
# each read costs the full time budget and still shows only part of it.
CUT_BACKOFF = 30.0


def refresh_backoff(cost: float, share: float, cut: bool, rows: int) -> float:
    """Least time between two event-driven re-reads of a table of a pod netns
    that took `cost` seconds and held `rows` rows: the refresh share for a large
    table, at least CUT_BACKOFF for one read only in part (`cut`). A small table
    is never held back: its read was slow only if the machine was (and a pod's
    flap must show at the next scrape)."""
    if cut:
        return max(CUT_BACKOFF, cost / share)
    if rows <= TIME_CUT_AFTER:
        return 0.0
    return cost / share


@dataclass
class Namespace:
    """A network namespace kept open: an fd (so the inode stays valid) and a socket."""

    path: str
    inode: int
    fd: int
    rtnl: RtnlSocket
    events: NetnsEvents
    budgets: Budgets = field(default_factory=Budgets)
    links: list[LinkStats] = field(default_factory=list)
    by_index: dict[int, LinkStats] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)     # ip -> ifindex
    prefixes: list[tuple[int, str, int]] = field(default_factory=list)    # (ifindex, ip, prefix length)
    refreshed: float = 0.0
    read_generation: int = -1           # events.generation the tables were read at
    cost: float = 0.0                   # seconds the last refresh took
    short: dict[str, int] = field(default_factory=dict)         # reason -> 1 (see SHORT_REASONS)
    # what a source's own reading of this netns left out, by source: reasons of
    # planewatch_pod_netns_cut_short too (routes source, neighbours' next hops)
    read_cuts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    batch_rtnl: RtnlSocket | None = None            # see batch_socket()

    def refresh(self, now: float) -> None:
        """Re-read links and addresses within the netns budgets (collector/budgets.py):
        a pod holding thousands of links costs a bounded share of the scrape."""
        self.read_generation = self.events.update()     # what we are about to read covers them
        started = time.monotonic()
        deadline = started + self.budgets.netns_refresh_seconds
        short: dict[str, int] = {}
        try:
            links, why = self.rtnl.links_bounded(self.budgets.netns_links, deadline)
            if why:
                short[SHORT_TIME if why == CUT_TIME else SHORT_LINKS] = 1
                self.reopen()
            addresses: list = []
            if why != CUT_TIME:         # (a small table may still be read past the deadline)
                addresses, why = self.rtnl.addresses_bounded(self.budgets.netns_addresses, deadline)
                if why:
                    short[SHORT_TIME if why == CUT_TIME else SHORT_ADDRESSES] = 1
                    self.reopen()
        finally:
            self.cost = time.monotonic() - started
        self.links = links
        self.by_index = {l.ifindex: l for l in links}
        self.addresses = {ip: idx for idx, ip, _ in addresses}
        self.prefixes = addresses
        self.short = short
        self.refreshed = now

    def find_links(self, names) -> None:
        """After a partial read, look the named interfaces up one by one (an
        attachment of this pod must not vanish because the pod holds many links)."""
        for name in names:
            if name and not any(l.name == name for l in self.links):
                link = self.rtnl.link_by_name(name)
                if link is not None:
                    self.links.append(link)
                    self.by_index[link.ifindex] = link

    def stale(self, now: float) -> bool:
        """Never read, past the TTL, or something changed since (a notification
        NetnsPool.poll found) and the refresh share allows it now: a netns whose
        refreshes are costly (a pod flapping one of thousands of links) is re-read
        less often."""
        if not self.refreshed or now - self.refreshed > LINKS_TTL:
            return True
        pending = self.events.generation != self.read_generation
        if pending and now - self.refreshed < self.backoff():
            self.short[SHORT_DEFERRED] = 1
            return False
        return pending

    def backoff(self) -> float:
        """Least time between two event-driven refreshes (`refresh_backoff`)."""
        return refresh_backoff(self.cost, self.budgets.netns_refresh_share,
                               cut=bool(self.short.keys() - {SHORT_DEFERRED}),
                               rows=len(self.links) + len(self.addresses))

    def dump_cap(self, ifindexes: set[int]) -> int:
        """How many links one RTM_GETSTATS dump of the whole namespace may bring
        when it is the way to read `ifindexes`' counters; 0 when they are asked
        for one by one (a namespace holding many more links than that, or read
        only in part)."""
        if self.short or len(self.links) > len(ifindexes) + STATS_DUMP_SLACK:
            return 0
        return len(self.links) + STATS_DUMP_SLACK

    def stats64(self, ifindexes: set[int]) -> dict[int, tuple[int, ...]]:
        if not self.dump_cap(ifindexes):
            return self.rtnl.stats64_of(sorted(ifindexes))
        return self.rtnl.stats64()

    def reopen(self) -> None:
        """A dump stopped half-way keeps the socket busy: replace it."""
        fresh = RtnlSocket.open(self.fd)
        self.rtnl.close()
        self.rtnl = fresh

    def batch_socket(self) -> RtnlSocket:
        """A second netlink socket in this netns, opened at first use, that only
        kernel/nlbatch.py's worker thread reads: its batches run while the
        sources use `rtnl`, and two readers of one socket would take each
        other's replies."""
        if self.batch_rtnl is None:
            self.batch_rtnl = RtnlSocket.open(self.fd)
        return self.batch_rtnl

    def close(self) -> None:
        self.events.close()
        self.rtnl.close()
        if self.batch_rtnl is not None:
            self.batch_rtnl.close()
        os.close(self.fd)


def open_sockets(fd: int) -> tuple[RtnlSocket, NetnsEvents]:
    """The two netlink sockets a kept namespace needs, made inside it."""
    rtnl = RtnlSocket.open(fd)
    try:
        return rtnl, NetnsEvents.open(fd)
    except BaseException:
        rtnl.close()
        raise


class NetnsPool:
    """Namespaces kept open across scrapes, keyed by inode. Not thread-safe:
    one scrape at a time uses it (exporters/metrics.py serialises scrapes).

    `sockets(fd, path)` makes a namespace's sockets; the root-free tests pass one
    that replays recorded netlink replies (tests/replay.py)."""

    def __init__(self, budgets: Budgets | None = None, sockets=None):
        self.budgets = budgets or Budgets()
        self._by_inode: dict[int, Namespace] = {}
        self._sockets = sockets or (lambda fd, path: open_sockets(fd))
        self._events = EventPoller()

    def poll(self) -> None:
        """Once a scrape, before the namespaces are read: which of them the kernel
        announced a change in (their events.generation goes up)."""
        self._events.poll()

    def open(self, path: str) -> Namespace:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            inode = os.fstat(fd).st_ino
            known = self._by_inode.get(inode)
            if known is None:
                rtnl, events = self._sockets(fd, path)
                known = self._by_inode[inode] = Namespace(path, inode, fd, rtnl, events, self.budgets)
                self._events.add(events)
                return known
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return known

    def get(self, inode: int) -> Namespace | None:
        return self._by_inode.get(inode)

    def keep_only(self, inodes: set[int]) -> None:
        for inode in list(self._by_inode):
            if inode not in inodes:
                ns = self._by_inode.pop(inode)
                self._events.remove(ns.events)
                ns.close()

    def close(self) -> None:
        self.keep_only(set())

    def __len__(self) -> int:
        return len(self._by_inode)
