"""Each pod on the node resolved to its network namespace, and its attachments
to live interfaces there.

Two ways, the exact one first:
1. cgroup: a process whose /proc/<pid>/cgroup names the pod's UID
   (collector/cgroups.py) gives /proc/<pid>/ns/net; when a pinned namespace
   under --path.netns has the same inode, that stable path is kept instead.
2. netns dir: the namespaces pinned under --path.netns (/run/netns for
   containerd and CRI-O; some set-ups use /var/run/netns or /run/docker/netns)
   whose interfaces carry one of the pod's annotated MACs; for a pod whose
   annotation has no MAC at all, one of its IPs. A pod matching more than one
   namespace stays unresolved rather than mislabelled.

A resolution is kept until its namespace disappears; lookups of unresolved pods
are rate-limited so a pod we can never see does not cost a scan per scrape.
A pod resolved through the netns dir is checked again through its cgroup (with
backoff) and takes that answer: containerd runs the CNI ADD that writes
network-status before any process of the pod exists, so the first lookup of a
new pod often cannot use the exact path yet.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from collector.cgroups import scan_pod_netns
from collector.model import Attachment, InterfaceView, Link, Pod, PodView
from collector.rtnl import LinkEvents, LinkStats, RtnlSocket

log = logging.getLogger(__name__)

LINKS_TTL = 300.0          # link events keep the interface table fresh; this is a safety net
RETRY_UNRESOLVED = 5.0     # seconds between attempts for a pod not found yet
MIN_REFRESH = 1.0          # an annotated interface absent: re-read at most this often
NO_MAC = "00:00:00:00:00:00"
CONFIRM_BACKOFF_MAX = 320.0    # seconds between cgroup checks of a netns-dir resolution


@dataclass
class Namespace:
    """A network namespace kept open: an fd (so the inode stays valid) and a socket."""

    path: str
    inode: int
    fd: int
    rtnl: RtnlSocket
    events: LinkEvents
    links: list[LinkStats] = field(default_factory=list)
    by_index: dict[int, LinkStats] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)     # ip -> ifindex
    refreshed: float = 0.0

    def refresh(self, now: float) -> None:
        self.events.changed()                   # what we are about to read covers them
        self.links = self.rtnl.links()
        self.by_index = {l.ifindex: l for l in self.links}
        self.addresses = {ip: idx for idx, ip, _ in self.rtnl.addresses()}
        self.refreshed = now

    def stale(self, now: float) -> bool:
        """Never read, a link changed since (kernel notification), or past the TTL."""
        return not self.refreshed or self.events.changed() or now - self.refreshed > LINKS_TTL

    def close(self) -> None:
        self.events.close()
        self.rtnl.close()
        os.close(self.fd)


class NetnsPool:
    """Namespaces kept open across scrapes, keyed by inode. Not thread-safe:
    one scrape at a time uses it (exporters/metrics.py serialises scrapes)."""

    def __init__(self):
        self._by_inode: dict[int, Namespace] = {}

    def open(self, path: str) -> Namespace:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            inode = os.fstat(fd).st_ino
            known = self._by_inode.get(inode)
            if known is None:
                rtnl = RtnlSocket.open(fd)
                try:
                    events = LinkEvents.open(fd)
                except BaseException:
                    rtnl.close()
                    raise
                known = self._by_inode[inode] = Namespace(path, inode, fd, rtnl, events)
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
                self._by_inode.pop(inode).close()

    def close(self) -> None:
        self.keep_only(set())

    def __len__(self) -> int:
        return len(self._by_inode)


def list_netns_dir(path: str) -> dict[int, str]:
    """inode -> path of every namespace pinned in `path` (missing dir: none)."""
    found: dict[int, str] = {}
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    found.setdefault(entry.stat(follow_symlinks=True).st_ino, entry.path)
                except OSError:
                    continue
    except OSError:
        pass
    return found


def match_interfaces(pod: Pod, links: list[LinkStats], addresses: dict[str, int]) -> tuple[InterfaceView, ...]:
    """Pair each attachment with its interface: by name, else MAC, else IP.

    The default network's entry often has no `interface` (Multus quickstart
    output); it is then found by MAC or IP, and last assumed to be eth0.
    """
    by_name = {l.name: l for l in links}
    by_mac = {l.mac: l for l in links if l.mac and l.mac != NO_MAC}
    by_index = {l.ifindex: l for l in links}
    views = []
    for att in pod.attachments:
        link = by_name.get(att.interface) if att.interface else None
        if link is None and att.mac:
            link = by_mac.get(att.mac.lower())
        if link is None:
            for ip in att.addresses:
                idx = addresses.get(ip)
                if idx is not None:
                    link = by_index.get(idx)
                    break
        if link is None and not att.interface and att.default:
            link = by_name.get("eth0")
        views.append(InterfaceView(att, _as_link(link) if link else None))
    return tuple(views)


def _as_link(l: LinkStats) -> Link:
    return Link(l.ifindex, l.name, l.mac, l.mtu, l.up, l.kind)


def pod_keys(pod: Pod, how: str) -> set[str]:
    """What identifies the pod's namespace. IPs only for pods the annotation gives
    no MAC for: a MAC that matches nowhere means the namespace is not here, and an
    IP reused by another isolated network must not stand in for it."""
    macs = {a.mac.lower() for a in pod.attachments if a.mac}
    if how == "mac":
        return macs
    return set() if macs else {ip for a in pod.attachments for ip in a.addresses}


def namespace_index(namespaces: list[Namespace]) -> dict[str, dict[str, set[int]]]:
    """{"mac": mac -> inodes, "ip": ip -> inodes} over the given namespaces."""
    index: dict[str, dict[str, set[int]]] = {"mac": {}, "ip": {}}
    for ns in namespaces:
        for l in ns.links:
            if l.mac and l.mac != NO_MAC:
                index["mac"].setdefault(l.mac, set()).add(ns.inode)
        for ip in ns.addresses:
            index["ip"].setdefault(ip, set()).add(ns.inode)
    return index


class Resolver:
    """Keeps pod UID → namespace across scrapes; called once per scrape."""

    def __init__(self, netns_dir: str, procfs: str, pool: NetnsPool | None = None,
                 clock=time.monotonic):
        self.netns_dir = netns_dir
        self.procfs = procfs
        self.pool = pool or NetnsPool()
        self._clock = clock
        self._resolved: dict[str, tuple[int, str]] = {}     # uid -> (inode, how)
        self._tried: dict[str, float] = {}                  # uid -> last failed attempt
        self._confirm_at: dict[str, tuple[float, float]] = {}  # uid -> (next check, backoff)
        # uid -> (pod, (netns inode, refresh time), interfaces): matching is redone
        # only when the pod object or its namespace's link table changed
        self._matched: dict[str, tuple[Pod, tuple[int, float], tuple[InterfaceView, ...]]] = {}
        self._lock = threading.Lock()

    def resolve(self, pods: list[Pod]) -> list[PodView]:
        with self._lock:
            return self._resolve(pods)

    def _resolve(self, pods: list[Pod]) -> list[PodView]:
        now = self._clock()
        pinned = list_netns_dir(self.netns_dir)
        live_uids = {p.uid for p in pods}
        for uid in list(self._resolved):
            inode, _ = self._resolved[uid]
            if uid not in live_uids or not self._still_there(inode, pinned):
                del self._resolved[uid]
        self._tried = {u: t for u, t in self._tried.items() if u in live_uids}

        todo = [p for p in pods if p.uid not in self._resolved
                and now - self._tried.get(p.uid, -RETRY_UNRESOLVED) >= RETRY_UNRESOLVED]
        if todo:
            self._find(todo, pinned, now)
        self._confirm_at = {u: v for u, v in self._confirm_at.items()
                            if self._resolved.get(u, (0, "cgroup"))[1] != "cgroup"}
        for p in pods:
            if self._resolved.get(p.uid, (0, "cgroup"))[1] != "cgroup":
                self._confirm_at.setdefault(p.uid, (now + RETRY_UNRESOLVED, RETRY_UNRESOLVED))
        unconfirmed = [p for p in pods if p.uid in self._confirm_at and now >= self._confirm_at[p.uid][0]]
        if unconfirmed:
            self._confirm(unconfirmed, pinned, now)

        views = []
        used: set[int] = set()
        for pod in pods:
            found = self._resolved.get(pod.uid)
            ns = self.pool.get(found[0]) if found else None
            if ns is None:
                views.append(PodView(pod, interfaces=tuple(InterfaceView(a, None) for a in pod.attachments)))
                continue
            used.add(ns.inode)
            try:
                if ns.stale(now) or (now - ns.refreshed > MIN_REFRESH and _interface_missing(pod, ns)):
                    ns.refresh(now)
            except OSError as err:
                log.debug("refresh of %s failed: %s", ns.path, err)
            views.append(PodView(pod, ns.path, ns.inode, found[1], self._interfaces(pod, ns)))
        self.pool.keep_only(used)
        self._matched = {uid: m for uid, m in self._matched.items() if uid in live_uids}
        return views

    def _interfaces(self, pod: Pod, ns: Namespace) -> tuple[InterfaceView, ...]:
        cached = self._matched.get(pod.uid)
        if cached and cached[0] is pod and cached[1] == (ns.inode, ns.refreshed):
            return cached[2]
        interfaces = match_interfaces(pod, ns.links, ns.addresses)
        self._matched[pod.uid] = (pod, (ns.inode, ns.refreshed), interfaces)
        return interfaces

    def _still_there(self, inode: int, pinned: dict[int, str]) -> bool:
        ns = self.pool.get(inode)
        if ns is None:
            return False
        if inode in pinned:
            return True
        # Not pinned (found through /proc): alive while the process path still is.
        try:
            return os.stat(ns.path).st_ino == inode
        except OSError:
            return False

    def _by_cgroup(self, pods: list[Pod], pinned: dict[int, str], now: float) -> dict[str, int]:
        """uid -> netns inode (opened in the pool) for the pods a process was found for."""
        found = {}
        by_cgroup = scan_pod_netns(self.procfs, {p.uid for p in pods if p.uid})
        for pod in pods:
            path = by_cgroup.get(pod.uid)
            if not path:
                continue
            try:
                inode = os.stat(path).st_ino
                ns = self.pool.open(pinned.get(inode, path))
                ns.refresh(now)
            except OSError as err:
                log.debug("pod %s: %s: %s", pod.key, path, err)
                continue
            found[pod.uid] = ns.inode
        return found

    def _confirm(self, pods: list[Pod], pinned: dict[int, str], now: float) -> None:
        """The exact path replaces a netns-dir match once the pod has a process."""
        for pod in pods:
            backoff = min(self._confirm_at[pod.uid][1] * 2, CONFIRM_BACKOFF_MAX)
            self._confirm_at[pod.uid] = (now + backoff, backoff)
        for uid, inode in self._by_cgroup(pods, pinned, now).items():
            if inode != self._resolved[uid][0]:
                log.warning("pod %s: its cgroup's namespace is not the one its %s matched; "
                            "taking the cgroup's", uid, self._resolved[uid][1])
            self._resolved[uid] = (inode, "cgroup")

    def _find(self, todo: list[Pod], pinned: dict[int, str], now: float) -> None:
        claimed = {inode for inode, _ in self._resolved.values()}
        for uid, inode in self._by_cgroup(todo, pinned, now).items():
            self._resolved[uid] = (inode, "cgroup")
            claimed.add(inode)

        left = [p for p in todo if p.uid not in self._resolved and p.attachments]
        if left:
            index = namespace_index(self._open_unclaimed(pinned, claimed, now))
            # MACs first across every namespace, then IPs: an IP can repeat between
            # isolated networks where a MAC does not. A pod matching several
            # namespaces the same way stays unresolved rather than mislabelled.
            for how in ("mac", "ip"):
                for pod in list(left):
                    found = set().union(*(index[how].get(k, ()) for k in pod_keys(pod, how))) - claimed
                    if len(found) == 1:
                        inode = found.pop()
                        self._resolved[pod.uid] = (inode, f"netns-dir:{how}")
                        claimed.add(inode)
                        left.remove(pod)
                    elif found:
                        log.debug("pod %s: %d namespaces hold its %s", pod.key, len(found), how)
        for pod in todo:
            if pod.uid not in self._resolved:
                self._tried[pod.uid] = now

    def _open_unclaimed(self, pinned: dict[int, str], claimed: set[int], now: float) -> list[Namespace]:
        out = []
        for inode, path in pinned.items():
            if inode in claimed:
                continue
            try:
                ns = self.pool.open(path)
                if ns.stale(now):
                    ns.refresh(now)
            except OSError as err:
                log.debug("netns %s: %s", path, err)
                continue
            out.append(ns)
        return out

    def close(self) -> None:
        with self._lock:
            self.pool.close()
            self._resolved.clear()


def _interface_missing(pod: Pod, ns: Namespace) -> bool:
    names = {l.name for l in ns.links}
    return any(a.interface and a.interface not in names for a in pod.attachments)
