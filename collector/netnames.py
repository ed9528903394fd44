"""Which network each network-status entry names (pure, never raises).

What the `name` of a network-status entry means depends on who wrote it
(docs/real-cnis.md has the table):

- Multus >= 3.6 writes every NetworkAttachmentDefinition as "ns/name". A bare
  name is a delegate's own CNI config name: the cluster network (clusterNetwork,
  Calico's `k8s-pod-network`, `ovn-kubernetes`, flannel's `cbr0`, or "" when the
  config has none), whatever its `default` flag says. KubeVirt pods list it with
  `default: false` next to a default-network override; OVN-Kubernetes primary
  user-defined networks make Multus list it twice (see `_primary_udn`).
- Multus <= 3.5 wrote a NAD's bare name, meant in the pod's namespace.
- Multus <= 3.4 wrote the CNI config `name` of the NAD's spec.config, which
  several NADs may share.
- KubeVirt's own fixtures add a `namespace` key to an entry (annotations.py
  honours it).

So a bare name is mapped to a NAD on evidence: a request (the networks
annotation) naming that NAD, or naming a known NAD whose config `name` it is;
the request's interface narrows several candidates down; a known NAD of that
name in the pod's namespace comes next. Without evidence, a bare entry is the
cluster network when it has the cluster network's shape: `default: true`, the
pod's primary interface `eth0`, the name of the default entry (OVN-K primary
UDN), or Multus's first entry (the clusterNetwork delegate comes first) without
an interface (Calico-style); it keeps its delegate name, never an invented "ns/name". Any other bare
entry is read as Multus <= 3.5 meant it, a NAD in the pod's namespace. An entry
several requests fit equally keeps its bare name (which NAD it is cannot be
known) but still satisfies one of those requests, so a network that is attached
is not reported missing.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Iterable, Mapping, Sequence

from collector.model import Attachment, NetworkDefinition, Pod, Request


def qualified(namespace: str, name: str) -> str:
    """"ns/name"; a bare name when the namespace is unknown (a malformed object)."""
    return f"{namespace}/{name}" if namespace else name

PRIMARY_ROLE = "primary"
PRIMARY_INTERFACE = "eth0"


def _nad_name(network: str) -> str:
    return network.split("/", 1)[1] if "/" in network else network


def candidates(att: Attachment, requests: Sequence[Request], namespace: str,
               nads: Mapping[str, NetworkDefinition]) -> tuple[str, ...]:
    """The NADs ("ns/name") a bare, non-default entry may stand for, best evidence first."""
    name = att.network
    fits = [r for r in requests if _nad_name(r.network) == name]                 # Multus <= 3.5
    if not fits:                                                                 # Multus <= 3.4
        fits = [r for r in requests if (nad := nads.get(r.network)) is not None and nad.config_name == name]
    if att.interface and len(fits) > 1:
        same = [r for r in fits if r.interface == att.interface]
        fits = same or fits
    found = tuple(dict.fromkeys(r.network for r in fits))
    if not found and namespace and f"{namespace}/{name}" in nads:
        return (f"{namespace}/{name}",)
    return found


def _primary_udn(atts: Sequence[Attachment], namespace: str, nads: Mapping[str, NetworkDefinition]) -> dict[int, str]:
    """OVN-Kubernetes primary user-defined network: the default delegate returns
    two interfaces, so Multus writes two entries with the delegate's bare name,
    `eth0` (cluster default network, kept for probes) without `default` and the
    UDN's interface (`ovn-udn1`) with `default: true`. The default one is the
    pod's primary network: it becomes the namespace's NAD with `role: primary`
    when exactly one is known (else it keeps the delegate's name)."""
    bare_plain = {a.network for a in atts if a.cluster and not a.default and a.network}
    primary = [key for key, nad in nads.items()
               if nad.namespace == namespace and nad.role == PRIMARY_ROLE]
    if len(primary) != 1:
        return {}
    return {i: primary[0] for i, a in enumerate(atts)
            if a.default and a.network in bare_plain}


def resolve_attachments(atts: Sequence[Attachment], requests: Sequence[Request], namespace: str,
                        nads: Mapping[str, NetworkDefinition],
                        ) -> tuple[tuple[Attachment, ...], dict[int, tuple[str, ...]]]:
    """(attachments with bare NAD names mapped back, {index: candidates} of the ambiguous)."""
    ambiguous: dict[int, tuple[str, ...]] = {}
    # Start from the names as written: a NAD known now may map what could not be before.
    out = [replace(a, network=a.written_name) if a.written_name and a.network != a.written_name else a
           for a in atts]
    default_names = {a.network for a in out if a.default and "/" not in a.network}
    for i, att in enumerate(out):
        if att.default:
            out[i] = replace(att, cluster=True)
            continue
        if not att.network or "/" in att.network:
            out[i] = replace(att, cluster=False)
            continue
        found = candidates(att, requests, namespace, nads)
        if len(found) == 1:
            out[i] = replace(att, network=found[0], cluster=False)
        elif found:
            ambiguous[i] = found
            out[i] = replace(att, cluster=False)
        elif att.interface == PRIMARY_INTERFACE or att.network in default_names or (i == 0 and not att.interface):
            out[i] = replace(att, cluster=True)
        else:
            out[i] = replace(att, network=qualified(namespace, att.network), cluster=False)
    for i, network in _primary_udn(out, namespace, nads).items():
        out[i] = replace(out[i], network=network)
    return tuple(out), ambiguous


def missing_networks(requests: Iterable[Request], attachments: Sequence[Attachment],
                     has_status: bool, phase: str,
                     ambiguous: Mapping[int, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """Requested networks ("ns/name") with fewer status entries than requests.

    A network asked for n times needs n entries; each one short appears once in
    the result (in request order). An ambiguous entry (several requests fit it)
    satisfies one request it fits. Only decided when the status annotation
    exists or the pod is Running: a pod still being set up (Pending, no status
    yet) misses nothing, and a Running pod without any status misses everything.
    """
    if not has_status and phase != "Running":
        return ()
    ambiguous = ambiguous or {}
    present = Counter(a.network for i, a in enumerate(attachments) if i not in ambiguous)
    spare = [set(c) for _, c in sorted(ambiguous.items())]
    missing = []
    for request in requests:
        if present[request.network] > 0:
            present[request.network] -= 1
            continue
        fit = next((s for s in spare if request.network in s), None)
        if fit is not None:
            spare.remove(fit)
        else:
            missing.append(request.network)
    return tuple(missing)


def resolve_pod(pod: Pod, nads: Mapping[str, NetworkDefinition]) -> Pod:
    """The pod with its entries' networks resolved against the known NADs and its
    missing networks recomputed; the same object when nothing changes."""
    atts, ambiguous = resolve_attachments(pod.attachments, pod.requests, pod.namespace, nads)
    missing = () if pod.host_network else missing_networks(
        pod.requests, atts, pod.has_status, pod.phase, ambiguous)
    if atts == pod.attachments and missing == pod.missing and all(
            a.cluster == b.cluster for a, b in zip(atts, pod.attachments)):
        return pod
    return replace(pod, attachments=atts, missing=missing)
