"""Interface counters, state and MTU of every attached pod interface.

Counters: one RTM_GETSTATS dump per pod namespace per scrape, on a socket kept
open in that namespace (collector/netns_pool.py), decoded by kernel/rtnl.py.
State, MTU and names: the namespace's link table, which the resolver re-reads
(RTM_GETLINK) in the same scrape whenever the kernel announced a link change.
Only the interfaces named in the pod's network-status are exported; loopback and
anything else in the pod is not ours to report.
"""
from __future__ import annotations

import logging

from collector.family import COUNTER, GAUGE, Family
from collector.model import ATTACHMENT_LABELS
from collector.registry import Config, Snapshot, register

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

    def collect(self, snapshot: Snapshot):
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
        for view in snapshot.pods:
            ns = snapshot.netns_of(view)
            if ns is None:
                continue
            try:
                stats = ns.stats64({iv.link.ifindex for iv in view.interfaces if iv.link})
            except OSError as err:      # the pod went away mid-scrape: not a failure
                log.debug("pod %s: netns %s: %s", view.pod.key, view.netns_path, err)
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
