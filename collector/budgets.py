"""Budgets: how much of the metrics any one tenant's input may occupy.

A pod's owner writes its annotations, the NADs of its namespace and the links
of its own network namespace; each of those turns into series on every scrape.
Without a bound, one pod with a large network-status annotation gave 4 179
series (3.9 MB a scrape) and 5 000 NADs in one namespace 5 000 series on every
node (issue 13).

Budgets are applied after parsing (collector/annotations.py, nad.py stay the
parsers), in this order, so an honest pod is never charged for an attacker:
1. per pod, at each change of the pod (Store): attachments, IPs per
   attachment, length of any label value taken from the annotation;
2. per node, when the store view is built: the estimated series of all pods
   together. The cut is max-min fair (water filling): pods are trimmed down to
   a common level, so only pods above it lose anything, the biggest first,
   and the result depends on the set of pods, not on who arrived first;
3. NADs: those a pod on this node uses always count; the others are capped
   per namespace, then the total is capped with the same fair level across
   namespaces.
What was left out is exported (`planewatch_pod_budget_cut`,
`planewatch_network_budget_cut`), never dropped silently.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Iterable

from collector.model import Attachment, Pod

# Reasons of planewatch_pod_budget_cut (what was left out, counted in items).
CUT_ATTACHMENTS = "attachments"         # attachments beyond --budget.pod-attachments
CUT_IPS = "ips"                         # IPs beyond --budget.attachment-ips
CUT_LABEL_LENGTH = "label_length"       # attachments / IPs with a value over --budget.label-length
CUT_REQUESTS = "requests"               # requested-but-missing networks beyond the attachment budget
CUT_NODE_SERIES = "node_series"         # attachments shed to fit --budget.node-series
POD_CUT_REASONS = (CUT_ATTACHMENTS, CUT_IPS, CUT_LABEL_LENGTH, CUT_REQUESTS, CUT_NODE_SERIES)

# Series one attachment costs, estimated: 10 netlink, 1 info, 1 rp_filter, 4 eBPF
# traffic, ~10 VF counters, a few drop reasons and routes. The per-IP series and
# the pod's own series (netns_resolved, missing networks) are added on top.
SERIES_PER_ATTACHMENT = 32
# An IP with prefix length is at most 43 characters (IPv6 /128); anything far
# longer is not an address a CNI wrote.
MAX_IP_TEXT = 64


@dataclass(frozen=True)
class Budgets:
    pod_attachments: int = 32
    attachment_ips: int = 16
    attachment_gateways: int = 16       # gateways per attachment in the neighbour metrics
    label_length: int = 512             # k8s names: ns 63 + "/" + NAD 253 fits
    node_series: int = 100_000          # 250 pods x 8 attachments x (32 + 2 IPs) = 68 000 fits
    namespace_networks: int = 256
    networks: int = 2048
    netns_links: int = 1024             # links read per pod netns refresh
    netns_addresses: int = 4096         # addresses read per pod netns refresh
    netns_routes: int = 4096            # routes (and rules) read per dump of a pod netns, each family
    pod_route_checks: int = 256         # route lookups (and policy rules shown) per routing analysis of a pod
    netns_refresh_seconds: float = 0.05     # time one pod netns refresh may take
    netns_refresh_share: float = 0.05       # share of wall time a netns' event-driven refreshes may take


DEFAULT_BUDGETS = Budgets()             # what a snapshot without budgets of its own uses


def add_budget_flags(p: argparse.ArgumentParser) -> None:
    d = DEFAULT_BUDGETS
    add = p.add_argument
    add("--budget.pod-attachments", dest="budget_pod_attachments", type=int, default=d.pod_attachments,
        help="attachments exported per pod; the rest counted in planewatch_pod_budget_cut "
             f"(default {d.pod_attachments})")
    add("--budget.attachment-ips", dest="budget_attachment_ips", type=int, default=d.attachment_ips,
        help=f"IPs exported per attachment (default {d.attachment_ips})")
    add("--budget.attachment-gateways", dest="budget_attachment_gateways", type=int, default=d.attachment_gateways,
        help="gateways per attachment in planewatch_gateway_neighbour_* (the annotation's, then the routes' "
             "next hops, default routes first); the rest counted in planewatch_gateway_budget_cut "
             f"(default {d.attachment_gateways})")
    add("--budget.label-length", dest="budget_label_length", type=int, default=d.label_length,
        help="longest label value taken from an annotation; longer ones drop their attachment "
             f"(default {d.label_length})")
    add("--budget.node-series", dest="budget_node_series", type=int, default=d.node_series,
        help="estimated per-pod series on this node; above it the biggest pods are trimmed first "
             f"(default {d.node_series})")
    add("--budget.namespace-networks", dest="budget_namespace_networks", type=int, default=d.namespace_networks,
        help="NADs of one namespace exported in planewatch_network_info besides those in use "
             f"(default {d.namespace_networks})")
    add("--budget.networks", dest="budget_networks", type=int, default=d.networks,
        help=f"NADs exported in planewatch_network_info in all, besides those in use (default {d.networks})")
    add("--budget.netns-links", dest="budget_netns_links", type=int, default=d.netns_links,
        help=f"links read per pod netns refresh (default {d.netns_links})")
    add("--budget.netns-addresses", dest="budget_netns_addresses", type=int, default=d.netns_addresses,
        help=f"addresses read per pod netns refresh (default {d.netns_addresses})")
    add("--budget.netns-routes", dest="budget_netns_routes", type=int, default=d.netns_routes,
        help="routes (and policy rules) read per dump of a pod netns, each family: the gateways' and the "
             "routing analysis' dumps; more is planewatch_pod_netns_cut_short{reason=\"routes\"} "
             f"(default {d.netns_routes})")
    add("--budget.pod-route-checks", dest="budget_pod_route_checks", type=int, default=d.pod_route_checks,
        help="route lookups per routing analysis of a pod (gateways and subnets first, then routes' "
             "prefixes, wider first), and policy rules shown; more is "
             "planewatch_pod_netns_cut_short{reason=\"route_checks\"} "
             f"(default {d.pod_route_checks})")
    add("--budget.netns-refresh-time", dest="budget_netns_refresh_seconds", type=float,
        default=d.netns_refresh_seconds,
        help=f"seconds one pod netns refresh may take (default {d.netns_refresh_seconds})")
    add("--budget.netns-refresh-share", dest="budget_netns_refresh_share", type=float,
        default=d.netns_refresh_share,
        help="share of time one netns' link-event refreshes may take; more are deferred "
             f"(default {d.netns_refresh_share})")


def budgets_from_args(args) -> Budgets:
    values = {name: getattr(args, f"budget_{name}") for name in Budgets.__dataclass_fields__
              if hasattr(args, f"budget_{name}")}
    budgets = Budgets(**values)
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"--budget.{name.replace('_', '-')} must be positive, got {value}")
    return budgets


# --- 1. per pod ------------------------------------------------------------

def _too_long(att: Attachment, limit: int) -> bool:
    d = att.device
    return any(len(v) > limit for v in (att.network, att.interface, att.mac, att.plane, d.type,
                                        d.pci_address, d.pf_pci_address))


def trim_pod(pod: Pod, budgets: Budgets) -> tuple[Pod, dict[str, int]]:
    """The pod within its own budget, and what was left out by reason."""
    cuts: dict[str, int] = {}

    def cut(reason: str, n: int) -> None:
        if n > 0:
            cuts[reason] = cuts.get(reason, 0) + n

    kept: list[Attachment] = []
    for att in pod.attachments:
        if _too_long(att, budgets.label_length):
            cut(CUT_LABEL_LENGTH, 1)
            continue
        ips = tuple(ip for ip in att.ips if len(ip) <= MAX_IP_TEXT)
        cut(CUT_LABEL_LENGTH, len(att.ips) - len(ips))
        cut(CUT_IPS, len(ips) - budgets.attachment_ips)
        ips = ips[:budgets.attachment_ips]
        kept.append(att if ips == att.ips else replace(att, ips=ips))
    cut(CUT_ATTACHMENTS, len(kept) - budgets.pod_attachments)
    kept = kept[:budgets.pod_attachments]
    missing = tuple(m for m in pod.missing if len(m) <= budgets.label_length)
    cut(CUT_LABEL_LENGTH, len(pod.missing) - len(missing))
    cut(CUT_REQUESTS, len(missing) - budgets.pod_attachments)
    missing = missing[:budgets.pod_attachments]
    if not cuts:
        return pod, cuts
    return replace(pod, attachments=tuple(kept), missing=missing), cuts


# --- 2. per node -----------------------------------------------------------

def pod_series(pod: Pod) -> int:
    """The series this pod is expected to cost (see SERIES_PER_ATTACHMENT)."""
    return 1 + len(pod.missing) + sum(SERIES_PER_ATTACHMENT + len(a.ips) for a in pod.attachments)


def fair_level(weights: Iterable[int], budget: int) -> int | None:
    """The largest level L with sum(min(w, L)) <= budget; None when all fit."""
    ordered = sorted(weights)
    if sum(ordered) <= budget:
        return None
    left = budget
    for i, w in enumerate(ordered):
        share = left // (len(ordered) - i)
        if w > share:
            return share
        left -= w
    return None     # unreachable: the sum exceeded the budget


def fit_node(pods: Iterable[Pod], budget: int) -> tuple[list[Pod], dict[str, int]]:
    """Pods trimmed so their estimated series fit `budget`: pods above the fair
    level lose attachments from the end of their annotation until they are under
    it. Returns the pods and, per trimmed pod UID, the attachments shed."""
    pods = list(pods)
    level = fair_level((pod_series(p) for p in pods), budget)
    if level is None:
        return pods, {}
    out, shed = [], {}
    for pod in pods:
        if pod_series(pod) <= level:
            out.append(pod)
            continue
        atts, missing = list(pod.attachments), list(pod.missing)
        trimmed = pod
        while pod_series(trimmed) > level and (atts or missing):
            if missing:
                missing.pop()
            else:
                atts.pop()
            trimmed = replace(pod, attachments=tuple(atts), missing=tuple(missing))
        shed[pod.uid] = len(pod.attachments) - len(atts) + len(pod.missing) - len(missing)
        out.append(trimmed)
    return out, shed


# --- 3. NADs ---------------------------------------------------------------

def select_networks(keys: Iterable[str], in_use: set[str],
                    budgets: Budgets) -> tuple[list[str], dict[str, int]]:
    """The NAD keys ("ns/name") to export, sorted, and per namespace how many were
    left out. NADs in use by a pod here are always kept: they are bounded by the
    pods' own budgets and the rules join on them."""
    by_ns: dict[str, list[str]] = {}
    for key in sorted(keys):
        if key not in in_use:
            by_ns.setdefault(key.partition("/")[0], []).append(key)
    capped = {ns: names[:budgets.namespace_networks] for ns, names in by_ns.items()}
    level = fair_level((len(v) for v in capped.values()), budgets.networks)
    if level is not None:
        capped = {ns: names[:level] for ns, names in capped.items()}
    cut = {ns: len(by_ns[ns]) - len(capped[ns]) for ns in by_ns if len(by_ns[ns]) > len(capped[ns])}
    chosen = sorted(set(in_use) & set(keys) | {k for names in capped.values() for k in names})
    return chosen, cut

