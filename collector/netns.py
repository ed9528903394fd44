"""Each pod on the node resolved to its network namespace, and its attachments
to live interfaces there.

Two ways, the exact one first:
1. cgroup: a process whose /proc/<pid>/cgroup names the pod's UID
   (collector/cgroups.py) gives /proc/<pid>/ns/net; when a pinned namespace
   under --path.netns has the same inode, that stable path is kept instead.
2. netns dir: the namespaces pinned under --path.netns (/run/netns for
   containerd and CRI-O; some set-ups use /var/run/netns or /run/docker/netns)
   whose interfaces carry the pod's annotated MACs; for a pod whose annotation
   has no MAC at all, its IPs. What decides is what is unique to the pod: a MAC
   several namespaces hold (ipvlan attachments all carry their master's MAC) does
   not, the pod's other MACs and then its IPs do.

Identity (what a tenant cannot forge comes first): a namespace whose processes
sit in a pod's cgroup belongs to that pod and is never given to another pod
through annotations. A namespace that two pods' annotations claim on equal
evidence is given to neither; both carry the conflict (PodView.conflicts,
`planewatch_pod_identity_conflict`), so a pod copying another's MAC blinds
itself visibly instead of reading its victim's counters.

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

from collector.budgets import Budgets
from collector.cgroups import scan_pod_processes
from collector.model import InterfaceView, Link, Pod, PodView
from collector.netns_pool import Namespace, NetnsPool
from kernel.rtnl import LinkStats

log = logging.getLogger(__name__)

RETRY_UNRESOLVED = 5.0     # seconds between attempts for a pod not found yet
MIN_REFRESH = 1.0          # an annotated interface absent: re-read at most this often
NO_MAC = "00:00:00:00:00:00"
CONFIRM_BACKOFF_MAX = 320.0    # seconds between cgroup checks of a netns-dir resolution


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


# A directory changed this recently is listed at every look (see PinnedDir).
PIN_SETTLE_NS = 2_000_000_000
PIN_TTL = 60.0


class PinnedDir:
    """`list_netns_dir` of one directory, listed again only when the directory
    changed: one stat a scrape instead of one per pinned namespace. Pinning
    (`ip netns add`, the CRI's /run/netns) creates a file, then mounts the
    namespace over it, and the mount does not change the directory: so a
    directory changed in the last PIN_SETTLE_NS is listed at every look, and a
    listing is kept at most PIN_TTL seconds (a name unmounted or re-mounted in
    place)."""

    def __init__(self, path: str, clock=time.monotonic, wall_ns=time.time_ns):
        self.path = path
        self._clock, self._wall_ns = clock, wall_ns
        self._seen: tuple[int, int, int] | None = None      # (inode, mtime, ctime) of a settled listing
        self._at = 0.0
        self._found: dict[int, str] = {}

    def list(self) -> dict[int, str]:
        try:
            st = os.stat(self.path)
        except OSError:
            self._seen, self._found = None, {}
            return {}
        seen, now = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns), self._clock()
        if seen != self._seen or now - self._at > PIN_TTL:
            settled = self._wall_ns() - st.st_mtime_ns >= PIN_SETTLE_NS
            self._found, self._at = list_netns_dir(self.path), now
            # kept only when listed after the change settled
            self._seen = seen if settled else None
        return self._found


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
        carrier = bridged_carrier(link, by_name, by_index) if link else None
        if carrier is not None:
            views.append(InterfaceView(att, _as_link(carrier), name=att.interface))
            continue
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


def bridged_carrier(link: LinkStats, by_name: dict, by_index: dict) -> LinkStats | None:
    """The link that carries what `link` is annotated for, when it is not `link`.

    KubeVirt's bridge binding renames the pod's real link `pod<hash>` (or `eth0`)
    to `<hash>-nic` (`eth0-nic`), makes it a port of the bridge `k6t-<hash>` with
    the VM's tap, and leaves a dummy under the annotated name and MAC: the dummy
    sees no traffic. Kernel facts decide, not names alone: the `-nic` link must be
    a port of a bridge and the named link must be no port at all.
    """
    base = link.name[3:] if link.name.startswith("pod") else link.name
    nic = by_name.get(f"{base}-nic")
    if nic is None or not nic.master or link.master:
        return None
    bridge = by_index.get(nic.master)
    return nic if bridge is not None and bridge.kind == "bridge" else None


def _as_link(l: LinkStats) -> Link:
    return Link(l.ifindex, l.name, l.mac, l.mtu, l.up, l.kind, l.master)


def pod_keys(pod: Pod) -> tuple[set[str], set[str]]:
    """(annotated MACs, annotated IPs) of the pod."""
    macs = {a.mac.lower() for a in pod.attachments if a.mac}
    return macs, {ip for a in pod.attachments for ip in a.addresses}


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


def _holders(keys: set[str], index: dict[str, set[int]], among: set[int] | None = None) -> dict[str, set[int]]:
    held = {k: index.get(k, set()) for k in keys}
    return {k: (v & among if among is not None else v) for k, v in held.items()}


def claim(pod: Pod, index: dict[str, dict[str, set[int]]]) -> tuple[set[int], str]:
    """(namespaces the pod's annotation points at, by what): one when it is decided.

    A pod with MACs is where its MACs are (a MAC found nowhere: not here; an IP
    reused by another isolated network must not stand in). Of several namespaces
    holding its MACs, those holding a MAC no other candidate holds decide; then its
    IPs. A pod without MACs is where its IPs are.
    """
    macs, ips = pod_keys(pod)
    if macs:
        found = set().union(*_holders(macs, index["mac"]).values())
        if len(found) <= 1:
            return found, "mac"
        unique = {next(iter(v)) for v in _holders(macs, index["mac"], found).values() if len(v) == 1}
        if len(unique) == 1:
            return unique, "mac"
        narrowed = set().union(*_holders(ips, index["ip"], unique or found).values()) if ips else set()
        return (narrowed, "ip") if len(narrowed) == 1 else (found, "mac")
    if not ips:
        return set(), "ip"
    return set().union(*_holders(ips, index["ip"]).values()), "ip"


class Resolver:
    """Keeps pod UID → namespace across scrapes; called once per scrape."""

    def __init__(self, netns_dir: str, procfs: str, pool: NetnsPool | None = None,
                 clock=time.monotonic, budgets: Budgets | None = None):
        self.netns_dir = netns_dir
        self._pinned = PinnedDir(netns_dir, clock)
        self.procfs = procfs
        self.pool = pool if pool is not None else NetnsPool(budgets)     # an empty pool is falsy (__len__)
        self._clock = clock
        self._resolved: dict[str, tuple[int, str]] = {}     # uid -> (inode, how)
        self._tried: dict[str, float] = {}                  # uid -> last failed attempt
        self._confirm_at: dict[str, tuple[float, float]] = {}  # uid -> (next check, backoff)
        # uid -> (pod, (netns inode, refresh time, links), interfaces): matching is redone
        # only when the pod object or its namespace's link table changed
        self._matched: dict[str, tuple[Pod, tuple[int, float, int], tuple[InterfaceView, ...]]] = {}
        self._conflicts: dict[str, tuple[tuple[str, str], ...]] = {}   # uid -> contested claims
        # uid -> (inode, refresh time, names missing right after that refresh)
        self._missing_seen: dict[str, tuple[int, float, frozenset]] = {}
        # uid -> the view handed out last: handed out again while nothing in it
        # changed, so what sources keep per view (routes' attached interfaces)
        # is recognised by identity
        self._views: dict[str, PodView] = {}
        self._lock = threading.Lock()

    def resolve(self, pods: list[Pod]) -> list[PodView]:
        with self._lock:
            return self._resolve(pods)

    def _resolve(self, pods: list[Pod]) -> list[PodView]:
        now = self._clock()
        self.pool.poll()        # notifications since the last scrape: who is stale
        pinned = self._pinned.list()
        live_uids = {p.uid for p in pods}
        for uid in list(self._resolved):
            inode, _ = self._resolved[uid]
            if uid not in live_uids or not self._still_there(inode, pinned):
                del self._resolved[uid]
        self._tried = {u: t for u, t in self._tried.items() if u in live_uids}
        self._conflicts = {u: c for u, c in self._conflicts.items() if u in live_uids and u not in self._resolved}

        todo = [p for p in pods if p.uid not in self._resolved
                and now - self._tried.get(p.uid, -RETRY_UNRESOLVED) >= RETRY_UNRESOLVED]
        if todo:
            self._find(todo, pinned, now)
        self._confirm_due(pods, pinned, now)

        views = []
        used: set[int] = set()
        known, self._views = self._views, {}
        for pod in pods:
            found = self._resolved.get(pod.uid)
            ns = self.pool.get(found[0]) if found else None
            last = known.get(pod.uid)
            if found is None or ns is None:
                conflicts = self._conflicts.get(pod.uid, ())
                if last is None or last.pod is not pod or last.netns_inode or last.conflicts != conflicts:
                    last = PodView(pod, interfaces=tuple(InterfaceView(a, None) for a in pod.attachments),
                                   conflicts=conflicts)
            else:
                used.add(ns.inode)
                try:
                    self._refresh_if_needed(pod, ns, now)
                except OSError as err:
                    log.debug("refresh of %s failed: %s", ns.path, err)
                interfaces = self._interfaces(pod, ns)
                if (last is None or last.pod is not pod or last.interfaces is not interfaces
                        or last.addresses is not ns.addresses or last.netns_inode != ns.inode
                        or last.netns_path != ns.path or last.resolved_by != found[1]):
                    last = PodView(pod, ns.path, ns.inode, found[1], interfaces, addresses=ns.addresses)
            views.append(last)
            self._views[pod.uid] = last
        self.pool.keep_only(used)
        self._matched = {uid: m for uid, m in self._matched.items() if uid in live_uids}
        self._missing_seen = {uid: m for uid, m in self._missing_seen.items() if uid in live_uids}
        return views

    def _refresh_if_needed(self, pod: Pod, ns: Namespace, now: float) -> None:
        """Re-read the link table when the kernel announced a change, past the TTL,
        or when an annotated interface is absent that was not already absent right
        after the last read: a DPDK VF the annotation lists as net1 never appears,
        and must not cost a link dump at every scrape (its arrival, if ever, is a
        link event)."""
        missing = _missing_names(pod, ns)
        seen = self._missing_seen.get(pod.uid)
        if ns.stale(now) or (missing and seen != (ns.inode, ns.refreshed, missing)
                             and now - ns.refreshed > max(MIN_REFRESH, ns.backoff())):
            ns.refresh(now)
            missing = _missing_names(pod, ns)
            self._missing_seen[pod.uid] = (ns.inode, ns.refreshed, missing)
        if ns.short and missing:
            # a read cut short by the netns budgets may have stopped before the
            # pod's own links: look those up one by one
            ns.find_links(a.interface for a in pod.attachments)

    def _interfaces(self, pod: Pod, ns: Namespace) -> tuple[InterfaceView, ...]:
        cached = self._matched.get(pod.uid)
        key = (ns.inode, ns.refreshed, len(ns.links))     # find_links may add links between refreshes
        if cached and cached[0] is pod and cached[1] == key:
            return cached[2]
        interfaces = match_interfaces(pod, ns.links, ns.addresses)
        self._matched[pod.uid] = (pod, key, interfaces)
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

    def _by_cgroup(self, pods: list[Pod], by_cgroup: dict[str, str], owners: dict[int, set[str]],
                   pinned: dict[int, str], now: float) -> dict[str, int]:
        """uid -> netns inode (opened in the pool) for the pods a process was found
        for; a namespace the processes of several pods share is nobody's."""
        found = {}
        for pod in pods:
            path = by_cgroup.get(pod.uid)
            if not path:
                continue
            try:
                inode = os.stat(path).st_ino
                if len(owners.get(inode, ())) > 1:
                    raise OSError(f"namespace shared by pods {sorted(owners[inode])}")
                ns = self.pool.open(pinned.get(inode, path))
                ns.refresh(now)
            except OSError as err:
                log.debug("pod %s: %s: %s", pod.key, path, err)
                continue
            found[pod.uid] = ns.inode
        return found

    def _confirm_due(self, pods: list[Pod], pinned: dict[int, str], now: float) -> None:
        """A netns-dir match is only as good as the annotation it came from. On
        containerd the CNI writes network-status before the pod has a process, so
        a new pod is first found by MAC: once a process exists its cgroup's
        namespace replaces the match (checked after RETRY_UNRESOLVED, then at
        doubling intervals up to CONFIRM_BACKOFF_MAX)."""
        soft = {uid for uid, (_, how) in self._resolved.items() if how != "cgroup"}
        self._confirm_at = {u: v for u, v in self._confirm_at.items() if u in soft}
        for uid in soft:
            self._confirm_at.setdefault(uid, (now + RETRY_UNRESOLVED, RETRY_UNRESOLVED))
        due = [p for p in pods if p.uid in self._confirm_at and now >= self._confirm_at[p.uid][0]]
        if not due:
            return
        for pod in due:
            backoff = min(self._confirm_at[pod.uid][1] * 2, CONFIRM_BACKOFF_MAX)
            self._confirm_at[pod.uid] = (now + backoff, backoff)
        by_cgroup, owners = scan_pod_processes(self.procfs)
        for uid, inode in self._by_cgroup(due, by_cgroup, owners, pinned, now).items():
            if inode != self._resolved[uid][0]:
                log.warning("pod %s: its cgroup's namespace is not the one its %s matched; "
                            "taking the cgroup's", uid, self._resolved[uid][1])
            for other, (held, how) in list(self._resolved.items()):
                if other != uid and held == inode and how != "cgroup":
                    del self._resolved[other]          # an annotation claim yields to the kernel's fact
            self._resolved[uid] = (inode, "cgroup")
            self._confirm_at.pop(uid, None)

    def _find(self, todo: list[Pod], pinned: dict[int, str], now: float) -> None:
        by_cgroup, owners = scan_pod_processes(self.procfs)
        # Kernel facts first: a namespace held by a pod's processes is that pod's.
        for uid, (inode, how) in list(self._resolved.items()):
            if how != "cgroup" and owners.get(inode) and uid not in owners[inode]:
                log.info("netns %d belongs to pod %s by cgroup, not to %s", inode, owners[inode], uid)
                del self._resolved[uid]
        for uid, inode in self._by_cgroup(todo, by_cgroup, owners, pinned, now).items():
            self._resolved[uid] = (inode, "cgroup")
            self._conflicts.pop(uid, None)

        left = [p for p in todo if p.uid not in self._resolved and p.attachments]
        if left:
            self._find_by_annotation(left, pinned, owners, now)
        for pod in todo:
            if pod.uid not in self._resolved:
                self._tried[pod.uid] = now

    def _find_by_annotation(self, left: list[Pod], pinned: dict[int, str], owners: dict[int, set[str]],
                            now: float) -> None:
        """The netns-dir fallback. Namespaces some pod's processes hold are out of
        reach; one already given by annotation is contested again when another pod
        claims it (an impostor that came first must not keep it)."""
        held = {inode: uid for uid, (inode, how) in self._resolved.items()}
        soft = {inode for inode, uid in held.items() if self._resolved[uid][1] != "cgroup"}
        candidates = [ns for ns in self._open_unclaimed(pinned, set(held) - soft, now) if ns.inode not in owners]
        index = namespace_index(candidates)
        claims: dict[int, list[tuple[Pod, str]]] = {}
        for pod in left:
            found, how = claim(pod, index)
            self._conflicts.pop(pod.uid, None)
            if len(found) == 1:
                claims.setdefault(found.pop(), []).append((pod, how))
            elif found:
                log.debug("pod %s: %d namespaces hold its %s", pod.key, len(found), how)
        for inode, claimants in claims.items():
            holder = held.get(inode)
            if holder is not None:
                # An IP can repeat between isolated networks: only MACs contest a holder.
                claimants = [(p, how) for p, how in claimants if how == "mac"]
                if not claimants:
                    continue
            if len(claimants) == 1 and holder is None:
                pod, how = claimants[0]
                self._resolved[pod.uid] = (inode, f"netns-dir:{how}")
                continue
            # Equal claims to one namespace: nobody gets it, everybody says so.
            ns = self.pool.get(inode)
            name = os.path.basename(ns.path) if ns else str(inode)
            uids = [p.uid for p, _ in claimants] + ([holder] if holder else [])
            if holder:
                del self._resolved[holder]
            for uid in uids:
                self._conflicts[uid] = (("netns", name),)
            log.warning("netns %s claimed by %d pods' annotations: given to none", name, len(uids))

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


def _missing_names(pod: Pod, ns: Namespace) -> frozenset:
    names = {l.name for l in ns.links}
    return frozenset(a.interface for a in pod.attachments if a.interface and a.interface not in names)
