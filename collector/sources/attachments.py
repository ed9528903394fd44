"""What the API says about each pod's networks, with no kernel work.

Info series (value 1) for every attachment, requested-but-absent networks,
per-IP series for conflict rules, the networks (NADs) known, whether each pod's
namespace was found, and the count of malformed annotations.
"""
from __future__ import annotations

import ipaddress
from functools import lru_cache

from collector.annotations import ERROR_REASONS
from collector.budgets import Budgets, select_networks
from collector.claims import conflicts_by_pod, ip_verification
from collector.family import COUNTER, GAUGE, Family, render_labels
from collector.model import ATTACHMENT_LABELS, PodView
from collector.registry import Config, SameObjects, Snapshot, register

INFO_LABELS = ATTACHMENT_LABELS + ("mac", "ips", "device_type", "pci_address")
IP_LABELS = ATTACHMENT_LABELS[:4] + ("ip", "verified")
POD_LABELS = ("namespace", "pod")


@lru_cache(maxsize=1 << 13)
def canonical_ip(text: str) -> str:
    """An address without prefix length, IPv6 compressed; "" when not an IP."""
    try:
        return str(ipaddress.ip_address(text.split("/", 1)[0].strip()))
    except ValueError:
        return ""


def interface_rows(view: PodView) -> tuple[list[bytes], list[bytes]]:
    """The rendered label sets of a pod's planewatch_pod_interface_info and
    planewatch_pod_ip_info series."""
    info, ips = [], []
    for iv in view.interfaces:
        att = iv.attachment
        mac = (att.mac or (iv.link.mac if iv.link else "")).lower()
        info.append(render_labels(INFO_LABELS, iv.labels + (mac, ",".join(att.ips), att.device.type,
                                                            att.device.pci_address)))
        if att.default or att.cluster:     # cluster IPs are not secondary-network IPs
            continue
        for ip in sorted({canonical_ip(a) for a in att.ips} - {""}):
            ips.append(render_labels(IP_LABELS, iv.labels[:4] + (ip, ip_verification(view, iv, ip))))
    return info, ips


def pod_rows(view: PodView) -> tuple[list[bytes], list[bytes], bytes]:
    """`interface_rows`, and the labels of the pod's planewatch_pod_netns_resolved."""
    return (*interface_rows(view), render_labels(POD_LABELS, (view.pod.namespace, view.pod.name)))


@register("attachments", help="Attachments, missing networks, pod IPs and NADs as the API describes them.")
class AttachmentsSource:
    def __init__(self, config: Config):
        self.config = config
        # uid -> (its info series, its IP series, its netns_resolved labels): they
        # depend on the pod's view alone
        self._rows = SameObjects()

    def collect(self, snapshot: Snapshot):
        info = Family("planewatch_pod_interface_info", GAUGE,
                      "A network attached to a pod, from its network-status annotation (value 1).", INFO_LABELS)
        ips = Family("planewatch_pod_ip_info", GAUGE,
                     "One series per IP of a pod on a secondary network (value 1), for conflict rules; "
                     "verified: the pod's namespace holds it (true), does not (false), cannot be checked (unknown).",
                     IP_LABELS)
        identity = Family("planewatch_pod_identity_conflict", GAUGE,
                          "A namespace (kind=netns) or SR-IOV VF (kind=vf, claim=PCI address) this pod's "
                          "annotation claims as another pod's does: given to neither (value 1).",
                          ("namespace", "pod", "kind", "claim"))
        conflicts = conflicts_by_pod(snapshot.pods)
        missing = Family("planewatch_pod_network_attachment_missing", GAUGE,
                         "A network the pod requested (k8s.v1.cni.cncf.io/networks) that its network-status lacks.",
                         ("namespace", "pod", "network"))
        resolved = Family("planewatch_pod_netns_resolved", GAUGE,
                          "1 when the pod's network namespace was found on this node, 0 when not (yet).",
                          POD_LABELS)
        cut = Family("planewatch_pod_budget_cut", GAUGE,
                     "Items of a pod left out of the metrics by a budget (attachments, IPs, ...), by reason.",
                     ("namespace", "pod", "reason"))
        short = Family("planewatch_pod_netns_cut_short", GAUGE,
                       "1 when the pod's netns was read only in part (links, addresses, routes, route_checks "
                       "or time budget spent) or a link change's re-read was deferred (refresh_deferred), by reason.",
                       ("namespace", "pod", "reason"))
        for view in snapshot.pods:
            pod = view.pod
            ns = snapshot.netns_of(view)
            reasons = set(ns.short).union(*ns.read_cuts.values()) if ns is not None else ()
            for reason in sorted(reasons):
                short.add((pod.namespace, pod.name, reason), 1)
            for reason, n in sorted((snapshot.budget_cuts.get(pod.uid) or {}).items()):
                cut.add((pod.namespace, pod.name, reason), n)
            for kind, claim in conflicts.get(pod.uid, ()):
                identity.add((pod.namespace, pod.name, kind, claim), 1)
            for network in pod.missing:
                missing.add((pod.namespace, pod.name, network), 1)
            info_rows, ip_rows, pod_labels = self._rows.get(pod.uid, (view,), pod_rows)
            resolved.add_rendered(pod_labels, 1 if view.netns_inode else 0)
            info.extend_rendered(info_rows, [1] * len(info_rows))
            ips.extend_rendered(ip_rows, [1] * len(ip_rows))

        self._rows.sweep()

        errors = Family("planewatch_annotation_errors_total", COUNTER,
                        "Malformed network annotations seen, by reason (each distinct annotation counted once).",
                        ("reason",))
        for reason in sorted(set(ERROR_REASONS) | set(snapshot.annotation_errors)):
            errors.add((reason,), snapshot.annotation_errors.get(reason, 0))

        nets = Family("planewatch_network_info", GAUGE,
                      "A NetworkAttachmentDefinition known to the collector (value 1).",
                      ("network", "type", "master", "ipam", "resource_name", "plane"))
        broken = Family("planewatch_network_config_error", GAUGE,
                        "A NetworkAttachmentDefinition whose spec.config does not parse (value 1).",
                        ("network", "reason"))
        in_use = {iv.attachment.network for view in snapshot.pods for iv in view.interfaces}
        chosen, networks_cut = select_networks(snapshot.networks, in_use, snapshot.budgets or Budgets())
        net_cut = Family("planewatch_network_budget_cut", GAUGE,
                         "NetworkAttachmentDefinitions of a namespace left out of planewatch_network_info "
                         "by the NAD budget (none of them used by a pod on this node).", ("namespace",))
        for namespace, n in sorted(networks_cut.items()):
            net_cut.add((namespace,), n)
        for key in chosen:
            net = snapshot.networks[key]
            nets.add((key, net.cni_type, net.master, net.ipam, net.resource_name,
                      snapshot.plane_for_network(key)), 1)
            if net.config_error:
                broken.add((key, net.config_error), 1)
        return [info, ips, missing, resolved, identity, errors, nets, broken, cut, net_cut, short]
