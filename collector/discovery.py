"""The pods and networks this node knows of, fed by a watch or a pods file.

Writers (collector/kube.py, collector/podsfile.py) push raw API objects; the
store parses them once per change (collector/annotations.py, collector/nad.py)
and keeps them keyed by UID (pods) and ns/name (NADs), as kube-state-metrics
does. Readers take a consistent `view()` at scrape time.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

from collector.annotations import pod_from_object
from collector.budgets import CUT_NODE_SERIES, Budgets, fit_node, trim_pod
from collector.model import NetworkDefinition, Pod
from collector.nad import network_from_object
from collector.netnames import resolve_pod
from collector.planes import PlaneMap

log = logging.getLogger(__name__)

# Pods in these phases no longer have a sandbox, hence no network namespace.
_FINISHED = {"Succeeded", "Failed"}


@dataclass(frozen=True)
class StoreView:
    pods: tuple[Pod, ...]                       # planes assigned, hostNetwork/finished dropped
    networks: Mapping[str, NetworkDefinition]
    annotation_errors: Mapping[str, int]
    version: int
    budget_cuts: Mapping[str, Mapping[str, int]] | None = None   # pod uid -> reason -> items left out


class Store:
    def __init__(self, node_name: str = "", plane_map: PlaneMap | None = None,
                 budgets: Budgets | None = None):
        self.node_name = node_name
        self.plane_map = plane_map or PlaneMap()
        self.budgets = budgets or Budgets()
        self._pods: dict[str, Pod] = {}
        self._cuts: dict[str, dict[str, int]] = {}      # uid -> per-pod budget cuts
        self._pod_fingerprint: dict[str, tuple] = {}
        self._networks: dict[str, NetworkDefinition] = {}
        self._errors: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._version = 0
        self._view: StoreView | None = None
        self._ready: set[str] = set()
        self._expected: set[str] = set()

    # --- readiness: every registered feed has delivered its first full list
    def expect(self, feed: str) -> None:
        with self._lock:
            self._expected.add(feed)

    def mark_ready(self, feed: str) -> None:
        with self._lock:
            self._ready.add(feed)

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._expected <= self._ready

    # --- pods
    def replace_pods(self, objects: Iterable[Mapping]) -> None:
        """A full list: pods absent from it are gone."""
        with self._lock:
            seen = set()
            for obj in objects:
                uid = self._upsert_pod(obj)
                if uid:
                    seen.add(uid)
            for uid in set(self._pods) - seen:
                self._drop_pod(uid)
            self._bump()

    def upsert_pod(self, obj: Mapping) -> None:
        with self._lock:
            self._upsert_pod(obj)
            self._bump()

    def delete_pod(self, obj: Mapping) -> None:
        pod = pod_from_object(obj)
        with self._lock:
            self._drop_pod(pod.uid)
            self._bump()

    def _upsert_pod(self, obj: Mapping) -> str:
        annotations = (obj.get("metadata") or {}).get("annotations") if isinstance(obj, Mapping) else None
        pod = pod_from_object(obj)
        if not pod.uid:
            return ""
        if self.node_name and pod.node and pod.node != self.node_name:
            self._drop_pod(pod.uid)
            return ""
        fingerprint = _annotation_fingerprint(annotations)
        if self._pod_fingerprint.get(pod.uid) != fingerprint:
            # Count each malformed annotation once, not at every status update.
            self._errors.update(pod.errors)
            self._pod_fingerprint[pod.uid] = fingerprint
        pod, cuts = trim_pod(pod, self.budgets)
        if cuts:
            self._cuts[pod.uid] = cuts
        else:
            self._cuts.pop(pod.uid, None)
        self._pods[pod.uid] = pod
        return pod.uid

    def _drop_pod(self, uid: str) -> None:
        self._pods.pop(uid, None)
        self._cuts.pop(uid, None)
        self._pod_fingerprint.pop(uid, None)

    # --- networks
    def replace_networks(self, objects: Iterable[Mapping]) -> None:
        with self._lock:
            self._networks = {}
            for obj in objects:
                net = network_from_object(obj)
                if net.name:
                    self._networks[net.key] = net
            self._bump()

    def upsert_network(self, obj: Mapping) -> None:
        net = network_from_object(obj)
        with self._lock:
            if net.name:
                self._networks[net.key] = net
            self._bump()

    def delete_network(self, obj: Mapping) -> None:
        net = network_from_object(obj)
        with self._lock:
            self._networks.pop(net.key, None)
            self._bump()

    def _bump(self) -> None:
        self._version += 1
        self._view = None

    # --- readers
    def view(self) -> StoreView:
        """The current pods with planes assigned; rebuilt only after a change."""
        with self._lock:
            if self._view is None:
                live = [p for p in self._pods.values() if not p.host_network and p.phase not in _FINISHED]
                # Per-pod budgets are already applied; the node budget is applied to
                # the set of live pods, so it never depends on arrival order.
                fitted, shed = fit_node(live, self.budgets.node_series)
                cuts = {p.uid: dict(self._cuts.get(p.uid, {})) for p in live
                        if p.uid in self._cuts or p.uid in shed}
                for uid, n in shed.items():
                    cuts[uid][CUT_NODE_SERIES] = n
                pods = tuple(self._with_planes(p) for p in fitted)
                self._view = StoreView(pods, dict(self._networks), dict(self._errors), self._version, cuts)
            return self._view

    def _with_planes(self, pod: Pod) -> Pod:
        # Older Multus's config names need the NADs to map back (collector/netnames.py).
        pod = resolve_pod(pod, self._networks)
        atts = []
        for att in pod.attachments:
            nad = self._networks.get(att.network)
            # Every cluster-network entry takes the default network's plane, the
            # one carrying the pod's default route or not (KubeVirt's eth0 next to
            # an override, OVN-K's eth0 next to a primary UDN).
            plane = self.plane_map.plane_for(att.network, default=att.default or att.cluster,
                                             nad_plane=nad.plane if nad else "")
            atts.append(att if plane == att.plane else replace(att, plane=plane))
        return replace(pod, attachments=tuple(atts))


def _annotation_fingerprint(annotations) -> tuple:
    if not isinstance(annotations, Mapping):
        return ()
    return tuple(sorted((k, v) for k, v in annotations.items()
                        if isinstance(k, str) and k.startswith("k8s.v1.cni.cncf.io/") and isinstance(v, str)))
