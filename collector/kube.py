"""Pods on this node and NetworkAttachmentDefinitions from the Kubernetes API.

List, then watch from the list's resourceVersion; a 410 Gone (or an expired
resourceVersion) relists; any other failure reconnects with capped, jittered
backoff and resumes from the last resourceVersion seen (bookmarks keep it fresh).
Events are decoded as plain JSON: the client's model classes are not needed and
cost ~10x per event.

Nothing the API (or something in its place) does may turn into a request storm
or a memory spike on every node at once: a round (list and/or watch) that ends
within MIN_HEALTHY_SECONDS - an error, a 410, a stream closed at once - counts
as a failure for the backoff (a fake API closing every watch at once had drawn
220 000 WATCH requests in one second); NADs are listed in small pages and a
`spec.config` longer than MAX_NAD_CONFIG_CHARS is dropped as it arrives (100
NADs of 1 MB had cost 96 MiB per node), leaving `config_error="too_large"`.
Restarts by reason and dropped configs are counted on /metrics.

The requests go through collector/kubeclient.py (standard library, ~38 MiB less
RSS than the official client's API classes); ListWatch also runs on the official
client's list methods (tests), which answer in the same shapes.
"""
from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
from collections import Counter
from typing import Any, Callable, Mapping

from collector.discovery import Store
from collector.family import COUNTER, Family
from collector.kubeclient import KubeClient, describe, from_kubeconfig, in_cluster, resp_lines
from collector.nad import REFUSED_CONFIG

log = logging.getLogger(__name__)

NAD_GROUP, NAD_VERSION, NAD_PLURAL = "k8s.cni.cncf.io", "v1", "network-attachment-definitions"
WATCH_TIMEOUT = 300          # server-side watch timeout, seconds
PAGE = 500                   # objects per list page (default)
POD_PAGE = 100               # this node's pods: each may carry 256 KiB of annotations
NAD_PAGE = 20                # NADs per page: each may be ~1.5 MB (etcd's object limit)
# Real CNI configs are a few KiB (a conflist with tuning/portmap under 10 KiB).
MAX_NAD_CONFIG_CHARS = 64 * 1024
# A round shorter than this did not work, whatever it said: back off before the next.
MIN_HEALTHY_SECONDS = 5.0
RESTART_REASONS = ("error", "gone", "closed_early")


class Gone(Exception):
    """The resourceVersion we hold is too old: relist."""


def api_client(kubeconfig: str | None) -> KubeClient:
    """The node feed's client: from a kubeconfig file, else in-cluster."""
    return from_kubeconfig(kubeconfig) if kubeconfig else in_cluster()


class ListWatch:
    """One resource kept in sync: list (paged) → replace, then watch → upsert/delete."""

    def __init__(self, name: str, call: Callable, on_replace, on_upsert, on_delete,
                 on_listed: Callable[[], None] | None = None, stop: threading.Event | None = None,
                 page: int = PAGE, trim: Callable[[dict], bool] | None = None,
                 backoff: "Backoff | None" = None):
        self.name = name
        self.call = call                # the client's list method, with selectors bound
        self.on_replace, self.on_upsert, self.on_delete = on_replace, on_upsert, on_delete
        self.on_listed = on_listed or (lambda: None)
        self.stop_event = stop or threading.Event()
        self.page = page
        self.trim = trim or (lambda obj: False)     # shrinks an object in place; True if it did
        self.resource_version = ""
        self.relists = 0
        self.backoff = backoff or Backoff()
        self.restarts: Counter[str] = Counter({r: 0 for r in RESTART_REASONS})
        self.requests: Counter[str] = Counter({"list": 0, "watch": 0})
        self.trimmed = 0

    def run(self) -> None:
        previous = ""
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                if not self.resource_version:
                    self.list()
                self.watch()
                reason = "closed_early"
            except Gone:
                log.info("%s: resourceVersion %s expired, relisting", self.name, self.resource_version)
                self.resource_version = ""
                reason = "gone"
            except Exception as err:     # API down, TLS, timeouts: retry
                log.warning("%s: %s", self.name, _short(err))
                reason = "error"
            # the resourceVersion expired while the API was away: the relist that
            # resumes after an outage goes at once (a second 410 backs off as usual)
            resumed, previous = reason == "gone" and previous == "error", reason
            if reason != "error" and time.monotonic() - started >= MIN_HEALTHY_SECONDS:
                self.backoff.reset()     # a watch that lived: the next round starts at once
                continue
            self.restarts[reason] += 1
            if resumed:
                continue
            delay = self.backoff.next()
            log.info("%s: round ended after %.1fs (%s); next in %.1fs", self.name,
                     time.monotonic() - started, reason, delay)
            self.stop_event.wait(delay)

    def list(self) -> None:
        items: list[dict] = []
        token = None
        while True:
            self.requests["list"] += 1
            kwargs = {"limit": self.page, "_preload_content": False, "_request_timeout": 60}
            if token:
                kwargs["_continue"] = token
            try:
                body = json.loads(self.call(**kwargs).data)
            except Exception as err:
                if getattr(err, "status", None) == 410:       # the continue token expired mid-list
                    items, token = [], None
                    continue
                raise
            page = body.get("items") or []
            for obj in page:
                self._trim(obj)
            items.extend(page)
            del page
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                break
        self.on_replace(items)
        self.resource_version = (body.get("metadata") or {}).get("resourceVersion", "")
        self.relists += 1
        self.on_listed()
        log.info("%s: listed %d at resourceVersion %s", self.name, len(items), self.resource_version)

    def _trim(self, obj) -> None:
        if isinstance(obj, dict) and self.trim(obj):
            self.trimmed += 1

    def watch(self) -> None:
        self.requests["watch"] += 1
        resp = self.call(watch=True, resource_version=self.resource_version,
                         allow_watch_bookmarks=True, timeout_seconds=WATCH_TIMEOUT,
                         _preload_content=False, _request_timeout=(10, WATCH_TIMEOUT + 30))
        try:
            for line in resp_lines(resp):
                if self.stop_event.is_set():
                    return
                self.handle(json.loads(line))
        finally:
            resp.release_conn()

    def handle(self, event: Mapping) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise RuntimeError(f"watch error: {obj.get('message', obj)}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self._trim(obj)
            self.on_upsert(obj)
        elif kind == "DELETED":
            self.on_delete(obj)
        if rv:
            self.resource_version = rv


class Backoff:
    """Doubling delays, capped, each drawn from [half, full] of the step so that
    every node of a cluster does not come back to the API at the same instant."""

    def __init__(self, first: float = 0.5, cap: float = 30.0):
        self.first, self.cap, self.current = first, cap, 0.0

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.first)
        return self.current * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.current = 0.0


class KubeFeed:
    """Feeds the store from the API: pods on `node_name`, and every NAD."""

    FEED = "kube-pods"

    def __init__(self, store: Store, api, node_name: str, watch_nads: bool = True,
                 backoff: Callable[[], Backoff] = Backoff):
        """`api`: a KubeClient, or the official client's ApiClient; `backoff` makes
        each watch's Backoff (tests scale its steps down)."""
        if not node_name:
            raise ValueError("--node-name (or NODE_NAME) is needed to watch this node's pods")
        self.store = store
        self.stop_event = threading.Event()
        selector = f"spec.nodeName={node_name}"
        pods: Callable[..., Any]            # a list/watch call of either client
        nads: Callable[..., Any]
        if isinstance(api, KubeClient):
            pods = api.pods(field_selector=selector)
            nads = api.cluster_custom_objects(NAD_GROUP, NAD_VERSION, NAD_PLURAL)
        else:
            from kubernetes import client
            pods = functools.partial(client.CoreV1Api(api).list_pod_for_all_namespaces, field_selector=selector)
            nads = functools.partial(client.CustomObjectsApi(api).list_cluster_custom_object,
                                     NAD_GROUP, NAD_VERSION, NAD_PLURAL)
        self.watches = [ListWatch("pods", pods, store.replace_pods, store.upsert_pod, store.delete_pod,
                                  on_listed=lambda: store.mark_ready(self.FEED), stop=self.stop_event,
                                  page=POD_PAGE, backoff=backoff())]
        if watch_nads:
            self.watches.append(ListWatch("network-attachment-definitions", nads, store.replace_networks,
                                          store.upsert_network, store.delete_network, stop=self.stop_event,
                                          page=NAD_PAGE, trim=trim_nad_config, backoff=backoff()))
        self._threads: list[threading.Thread] = []
        store.expect(self.FEED)

    def start(self) -> None:
        for w in self.watches:
            t = threading.Thread(target=w.run, name=f"watch-{w.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self.stop_event.set()

    def families(self) -> list[Family]:
        return watch_families(self.watches)


def watch_families(watches) -> list[Family]:
    restarts = Family("planewatch_kube_watch_restarts_total", COUNTER,
                      "List/watch rounds against the Kubernetes API that failed or ended within "
                      "seconds (error, 410 gone, closed early), each followed by a backoff.",
                      ("resource", "reason"))
    requests = Family("planewatch_kube_requests_total", COUNTER,
                      "List pages and watches requested from the Kubernetes API.", ("resource", "verb"))
    trimmed = Family("planewatch_kube_objects_trimmed_total", COUNTER,
                     "Objects received with a field over its size limit, dropped on arrival "
                     "(a NAD spec.config over 64 KiB).", ("resource",))
    for w in watches:
        for reason in RESTART_REASONS:
            restarts.add((w.name, reason), w.restarts[reason])
        for verb in ("list", "watch"):
            requests.add((w.name, verb), w.requests[verb])
        trimmed.add((w.name,), w.trimmed)
    return [restarts, requests, trimmed]


def trim_nad_config(obj: dict) -> bool:
    """Replace a NAD's oversized spec.config by a marker nad.py reports as too_large."""
    spec = obj.get("spec")
    if isinstance(spec, dict) and isinstance(spec.get("config"), str) \
            and len(spec["config"]) > MAX_NAD_CONFIG_CHARS:
        spec["config"] = REFUSED_CONFIG
        return True
    return False


def _short(err: Exception) -> str:
    return describe(err)
