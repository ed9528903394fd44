"""Interface counters, state and MTU of every attached pod interface.

Counters: one RTM_GETSTATS dump per pod namespace per scrape, on a socket kept
open in that namespace (collector/netns_pool.py), all of them made and decoded
in one call of kernel/nlbatch.py (kernel/rtnl.py's Python path without it).
State, MTU and names: the namespace's link table, which the resolver re-reads
(RTM_GETLINK) in the same scrape whenever the kernel announced a link change.
Only the interfaces named in the pod's network-status are exported; loopback and
anything else in the pod is not ours to report.
"""
from __future__ import annotations

import logging

from collector.family import COUNTER, GAUGE, Family
from collector.model import ATTACHMENT_LABELS, PodView
from collector.registry import Config, PodNetns, Snapshot, register
from kernel import nlbatch
from kernel.rtnl import RtnlSocket

log = logging.getLogger(__name__)

# (metric suffix, index in rtnl_link_stats64 as RtnlSocket.stats64 returns it, help)
COUNTERS = (
    ("receive_bytes", 2, "Bytes received on the pod interface (IFLA_STATS64 rx_bytes)."),
    ("receive_packets", 0, "Packets received on the pod interface."),
    ("receive_errors", 4, "Receive errors on the pod interface."),
    ("receive_drops", 6, "Received packets dropped on the pod interface (rx_dropped)."),
    ("transmit_bytes", 3, "Bytes transmitted on the pod interface."),
    ("transmit_packets", 1, "Packets transmitted on the pod interface."),
    ("transmit_errors", 5, "Transmit errors on the pod interface."),
    ("transmit_drops", 7, "Transmitted packets dropped on the pod interface (tx_dropped)."),
)


@register("netlink", help="Pod interface counters, state and MTU from netlink, in each pod netns.")
class NetlinkSource:
    def __init__(self, config: Config):
        self.config = config
        self.native = True          # kernel/nlbatch.py's C batch when built (False: RtnlSocket's reads)
        self._started = nlbatch.Started()

    def prefetch(self, snapshot: Snapshot) -> None:
        """Start this snapshot's counter dumps on a worker thread (exporters/metrics.py
        calls this before any source runs): the round trips release the GIL
        (kernel/nlbatch.py), so they overlap the sources collected before this
        one. collect() waits for them."""
        if not (self.native and nlbatch.available()):
            return
        counters = Counters(snapshot, True)
        self._started.start(snapshot, counters, counters.dumps.run)

    def collect(self, snapshot: Snapshot):
        read = self._started.take(snapshot)
        if read is None:
            native = self.native and nlbatch.available()     # else the scrape thread's sockets, as ever
            read = Counters(snapshot, native)
            nlbatch.run(native, read.dumps.run)
        counters = [(Family(f"planewatch_interface_{name}_total", COUNTER, text, ATTACHMENT_LABELS), field)
                    for name, field, text in COUNTERS]
        up = Family("planewatch_interface_up", GAUGE,
                    "1 when the pod interface's operational state is up.", ATTACHMENT_LABELS)
        mtu = Family("planewatch_interface_mtu_bytes", GAUGE, "MTU of the pod interface.", ATTACHMENT_LABELS)
        # from the link table, which is re-read on every RTM_NEWLINK the kernel sends (a carrier change is one)
        carrier = Family("planewatch_interface_carrier_changes_total", COUNTER,
                         "Carrier up/down transitions of the pod interface (IFLA_CARRIER_CHANGES).", ATTACHMENT_LABELS)
        # one row per interface, then each family filled a column at a time: 11
        # calls a row (11 000 at 1 000 interfaces) were ~7 % of a scrape
        labels: list[bytes] = []
        rows: list[tuple[int, ...]] = []
        links = []
        for (view, ns), stats in zip(read.pods, read.results()):
            if isinstance(stats, OSError):      # the pod went away mid-scrape: not a failure
                log.debug("pod %s: netns %s: %s", view.pod.key, view.netns_path, stats)
                continue
            for iv in view.interfaces:
                if iv.link is None:
                    continue
                link = ns.by_index.get(iv.link.ifindex)
                values = stats.get(link.ifindex) if link is not None and link.name == iv.link.name else None
                if link is None or values is None:
                    continue
                labels.append(iv.rendered)
                rows.append(values)
                links.append(link)
        for fam, index in counters:
            fam.extend_rendered(labels, [values[index] for values in rows])
        up.extend_rendered(labels, [1 if link.up else 0 for link in links])
        mtu.extend_rendered(labels, [link.mtu for link in links])
        carrier.extend_rendered(labels, [link.carrier_changes for link in links])
        return [fam for fam, _ in counters] + [up, mtu, carrier]

    def close(self) -> None:
        self._started.take(None)


class Counters:
    """The counters of every pod's interfaces in `snapshot`: `ns.stats64(ifindexes)`
    per pod netns, the whole-namespace dumps among them (the common case) made
    by one kernel/nlbatch.py batch (`dumps`, to run before `results`). A
    namespace whose dump brought more links than its cap (links added since its
    table was read) is asked again per interface."""

    def __init__(self, snapshot: Snapshot, native: bool = True):
        self.pods: list[tuple[PodView, PodNetns]] = []
        self._wanted: list[set[int]] = []
        self._batched: list[int] = []
        caps: list[int] = []
        sockets = []
        for view in snapshot.pods:
            ns = snapshot.netns_of(view)
            if ns is None:
                continue
            wanted = {iv.link.ifindex for iv in view.interfaces if iv.link}
            cap = ns.dump_cap(wanted)
            # native: the batch runs on kernel/nlbatch.py's thread while other
            # sources read `rtnl`: on sockets of its own
            sock = _batch_socket(view, ns) if cap and native else ns.rtnl if cap else None
            if sock is not None:
                self._batched.append(len(self.pods))
                caps.append(cap)
                sockets.append(sock)
            self.pods.append((view, ns))
            self._wanted.append(wanted)
        self.dumps = nlbatch.StatsDumps(sockets, caps, native)

    def results(self) -> list[dict[int, tuple[int, ...]] | OSError]:
        """Per pod of `pods`: ifindex -> 8 counters, or the OSError its read failed
        with (the pod went away mid-scrape)."""
        dumped = dict(zip(self._batched, self.dumps.results()))
        out: list[dict[int, tuple[int, ...]] | OSError] = []
        for i, (_, ns) in enumerate(self.pods):
            if i not in dumped:
                out.append(_stats64(ns, self._wanted[i]))
            else:
                got = dumped[i]
                out.append(got if got is not None else _stats64_of(ns, self._wanted[i]))
        return out


def _batch_socket(view: PodView, ns: PodNetns) -> RtnlSocket | None:
    """The netns's batch socket; None when it cannot be opened (no fd left, the
    netns going away): that pod's counters are then read the Python way, on the
    scrape thread's socket, and the other pods' still in the batch."""
    try:
        return ns.batch_socket()
    except OSError as err:
        log.debug("pod %s: netns %s: no batch socket: %s", view.pod.key, view.netns_path, err)
        return None


def _stats64(ns: PodNetns, wanted: set[int]) -> dict[int, tuple[int, ...]] | OSError:
    try:
        return ns.stats64(wanted)
    except OSError as err:
        return err


def _stats64_of(ns: PodNetns, wanted: set[int]) -> dict[int, tuple[int, ...]] | OSError:
    try:
        return ns.rtnl.stats64_of(sorted(wanted))
    except OSError as err:
        return err
