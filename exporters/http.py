"""The HTTP face: /metrics, /healthz, /readyz, /debug/attachments, /debug/asymmetric.

Kernel work runs on one worker thread (setns is per thread; netns sockets and
BPF maps are read by one scrape at a time). Requests that arrive while a
collection runs share the *next* one: every answer is read after its request
arrived, and 50 concurrent scrapers cost two collections, not fifty. /debug/*
requests share the one running (300 queued /debug requests used to push a
scrape from 0.17 s to 5.2 s): at most one debug job waits for the worker.

A collection stuck on the worker (a hung kernel read, a FIFO) makes /healthz
fail once it has run longer than `max_scrape_seconds`, so the liveness probe
restarts the collector instead of leaving every later scrape waiting.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from dataclasses import asdict, dataclass

from aiohttp import payload, web

from collector.memory import Trimmer
from collector.model import PodView
from collector.registry import Snapshot
from exporters.exposition import CONTENT_TYPE
from exporters.metrics import Scraper
from kernel.gzstream import GzipStream

log = logging.getLogger(__name__)

LANDING = """<html><head><title>planewatch</title></head><body>
<h1>planewatch</h1><p>Per-plane network metrics for multi-homed pods.</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/debug/attachments">/debug/attachments</a></li>
<li><a href="/debug/asymmetric">/debug/asymmetric</a></li><li><a href="/healthz">/healthz</a></li>
<li><a href="/readyz">/readyz</a></li></ul></body></html>
"""


RECONCILE_SECONDS = 5.0
# Longer than any honest collection (1000 interfaces: ~1 s) and than Prometheus'
# scrape timeout, shorter than a liveness probe's patience for a hung node agent.
MAX_SCRAPE_SECONDS = 120.0
MAX_FLOWS = 1000            # /debug/asymmetric?limit= ceiling


class Server:
    def __init__(self, scraper: Scraper, *, middlewares=(), asymmetric_flows=None,
                 reconcile_seconds: float = RECONCILE_SECONDS,
                 max_scrape_seconds: float = MAX_SCRAPE_SECONDS):
        self.scraper = scraper
        self.max_scrape_seconds = max_scrape_seconds
        self._busy_since: float | None = None               # when the worker's job started
        self._debug: dict[str, asyncio.Future] = {}         # debug jobs running, by kind
        self.asymmetric_flows = asymmetric_flows        # callable(n) -> list[dict], or None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrape")
        self._trim = Trimmer()
        # attaching BPF to 1000 interfaces takes ~25 s: never on the scrape thread
        self._reconcile_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="reconcile")
        # deflates a collection's pieces while the collection goes on (GzipStream)
        self._gzip_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gzip")
        self._inflight: asyncio.Future | None = None      # the collection running now
        self._next: asyncio.Future | None = None          # the one queued behind it
        self._next_wants: set[str] = set()                # "gzip", "plain": what _next's waiters asked
        self.app = web.Application(middlewares=list(middlewares))
        self.app.add_routes([
            web.get("/", self.landing),
            web.get("/metrics", self.metrics),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/debug/attachments", self.debug_attachments),
            web.get("/debug/asymmetric", self.debug_asymmetric),
        ])
        self.reconcile_seconds = reconcile_seconds
        self._reconciler: asyncio.Task | None = None
        self.app.on_startup.append(self._start_reconciler)
        self.app.on_cleanup.append(self._cleanup)

    async def _start_reconciler(self, app) -> None:
        self._reconciler = asyncio.create_task(self._reconcile_forever())

    def _warm(self) -> bool:
        return getattr(self.scraper, "warm", True)

    async def _reconcile_forever(self) -> None:
        while True:
            if self.scraper.store.ready:
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        self._reconcile_executor, self.scraper.reconcile)
                except Exception:
                    log.exception("reconcile failed")
            # until the first pod list is in and the warm-up collection done, look
            # often: readiness waits on it
            await asyncio.sleep(self.reconcile_seconds if self._warm() else 0.05)

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, args)

    def _timed(self, fn, args):
        self._busy_since = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._busy_since = None

    def stuck_seconds(self) -> float:
        """How long the worker's current job has run (0 when idle)."""
        since = self._busy_since
        return time.monotonic() - since if since is not None else 0.0

    async def _shared_debug(self, kind: str, fn):
        """Run `fn` on the worker, shared by every request for `kind` that
        arrives while it runs."""
        fut = self._debug.get(kind)
        if fut is None:
            fut = asyncio.ensure_future(self._in_worker(fn))
            self._debug[kind] = fut
            fut.add_done_callback(lambda _done: self._debug.pop(kind, None))
        return await asyncio.shield(fut)

    async def _scrape(self, want: str) -> Answer:
        if self._inflight is None:
            return await asyncio.shield(self._start_collection({want}))
        self._next_wants.add(want)
        if self._next is None:          # the running one started before we arrived
            self._next = asyncio.ensure_future(self._after(self._inflight))
        return await asyncio.shield(self._next)

    def _start_collection(self, wants: set[str]) -> asyncio.Future:
        fut = asyncio.ensure_future(self._in_worker(self._collect, frozenset(wants)))
        self._inflight = fut
        fut.add_done_callback(self._clear_inflight)
        # The collection's garbage is freed: give its pages back when there are
        # enough of them, on the worker after the answer is on its way
        # (collector/memory.py; RSS ~60 MiB instead of 62-65 when trimming began)
        fut.add_done_callback(lambda _: self._executor.submit(self._trim))
        return fut

    def _collect(self, wants: frozenset[str]) -> Answer:
        """One collection, in the encodings its waiting requests asked for.
        For gzip (as Prometheus asks) each family's text is deflated on the
        gzip thread, outside the GIL, as soon as it is rendered, while the next
        sources run; unless a plain request waits too, the text is let go once
        deflated."""
        if "gzip" not in wants:
            return Answer(self.scraper.scrape_parts())
        stream = GzipStream(self._gzip_executor)
        try:
            parts = self.scraper.scrape_parts(stream.feed, keep="plain" in wants)
        finally:
            zipped = stream.finish()        # also on failure: the gzip thread waits for it
        return Answer(parts, zipped)

    async def _after(self, running: asyncio.Future) -> Answer:
        await asyncio.wait([running])
        self._next, wants, self._next_wants = None, self._next_wants, set()
        return await self._start_collection(wants)

    def _clear_inflight(self, fut) -> None:
        if self._inflight is fut:
            self._inflight = None

    async def metrics(self, request: web.Request) -> web.Response:
        gzip = "gzip" in request.headers.get("Accept-Encoding", "")
        # every request waiting for a collection says what it wants before the
        # collection starts (_scrape, _after): the answer has it
        answer = await self._scrape("gzip" if gzip else "plain")
        headers = {"Content-Type": CONTENT_TYPE}
        if gzip:
            assert answer.gzipped is not None
            headers["Content-Encoding"] = "gzip"
            return web.Response(body=answer.gzipped, headers=headers)
        return web.Response(body=ExpositionPayload(answer.parts), headers=headers)

    async def landing(self, request):
        return web.Response(text=LANDING, content_type="text/html")

    async def healthz(self, request):
        stuck = self.stuck_seconds()
        if stuck > self.max_scrape_seconds:
            log.error("a collection has run for %.0f s (limit %.0f s): reporting unhealthy",
                      stuck, self.max_scrape_seconds)
            return web.Response(status=503, text=f"a collection has run for {stuck:.0f} s "
                                f"(limit {self.max_scrape_seconds:.0f} s)\n")
        return web.Response(text="ok\n")

    async def readyz(self, request):
        if not self.scraper.store.ready:
            return web.Response(status=503, text="waiting for the first pod list\n")
        if not self._warm():
            return web.Response(status=503, text="waiting for the first complete collection\n")
        return web.Response(text="ready\n")

    async def debug_attachments(self, request):
        body = await self._shared_debug("attachments", self._attachments_body)
        return web.Response(body=body, content_type="application/json")

    def _attachments_body(self) -> bytes:
        snapshot = self.scraper.snapshot()
        body = {"node": self.scraper.store.node_name, "ready": self.scraper.store.ready,
                "pods": [describe_pod(v) for v in snapshot.pods],
                "findings": self._findings(snapshot)}
        return json.dumps(body, indent=2, sort_keys=True).encode()

    def _findings(self, snapshot: Snapshot) -> list:
        out = []
        for source in self.scraper.sources.values():
            explain = getattr(source, "findings", None)
            if explain:
                out.extend(explain(snapshot))
        return out

    async def debug_asymmetric(self, request):
        try:
            limit = max(1, min(int(request.query.get("limit", "50")), MAX_FLOWS))
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be a number\n") from None
        if self.asymmetric_flows is None:
            return web.json_response({"available": False, "flows": []})
        # One shared job for every limit: the largest, sliced per request.
        flows = await self._shared_debug("asymmetric", lambda: self.asymmetric_flows(MAX_FLOWS))
        return web.json_response({"available": True, "flows": flows[:limit]},
                                 dumps=lambda o: json.dumps(o, indent=2, sort_keys=True))

    async def _cleanup(self, app) -> None:
        if self._reconciler:
            self._reconciler.cancel()
        # A cold start's pass attaches to every interface (~30 s at 1 000): ask it
        # to stop between two attaches, or SIGTERM would wait for all of them
        stop = getattr(self.scraper, "stop", None)
        if stop is not None:
            stop()
        await asyncio.get_running_loop().run_in_executor(None, self._reconcile_executor.shutdown, True)
        await self._in_worker(self.scraper.close)
        self._executor.shutdown(wait=True)
        self._gzip_executor.shutdown(wait=True)


class ExpositionPayload(payload.Payload):
    """exporters/exposition.py's pieces as a response body, written one after the
    other as the socket drains: no joined copy of the ~3 MB body, nor one in
    the transport. aiohttp writes it in finish_response, so the listener's write
    timeout (exporters/listener.py) bounds it like any body, and HEAD gets the
    length alone."""

    def __init__(self, parts: list[bytes]):
        super().__init__(parts, content_type=CONTENT_TYPE)
        self._size = sum(map(len, parts))

    async def write(self, writer) -> None:
        # aiohttp keeps the answered Response (and so this payload) alive for a
        # while: drop the pieces once written, or ~3 MB stay resident between
        # scrapes (RSS 56.7 -> 59.4 MiB at 1 000 interfaces)
        parts, self._value = self._value, ()
        for part in parts:
            await writer.write(part)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._value).decode(encoding, errors)


@dataclass
class Answer:
    """One collection's exposition: its pieces when a request waiting for it
    asked for it plain, its gzip member when one asked for gzip."""
    parts: list[bytes]
    gzipped: bytes | None = None


def describe_pod(view: PodView) -> dict:
    pod = view.pod
    return {
        "namespace": pod.namespace, "pod": pod.name, "uid": pod.uid, "phase": pod.phase,
        "terminating": pod.terminating, "netns": view.netns_path, "netns_inode": view.netns_inode,
        "resolved_by": view.resolved_by, "missing_networks": list(pod.missing),
        "annotation_errors": list(pod.errors),
        "attachments": [{
            "network": iv.attachment.network, "interface": iv.interface, "plane": iv.attachment.plane,
            "default": iv.attachment.default, "mac": iv.attachment.mac, "ips": list(iv.attachment.ips),
            "gateway": list(iv.attachment.gateway), "mtu": iv.attachment.mtu,
            "device_info": {k: v for k, v in asdict(iv.attachment.device).items() if v},
            "ifindex": iv.link.ifindex if iv.link else None,
            "found_in_netns": iv.link is not None,
        } for iv in view.interfaces],
    }
