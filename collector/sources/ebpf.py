"""eBPF source: per-interface packets/bytes, drop reasons and asymmetric routing.

The programs (ebpf/*.bpf.c) key everything by (netns inode, ifindex); this
module keeps the tc programs attached to exactly the pod interfaces of the
current snapshot on the planes `flow_planes` selects (the others are only
watched for drops: nothing runs per packet on them) and turns the map contents
into families labelled by the InterfaceView found under the same key. Loading
happens at the first collect, once: when it fails (objects not built, no BTF,
no CAP_BPF, verifier refusal, kernel too old) the reason is logged once and
every scrape reports `planewatch_ebpf_up 0` plus
`planewatch_ebpf_info{reason=...}` while the other sources carry on.

Options: the `--collector.ebpf.*` flags registered below.
"""
from __future__ import annotations

import logging
import operator
import threading
from functools import lru_cache
from typing import TYPE_CHECKING, Mapping

from collector.family import COUNTER, GAUGE, Family, render_labels
from collector.model import ATTACHMENT_LABELS, InterfaceView
from collector.planes import PlaneSelector
from collector.registry import Config, NoData, Option, Snapshot, register
from ebpf.maps import NOT_DROPS, reason_name

if TYPE_CHECKING:
    from ebpf.loader import Loader

log = logging.getLogger(__name__)

Key = tuple[int, int]                       # (netns inode, ifindex)
DEFAULT_TOP_FLOWS = 20

_TRAFFIC_HELP = ("{what} {direction} by the pod interface, counted by planewatch's "
                 "TCX/tc {hook} program since it was attached (bytes include the L2 header).")


# --- pure: what to attach, and the families ------------------------------------------

def wanted_attachments(snapshot: Snapshot) -> dict[Key, tuple[str, InterfaceView]]:
    """(netns inode, ifindex) -> (netns path, view) for every live pod interface.

    hostNetwork pods are left out: their interfaces are the node's, and
    watching them would count the host's own traffic and drops.
    """
    wanted: dict[Key, tuple[str, InterfaceView]] = {}
    for pv in snapshot.pods:
        if pv.pod.host_network or not pv.netns_path or not pv.netns_inode:
            continue
        for view in pv.interfaces:
            if view.link is not None:
                wanted.setdefault((pv.netns_inode, view.link.ifindex), (pv.netns_path, view))
    return wanted


def traffic_families(index: Mapping[Key, InterfaceView],
                     traffic: Mapping[Key, tuple[int, int, int, int]]) -> list[Family]:
    """`traffic`: (netns, ifindex) -> (ingress packets, ingress bytes, egress
    packets, egress bytes), as Loader.interface_counters gives it."""
    fams = {}
    for direction, hook, verb in (("receive", "ingress", "received"), ("transmit", "egress", "transmitted")):
        for unit, what in (("packets", "Packets"), ("bytes", "Bytes")):
            fams[(hook, unit)] = Family(
                f"planewatch_ebpf_interface_{direction}_{unit}_total", COUNTER,
                _TRAFFIC_HELP.format(what=what, direction=verb, hook=hook), ATTACHMENT_LABELS)
    # every watched interface gets a series, 0 until its first packet; in snapshot
    # order (netns inodes differ from run to run, pods' order does not)
    # a column at a time (Family.extend_rendered): four calls, not four per interface
    labels = [view.rendered for view in index.values()]
    counts = [traffic.get(key, _NO_TRAFFIC) for key in index]
    for column, family in enumerate(fams.values()):     # ingress packets, bytes, egress packets, bytes
        family.extend_rendered(labels, [c[column] for c in counts])
    return list(fams.values())


_NO_TRAFFIC = (0, 0, 0, 0)
_NONE = (0, 0)


def drop_family(index: Mapping[Key, InterfaceView], counters: Mapping[tuple[int, int, int], tuple[int]],
                reasons: Mapping[int, str]) -> Family:
    """`counters`: (netns, ifindex, skb_drop_reason value) -> (packets,), as
    Loader.drop_counters gives them; `reasons` names the values. One pass from
    the map's keys to the series (~1 500 at 1 000 interfaces: a dict by reason
    name in between was a third of the eBPF source)."""
    fam = Family("planewatch_packet_drops_total", COUNTER,
                 "Packets the kernel dropped (kfree_skb) on the pod interface, by skb_drop_reason "
                 "name without the SKB_DROP_REASON_ prefix; interface = skb->dev at drop time.",
                 ATTACHMENT_LABELS + ("reason",))
    labels, values = [], []
    reason_of = {code: _reason_label(reason_name(reasons, code)) for code in {key[2] for key in counters}}
    for key in sorted(counters):
        view = index.get(key[:2])
        if view is None:
            continue
        reason = reason_of[key[2]]
        if reason is not None:
            labels.append(view.rendered + reason)
            values.append(counters[key][0])
    fam.extend_rendered(labels, values)
    return fam


@lru_cache(maxsize=512)
def _reason_label(reason: str) -> bytes | None:
    """The `reason` label appended to a view's rendered labels (a few dozen
    names); None for frees that are not drops."""
    return None if reason in NOT_DROPS else b"," + render_labels(("reason",), (reason,))


def asymmetric_family(index: Mapping[Key, InterfaceView],
                      asymmetric: Mapping[tuple[int, int, int], int]) -> Family:
    fam = Family("planewatch_asymmetric_packets_total", COUNTER,
                 "Packets that left the pod by egress_interface while the reversed 5-tuple last "
                 "came in by another interface (ingress_interface). The identity labels "
                 "(network, interface, plane) are those of the ingress interface.",
                 ATTACHMENT_LABELS + ("ingress_interface", "egress_interface"))
    for (netns, ingress, egress), packets in sorted(asymmetric.items()):
        inbound, outbound = index.get((netns, ingress)), index.get((netns, egress))
        if inbound is not None and outbound is not None:
            fam.add(inbound.labels + (inbound.interface, outbound.interface), packets)
    return fam


def status_families(reason: str, attach_mode: str, attached: int, watched: int = 0) -> list[Family]:
    up = Family("planewatch_ebpf_up", GAUGE,
                "1 when planewatch's BPF programs are loaded; 0 otherwise, "
                "with the reason on planewatch_ebpf_info.")
    up.add((), 1 if reason == "ok" else 0)
    info = Family("planewatch_ebpf_info", GAUGE,
                  "BPF status: reason is ok or why loading failed (objects_missing, libbpf_missing, "
                  "btf_missing, permission_denied, verifier_rejected, kernel_unsupported, "
                  "load_failed); attach_mode is tcx, clsact, auto (nothing attached yet) or none (not loaded).",
                  ("reason", "attach_mode"))
    info.add((reason, attach_mode), 1)
    count = Family("planewatch_ebpf_attached_interfaces", GAUGE,
                   "Pod interfaces the tc programs are attached to (eBPF traffic counters and "
                   "observed asymmetric flows): those on the planes --collector.ebpf.flow-planes selects.")
    count.add((), attached)
    watching = Family("planewatch_ebpf_watched_interfaces", GAUGE,
                      "Pod interfaces whose drops the kfree_skb program counts: the attached ones "
                      "and, with no program on them, those on the other planes.")
    watching.add((), watched)
    return [up, info, count, watching]


def flow_families(index: Mapping[Key, InterfaceView],
                  evictions: Mapping[tuple[int, int], tuple[int, int]]) -> list[Family]:
    created = Family("planewatch_ebpf_flows_created_total", COUNTER,
                     "Flows (5-tuples) the pod interface created in the flow table shared by all pods.",
                     ATTACHMENT_LABELS)
    evicted = Family("planewatch_ebpf_flows_evicted_total", COUNTER,
                     "Flows the pod interface created that the shared LRU flow table evicted (by any "
                     "pod's newer flows): asymmetric routing on them is no longer seen.", ATTACHMENT_LABELS)
    labels = [view.rendered for view in index.values()]
    counts = [evictions.get(key, _NONE) for key in index]
    created.extend_rendered(labels, [made for made, _ in counts])
    evicted.extend_rendered(labels, [gone for _, gone in counts])
    return [created, evicted]


def guard_families(refused: Mapping[str, int], stale_removed: int) -> list[Family]:
    fam = Family("planewatch_ebpf_map_refused_total", COUNTER,
                 "Updates a full BPF map refused, by map: iface_traffic, asym_packets and packet_drops "
                 "(counts lost in the kernel), watched (interfaces left unwatched).", ("map",))
    for name in sorted(refused):
        fam.add((name,), refused[name])
    stale = Family("planewatch_ebpf_stale_filters_removed_total", COUNTER,
                   "clsact filters of planewatch's left by a previous (crashed) collector on a pod "
                   "interface, removed before attaching (one per hook).")
    stale.add((), stale_removed)
    return [fam, stale]


def label_flow(flow: dict, index: Mapping[Key, InterfaceView]) -> dict:
    """A loader flow with pod and interface names added (when still known)."""
    inbound = index.get((flow["netns"], flow["ingress_ifindex"]))
    outbound = index.get((flow["netns"], flow["egress_ifindex"]))
    labelled = dict(flow)
    if inbound is not None:
        labelled.update(zip(ATTACHMENT_LABELS, inbound.labels))
        labelled["ingress_interface"] = inbound.interface
    if outbound is not None:
        labelled["egress_interface"] = outbound.interface
    return labelled


# --- the source --------------------------------------------------------------------

@register("ebpf", options=(
    Option("objects_dir", "", "directory of the BPF objects (default: the ones installed with planewatch)"),
    Option("btf_path", "/sys/kernel/btf/vmlinux", "kernel BTF, read for the drop reason names"),
    Option("attach_mode", "auto", "how programs attach to pod interfaces: tcx (kernel >= 6.6), clsact, or "
           "auto (tcx when the kernel has it)", choices=("auto", "tcx", "clsact")),
    Option("flow_entries", 16384, "entries of the flow table (asymmetric flows)", int),
    Option("flow_planes", "*", "planes (comma-separated, globs allowed) whose pod interfaces get the tc programs: "
           "eBPF traffic counters and observed asymmetric flows, at a cost on every packet. Interfaces "
           "on other planes run no program per packet; their drop reasons are still counted. "
           "Empty: no plane"),
))
class EbpfSource:
    """eBPF per-interface counters, drop reasons and asymmetric flows (TCX/tc + kfree_skb)."""

    def __init__(self, config: Config):
        self.options = config.settings("ebpf")
        self.loader: Loader | None = None
        self.reason = ""                     # "" = not tried yet
        self.index: dict[Key, InterfaceView] = {}
        self._index_for: tuple[tuple, set[Key], dict[Key, InterfaceView]] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._attach_warned: set[Key] = set()
        self.with_programs = PlaneSelector(self.options["flow_planes"])
        self._owners: dict[Key, str] = {}  # the pod uid each watched key was set up for

    def _ensure_loaded(self):
        if self.reason:
            return self.loader
        from ebpf.loader import OBJECTS_DIR, Loader, LoadError
        try:
            self.loader = Loader(self.options["objects_dir"] or OBJECTS_DIR,
                                 btf_path=self.options["btf_path"], attach_mode=self.options["attach_mode"],
                                 flow_entries=self.options["flow_entries"])
            self.reason = "ok"
            log.info("BPF programs loaded in %.0f ms", self.loader.load_seconds * 1000)
        except LoadError as err:
            self.reason = err.reason
            log.warning("eBPF source disabled: %s", err)
        except OSError as err:           # anything libbpf raised outside load()
            self.reason = "load_failed"
            log.warning("eBPF source disabled: %s", err)
        return self.loader

    def collect(self, snapshot: Snapshot) -> list[Family]:
        """Read the maps for the interfaces attached now. Attaching is `reconcile`'s
        job (a TCX attach costs ~25 ms: 1000 of them must not sit in a scrape)."""
        with self._lock:
            if self._closed:
                raise NoData("closed")
            loader = self._ensure_loaded()
        if loader is None:
            return status_families(self.reason, "none", 0)
        attached, watched = loader.keys()
        self.index = index = self._index_of(snapshot, watched)
        # counters only of the interfaces with programs (attached <= watched)
        traffic = index if len(attached) == len(watched) else {k: v for k, v in index.items() if k in attached}
        families = traffic_families(traffic, loader.interface_counters())
        families.append(drop_family(index, loader.drop_counters(), loader.reasons))
        families.append(asymmetric_family(index, loader.asymmetric_packets()))
        families.extend(status_families(self.reason, loader.mode, len(attached), len(watched)))
        families.extend(flow_families(index, loader.flow_evictions()))
        families.extend(guard_families(loader.map_refused(), loader.stale_filters_removed))
        return families

    def _index_of(self, snapshot: Snapshot, watched: set[Key]) -> dict[Key, InterfaceView]:
        """The watched interfaces' views, in snapshot order: the same dict again
        while the pods are the same view objects (the resolver hands them out
        again while nothing changed) and the watched keys the same set."""
        pods, known = snapshot.pods, self._index_for
        if (known is not None and known[1] == watched and len(known[0]) == len(pods)
                and all(map(operator.is_, known[0], pods))):
            return known[2]
        index = {key: view for key, (_, view) in wanted_attachments(snapshot).items() if key in watched}
        self._index_for = (pods, watched, index)
        return index

    def reconcile(self, snapshot: Snapshot) -> None:
        """Attach to new pod interfaces and detach gone ones. Runs off the scrape
        path (exporters/http.py, every few seconds): each attach or detach holds the
        loader's lock alone, so scrapes read the maps meanwhile."""
        with self._lock:
            if self._closed:
                return
            loader = self._ensure_loaded()
        if loader is not None:
            self._reconcile(loader, wanted_attachments(snapshot))

    def _reconcile(self, loader, wanted: Mapping[Key, tuple[str, InterfaceView]]) -> None:
        for key in loader.prune_dead():     # a reused (netns inode, ifindex) must get fresh links
            self._owners.pop(key, None)
        (hooked, watched), owners = loader.keys(), self._owners
        for key in watched:
            want = wanted.get(key)
            # gone; now another pod's (a reused netns inode and ifindex: its counts
            # and, under clsact, its filters were the old netns's); or its plane
            # moved in or out of flow-planes
            if (want is None or owners.get(key, want[1].attachment.uid) != want[1].attachment.uid
                    or (key in hooked) != self.with_programs(want[1].attachment.plane)):
                loader.detach(*key)
                self._owners.pop(key, None)
                self._attach_warned.discard(key)
        for key, (path, view) in wanted.items():
            if self._closed:
                return
            if key in loader.hooks or key in loader.watch_only:
                continue
            try:
                if self.with_programs(view.attachment.plane):
                    hook = loader.attach(path, key[1])
                    got = (hook.netns_inode, hook.ifindex)
                else:
                    got = loader.watch(path, key[1])
            except FileNotFoundError:
                log.debug("netns %s vanished before attach", path)
                continue
            except OSError as err:
                level = logging.DEBUG if key in self._attach_warned else logging.WARNING
                self._attach_warned.add(key)
                log.log(level, "attach to ifindex %d in %s: %s", key[1], path, err)
                continue
            if got != key:
                # the path now names another netns than the snapshot saw: not ours
                loader.detach(*got)
            else:
                self._owners[key] = view.attachment.uid

    def top_asymmetric_flows(self, n: int = DEFAULT_TOP_FLOWS) -> list[dict]:
        """The n flows with most asymmetric packets, for /debug/asymmetric.
        Blocking (reads the flow table): call it from a worker thread."""
        with self._lock:        # not while close() unloads the maps
            if self.loader is None:
                return []
            return [label_flow(flow, self.index) for flow in self.loader.top_asymmetric_flows(n)]

    def stop(self) -> None:
        """End a running reconcile pass before its next attach (close() follows):
        not under the lock, which that pass's attaches take."""
        self._closed = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self.loader is not None:
                self.loader.close()
                self.loader = None
