"""Interface counters, state and MTU of every attached pod interface.

One RTM_GETLINK dump per pod namespace per scrape, on a socket kept open in
that namespace (collector/netns.py), decoded by collector/rtnl.py. Only the
interfaces named in the pod's network-status are exported; loopback and
anything else in the pod is not ours to report.
"""
from __future__ import annotations

import logging

from collector.model import ATTACHMENT_LABELS
from collector.registry import Config, Snapshot, register
from exporters.exposition import COUNTER, GAUGE, Family, render_labels

log = logging.getLogger(__name__)

# (metric suffix, LinkStats field, help)
COUNTERS = (
    ("receive_bytes", "rx_bytes", "Bytes received on the pod interface (IFLA_STATS64 rx_bytes)."),
    ("receive_packets", "rx_packets", "Packets received on the pod interface."),
    ("receive_errors", "rx_errors", "Receive errors on the pod interface."),
    ("receive_drops", "rx_dropped", "Received packets dropped on the pod interface (rx_dropped)."),
    ("transmit_bytes", "tx_bytes", "Bytes transmitted on the pod interface."),
    ("transmit_packets", "tx_packets", "Packets transmitted on the pod interface."),
    ("transmit_errors", "tx_errors", "Transmit errors on the pod interface."),
    ("transmit_drops", "tx_dropped", "Transmitted packets dropped on the pod interface (tx_dropped)."),
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
        pool = snapshot.netns
        for view in snapshot.pods:
            ns = pool.get(view.netns_inode) if pool is not None and view.netns_inode else None
            if ns is None:
                continue
            try:
                links = {l.ifindex: l for l in ns.rtnl.links()}
            except OSError as err:      # the pod went away mid-scrape: not a failure
                log.debug("pod %s: netns %s: %s", view.pod.key, view.netns_path, err)
                continue
            for iv in view.interfaces:
                link = links.get(iv.link.ifindex) if iv.link else None
                if link is None or link.name != iv.link.name:
                    continue
                labels = render_labels(ATTACHMENT_LABELS, iv.labels)
                for fam, field in counters:
                    fam.add_rendered(labels, getattr(link, field))
                up.add_rendered(labels, 1 if link.up else 0)
                mtu.add_rendered(labels, link.mtu)
        return [fam for fam, _ in counters] + [up, mtu]
