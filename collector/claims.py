"""Who claims what: the resolution layer's answer to "which pod owns this?".

Annotations are written by tenants, so two pods may claim one thing: a network
namespace (collector/netns.py decides those and records PodView.conflicts) or
an SR-IOV VF (by `device-info` PCI address, decided here). A VF two pods claim
is given to neither: its counters are not exported twice under two owners (the
sriov source skips it through `contested_vfs`) and every claimant carries a
conflict, exported as `planewatch_pod_identity_conflict{kind, claim}`.

An IP claim is checked against the kernel: `ip_verification` says whether the
pod's own namespace holds the address, so an IP copied into an annotation does
not make an innocent pod look like a duplicate without saying who holds what.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from collector.model import InterfaceView, PodView

VF_DEVICE_TYPES = ("pci", "vdpa")
# planewatch_pod_ip_info{verified}
VERIFIED, NOT_HELD, UNKNOWN = "true", "false", "unknown"


def vf_claimants(views: Iterable[PodView]) -> dict[str, set[str]]:
    """VF PCI address -> UIDs of the pods whose annotation claims it."""
    out: dict[str, set[str]] = defaultdict(set)
    for view in views:
        for iv in view.devices:
            dev = iv.attachment.device
            if dev.type in VF_DEVICE_TYPES and dev.pci_address:
                out[dev.pci_address].add(view.pod.uid)
    return out


def contested_vfs(views: Iterable[PodView]) -> set[str]:
    """VF PCI addresses more than one pod claims: nobody's counters."""
    return {addr for addr, uids in vf_claimants(views).items() if len(uids) > 1}


def conflicts_by_pod(views: Iterable[PodView]) -> dict[str, tuple[tuple[str, str], ...]]:
    """uid -> every (kind, claim) the pod contests: namespaces (from the resolver) and VFs."""
    views = list(views)
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for view in views:
        out[view.pod.uid].extend(view.conflicts)
    for addr, uids in vf_claimants(views).items():
        if len(uids) > 1:
            for uid in uids:
                out[uid].append(("vf", addr))
    return {uid: tuple(sorted(set(c))) for uid, c in out.items() if c}


def ip_verification(view: PodView, iv: InterfaceView, ip: str) -> str:
    """Whether the kernel backs the pod's claim to `ip`.

    Unknown when there is nothing to look at: the namespace is not resolved, the
    interface has no netdev (DPDK VF), or it is a bridge port (KubeVirt bridge
    binding: the address lives in the VM behind it).
    """
    if not view.netns_inode or iv.link is None or iv.link.master:
        return UNKNOWN
    return VERIFIED if ip in view.addresses else NOT_HELD
