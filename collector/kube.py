"""Pods on this node and NetworkAttachmentDefinitions from the Kubernetes API.

List, then watch from the list's resourceVersion; a 410 Gone (or an expired
resourceVersion) relists; any other failure reconnects with capped, jittered
backoff and resumes from the last resourceVersion seen (bookmarks keep it fresh).
Events are decoded as plain JSON: the client's model classes are not needed and
cost ~10x per event.
"""
from __future__ import annotations

import functools
import json
import logging
import random
import threading
from typing import Callable, Mapping

from kubernetes import client, config as kube_config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from collector.discovery import Store

log = logging.getLogger(__name__)

NAD_GROUP, NAD_VERSION, NAD_PLURAL = "k8s.cni.cncf.io", "v1", "network-attachment-definitions"
WATCH_TIMEOUT = 300          # server-side watch timeout, seconds
PAGE = 500


class Gone(Exception):
    """The resourceVersion we hold is too old: relist."""


def api_client(kubeconfig: str | None) -> client.ApiClient:
    if kubeconfig:
        return kube_config.new_client_from_config(config_file=kubeconfig)
    kube_config.load_incluster_config()
    return client.ApiClient()


class ListWatch:
    """One resource kept in sync: list (paged) → replace, then watch → upsert/delete."""

    def __init__(self, name: str, call: Callable, on_replace, on_upsert, on_delete,
                 on_listed: Callable[[], None] | None = None, stop: threading.Event | None = None):
        self.name = name
        self.call = call                # the client's list method, with selectors bound
        self.on_replace, self.on_upsert, self.on_delete = on_replace, on_upsert, on_delete
        self.on_listed = on_listed or (lambda: None)
        self.stop_event = stop or threading.Event()
        self.resource_version = ""
        self.relists = 0
        self.backoff = Backoff()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                if not self.resource_version:
                    self.list()
                self.watch()
                self.backoff.reset()
            except Gone:
                log.info("%s: resourceVersion %s expired, relisting", self.name, self.resource_version)
                self.resource_version = ""
            except Exception as err:     # API down, TLS, timeouts: retry
                delay = self.backoff.next()
                log.warning("%s: %s; retrying in %.1fs", self.name, _short(err), delay)
                self.stop_event.wait(delay)

    def list(self) -> None:
        items, token = [], None
        while True:
            kwargs = {"limit": PAGE, "_preload_content": False, "_request_timeout": 60}
            if token:
                kwargs["_continue"] = token
            try:
                body = json.loads(self.call(**kwargs).data)
            except ApiException as err:
                if err.status == 410:       # the continue token expired mid-list
                    items, token = [], None
                    continue
                raise
            items.extend(body.get("items") or [])
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                break
        self.on_replace(items)
        self.resource_version = (body.get("metadata") or {}).get("resourceVersion", "")
        self.relists += 1
        self.on_listed()
        log.info("%s: listed %d at resourceVersion %s", self.name, len(items), self.resource_version)

    def watch(self) -> None:
        resp = self.call(watch=True, resource_version=self.resource_version,
                         allow_watch_bookmarks=True, timeout_seconds=WATCH_TIMEOUT,
                         _preload_content=False, _request_timeout=(10, WATCH_TIMEOUT + 30))
        try:
            for line in iter_resp_lines(resp):
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
            self.on_upsert(obj)
        elif kind == "DELETED":
            self.on_delete(obj)
        if rv:
            self.resource_version = rv


class Backoff:
    def __init__(self, first: float = 0.5, cap: float = 30.0):
        self.first, self.cap, self.current = first, cap, 0.0

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.first)
        return self.current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.current = 0.0


class KubeSource:
    """Feeds the store from the API: pods on `node_name`, and every NAD."""

    FEED = "kube-pods"

    def __init__(self, store: Store, api: client.ApiClient, node_name: str, watch_nads: bool = True):
        if not node_name:
            raise ValueError("--node-name (or NODE_NAME) is needed to watch this node's pods")
        self.store = store
        self.stop_event = threading.Event()
        core = client.CoreV1Api(api)
        pods = functools.partial(core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={node_name}")
        self.watches = [ListWatch("pods", pods, store.replace_pods, store.upsert_pod, store.delete_pod,
                                  on_listed=lambda: store.mark_ready(self.FEED), stop=self.stop_event)]
        if watch_nads:
            custom = client.CustomObjectsApi(api)
            nads = functools.partial(custom.list_cluster_custom_object, NAD_GROUP, NAD_VERSION, NAD_PLURAL)
            self.watches.append(ListWatch("network-attachment-definitions", nads, store.replace_networks,
                                          store.upsert_network, store.delete_network, stop=self.stop_event))
        self._threads: list[threading.Thread] = []
        store.expect(self.FEED)

    def start(self) -> None:
        for w in self.watches:
            t = threading.Thread(target=w.run, name=f"watch-{w.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self.stop_event.set()


def _short(err: Exception) -> str:
    if isinstance(err, ApiException):
        return f"HTTP {err.status} {err.reason}"
    text = str(err)
    return text if len(text) < 200 else text[:200] + "..."
