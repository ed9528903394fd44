"""`planewatch cluster`: cluster-wide facts (Whereabouts IP pools), one replica.

Watches, in all namespaces, with collector/kube.py's ListWatch (paged list, watch,
relist on 410, backoff): pods (only their names are kept: leak detection),
NetworkAttachmentDefinitions (whereabouts ranges, start/end, exclusions), IPPools,
and OverlappingRangeIPReservations (optional: clusters without that CRD just lack
those two series). /metrics is computed from those objects at each scrape.

Ready (/readyz 200, `scrape_collector_success{collector="whereabouts"} 1`) once pods,
NADs and IPPools have each been listed once: before that, "leaked" would be wrong.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Generic, Mapping, TypeVar

from aiohttp import web

from collector import __version__
from collector.family import Family
from collector.whereabouts import GROUP, IPPOOL_PLURAL, RESERVATION_PLURAL, VERSION, parse_pool, parse_reservation
from collector.whereabouts_metrics import ippool_families
from collector.whereabouts_ranges import nad_ranges
from exporters.exposition import CONTENT_TYPE, render
from exporters.metrics import health_families
from exporters.serve import serve_forever, setup_logging, web_security

log = logging.getLogger("exporters.cluster")

DEFAULT_LISTEN = "127.0.0.1:9809"
COLLECTOR = "whereabouts"


def object_key(obj: Mapping) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


T = TypeVar("T")


class Keyed(Generic[T]):
    """One watched resource: parsed objects by "namespace/name", behind a shared lock."""

    def __init__(self, lock: threading.Lock, parse: Callable[[Mapping], T]):
        self.lock, self.parse = lock, parse
        self.items: dict[str, T] = {}
        self.listed = False

    def replace(self, objects: list) -> None:
        parsed = {object_key(o): self.parse(o) for o in objects}
        with self.lock:
            self.items = parsed

    def upsert(self, obj: Mapping) -> None:
        parsed = self.parse(obj)
        with self.lock:
            self.items[object_key(obj)] = parsed

    def delete(self, obj: Mapping) -> None:
        with self.lock:
            self.items.pop(object_key(obj), None)

    def mark_listed(self) -> None:
        self.listed = True


class ClusterState:
    def __init__(self, small_ranges: bool = False):
        self.small_ranges = small_ranges        # a fork's /31 and /32 reading (collector/whereabouts_ranges.py)
        self.lock = threading.Lock()
        self.pods = Keyed(self.lock, lambda obj: None)      # existence is all we need
        self.nads = Keyed(self.lock, nad_ranges)
        self.pools = Keyed(self.lock, parse_pool)
        self.reservations = Keyed(self.lock, parse_reservation)

    @property
    def ready(self) -> bool:
        return self.pods.listed and self.nads.listed and self.pools.listed

    def families(self, version: str = __version__) -> list[Family]:
        started = time.perf_counter()
        families, ok = [], self.ready
        if ok:
            with self.lock:
                pods = set(self.pods.items)
                ranges = [rc for rcs in self.nads.items.values() for rc in rcs]
                pools = list(self.pools.items.values())
                reservations = list(self.reservations.items.values()) if self.reservations.listed else None
            try:
                families = ippool_families(pools, ranges, pods, reservations, self.small_ranges)
            except Exception:               # a bug here must not take /metrics down
                log.exception("whereabouts metrics failed")
                families, ok = [], False
        return families + health_families([(COLLECTOR, ok, time.perf_counter() - started)], version)


class ClusterFeed:
    """The four ListWatches, each on its own daemon thread."""

    def __init__(self, state: ClusterState, api):
        """`api`: a collector/kubeclient.py KubeClient, or the official ApiClient."""
        from collector.kube import NAD_GROUP, NAD_PAGE, NAD_PLURAL, NAD_VERSION, ListWatch, trim_nad_config
        from collector.kubeclient import KubeClient
        self.stop_event = threading.Event()
        pods: Callable[..., Any]            # a list/watch call of either client
        if isinstance(api, KubeClient):
            pods, cluster_objects = api.pods(), api.cluster_custom_objects
        else:
            from kubernetes import client
            pods = client.CoreV1Api(api).list_pod_for_all_namespaces
            custom = client.CustomObjectsApi(api)

            def cluster_objects(group, version, plural):
                return functools.partial(custom.list_cluster_custom_object, group, version, plural)
        # NADs as on every node: small pages, an oversized spec.config dropped on arrival
        nad_options: dict[str, Any] = {"page": NAD_PAGE, "trim": trim_nad_config}
        feeds: list[tuple[str, Callable, Keyed[Any], dict[str, Any]]] = [
            ("pods", pods, state.pods, {}),
            ("network-attachment-definitions",
             cluster_objects(NAD_GROUP, NAD_VERSION, NAD_PLURAL), state.nads, nad_options),
            (IPPOOL_PLURAL, cluster_objects(GROUP, VERSION, IPPOOL_PLURAL), state.pools, {}),
            (RESERVATION_PLURAL, cluster_objects(GROUP, VERSION, RESERVATION_PLURAL), state.reservations, {}),
        ]
        self.watches = [ListWatch(name, call, keyed.replace, keyed.upsert, keyed.delete,
                                  on_listed=keyed.mark_listed, stop=self.stop_event, **options)
                        for name, call, keyed, options in feeds]

    def start(self) -> None:
        for w in self.watches:
            threading.Thread(target=w.run, name=f"watch-{w.name}", daemon=True).start()

    def stop(self) -> None:
        self.stop_event.set()


class ClusterFile:
    """The same objects from a file (Pods, NADs, IPPools, reservations), for the lab."""

    KINDS = {"Pod": "pods", "NetworkAttachmentDefinition": "nads", "IPPool": "pools",
             "OverlappingRangeIPReservation": "reservations"}

    def __init__(self, state: ClusterState, path: str):
        from collector.podsfile import ObjectsFile
        self.state = state
        self._file = ObjectsFile(path, self._apply)
        self.start, self.stop = self._file.start, self._file.stop

    def _apply(self, objects: list) -> None:
        by_kind: dict[str, list] = {attr: [] for attr in self.KINDS.values()}
        for obj in objects:
            attr = self.KINDS.get(obj.get("kind", "Pod"))
            if attr:
                by_kind[attr].append(obj)
        for attr, items in by_kind.items():
            keyed = getattr(self.state, attr)
            keyed.replace(items)
            keyed.mark_listed()


class ClusterServer:
    """/metrics, /healthz, /readyz; `.app` is what exporters.serve.serve_forever runs."""

    def __init__(self, state: ClusterState, middlewares=()):
        self.state = state
        self.app = web.Application(middlewares=list(middlewares))
        self.app.add_routes([web.get("/", self.landing), web.get("/metrics", self.metrics),
                             web.get("/healthz", self.healthz), web.get("/readyz", self.readyz)])

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(
            None, lambda: render(self.state.families()))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def landing(self, request):
        return web.Response(text="planewatch cluster: /metrics /healthz /readyz\n")

    async def healthz(self, request):
        return web.Response(text="ok\n")

    async def readyz(self, request):
        if self.state.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="waiting for the first list of pods, NADs and IPPools\n")


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--web.listen-address", dest="listen", default=DEFAULT_LISTEN,
                   help=f"address to serve on (default {DEFAULT_LISTEN}; in a Deployment use :9809)")
    p.add_argument("--web.config.file", dest="web_config", default="",
                   help="exporter-toolkit web config: TLS, basic auth, bearer token")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", ""),
                   help="kubeconfig file (default: $KUBECONFIG, else in-cluster config)")
    p.add_argument("--pods-file", default="",
                   help="read Pods, NADs and IPPools from this JSON/YAML file instead of the API (the lab)")
    p.add_argument("--whereabouts.small-ranges", dest="small_ranges", action="store_true",
                   help="count both addresses of a /31 (/127) and the one of a /32 (/128) as allocatable, "
                        "as Whereabouts forks that accept them do (upstream through v0.9.x refuses them: size 0)")
    p.add_argument("--log.level", dest="log_level", default="info", choices=["debug", "info", "warn", "error"])


def cmd_cluster(args) -> int:
    from collector.kube import api_client
    setup_logging(args.log_level)
    try:
        middlewares, ssl_context = web_security(args.web_config)
        state = ClusterState(small_ranges=args.small_ranges)
        feed: ClusterFile | ClusterFeed
        if args.pods_file:
            feed = ClusterFile(state, args.pods_file)
        else:
            feed = ClusterFeed(state, api_client(args.kubeconfig or None))
    except Exception as err:
        log.error("cannot start: %s", err)
        return 2
    asyncio.run(serve_forever(ClusterServer(state, middlewares), [feed], ssl_context, args.listen))
    return 0


def add_cluster_command(sub) -> None:
    """Add `cluster` to the `planewatch` subcommands (exporters/cli.py main())."""
    p = sub.add_parser("cluster", help="cluster-wide metrics (Whereabouts IP pools); run one replica")
    add_cluster_flags(p)
    p.set_defaults(func=cmd_cluster)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="planewatch cluster", description=__doc__.split("\n")[0])
    add_cluster_flags(parser)
    return cmd_cluster(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
