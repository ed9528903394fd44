"""One scrape: store view → resolved pods → every enabled source → families.

Each source runs under a wrapper that times it and reports
`planewatch_scrape_collector_success{collector}` (node_exporter `execute`);
a failing source never fails the scrape. Scrapes are serialised: the netns
pool and the BPF maps are read by one thread at a time.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Mapping, Sequence

from collector.discovery import Store
from collector.family import GAUGE, Family
from collector.netns import Resolver
from collector.registry import NoData, Snapshot, Source
from exporters.exposition import Stream

log = logging.getLogger(__name__)


def health_families(results: list[tuple[str, bool, float]], version: str) -> list[Family]:
    """`planewatch_scrape_collector_{success,duration_seconds}` for (collector, ok,
    seconds) results, and `planewatch_build_info`: the same in every planewatch server."""
    success = Family("planewatch_scrape_collector_success", GAUGE,
                     "1 when the collector's source succeeded in this scrape.", ("collector",))
    duration = Family("planewatch_scrape_collector_duration_seconds", GAUGE,
                      "Time the collector's source took in this scrape.", ("collector",))
    for name, ok, seconds in results:
        success.add((name,), 1 if ok else 0)
        duration.add((name,), seconds)
    build = Family("planewatch_build_info", GAUGE, "planewatch version (value 1).", ("version",))
    build.add((version,), 1)
    return [success, duration, build]


class Scraper:
    def __init__(self, store: Store, resolver: Resolver, sources: Mapping[str, Source], version: str):
        self.store = store
        self.resolver = resolver
        self.sources = dict(sources)
        self.version = version
        self._lock = threading.Lock()
        self._failures_logged: set[str | tuple[str, str]] = set()      # name, or ("clash", name)
        # Families about planewatch itself from outside the sources (HTTP refusals,
        # the API watch): each callable is asked at every scrape.
        self.extra: list[Callable[[], Iterable[Family]]] = []
        # One complete collection and one reconcile pass (BPF attached) have run
        # since the pods were listed: /readyz waits for them, so the first scrape
        # Prometheus makes finds every namespace opened, link tables read, route
        # analyses cached and every interface's BPF counters there.
        self.warm = False

    def snapshot(self) -> Snapshot:
        view = self.store.view()
        pods = self.resolver.resolve(list(view.pods))
        plane_map = self.store.plane_map
        networks = view.networks
        return Snapshot(
            pods=tuple(pods), networks=networks, netns=self.resolver.pool,
            annotation_errors=view.annotation_errors,
            budget_cuts=view.budget_cuts or {}, budgets=self.store.budgets,
            plane_for_network=lambda key: plane_map.plane_for(
                key, default=False, nad_plane=networks[key].plane if key in networks else ""))

    def collect(self, stream: Stream | None = None) -> tuple[list[Family], Snapshot]:
        """Every source's families, and the snapshot they read. With a `stream`,
        each source's families go into it as soon as the source is done (and
        are not returned): its sink works on them while the next sources run."""
        with self._lock:
            started = time.perf_counter()
            families: list[Family] = []
            snapshot = self.snapshot()
            results = [("discovery", True, time.perf_counter() - started)]
            prefetched = self._prefetch(snapshot)
            for name, source in self.sources.items():
                t0 = time.perf_counter()
                ok = self._run(name, source, snapshot, families)
                took = time.perf_counter() - t0 + prefetched.get(name, 0.0)
                if ok and stream is not None:
                    ok = self._streamed(stream, name, families)
                    families = []
                results.append((name, ok, took))
            for producer in self.extra:
                families.extend(producer())
            families += health_families(results, self.version)
            if stream is not None:
                self._streamed(stream, "scrape", families)
                families = []
            return families, snapshot

    def _streamed(self, stream: Stream, name: str, families: list[Family]) -> bool:
        """Hand `name`'s families to the stream; a family another collector
        already rendered would be said twice, and Prometheus rejects a scrape
        with a family name twice: the batch is left out and the collector
        counts as failed (a bug: every family name belongs to one source)."""
        clash = stream.add(families)
        if clash and ("clash", name) not in self._failures_logged:
            self._failures_logged.add(("clash", name))
            log.error("collector %s: left out, it renders families another collector did: %s",
                      name, ", ".join(clash))
        return not clash

    def _prefetch(self, snapshot: Snapshot) -> dict[str, float]:
        """Let sources start kernel reads that run without the GIL (the netlink
        counters' round trips) before the sources run one after the other; a
        failure here leaves the reading to the source's collect(). The seconds
        each took, which count as its source's."""
        took = {}
        for name, source in self.sources.items():
            prefetch = getattr(source, "prefetch", None)
            if prefetch is not None:
                t0 = time.perf_counter()
                try:
                    prefetch(snapshot)
                except Exception as err:
                    log.debug("collector %s: prefetch failed: %s", name, err)
                took[name] = time.perf_counter() - t0
        return took

    def _run(self, name: str, source: Source, snapshot: Snapshot, out: list[Family]) -> bool:
        try:
            families = list(source.collect(snapshot) or ())
        except NoData:
            return True
        except Exception as err:
            # Log a failing source once (with its traceback) and then at debug.
            if name not in self._failures_logged:
                log.exception("collector %s failed", name)
                self._failures_logged.add(name)
            else:
                log.debug("collector %s failed: %s", name, err)
            return False
        self._failures_logged.discard(name)
        out.extend(families)
        return True

    def reconcile(self) -> None:
        """Let sources that keep kernel state (BPF attachments) follow the pods.
        The first time, run the warm-up collection first and count as warm only
        once this first pass is done: the first scrape after readiness then has
        every series, BPF counters included. Runs on its own thread: the scrape
        lock is held only for the snapshot, not for the (slow) attaching."""
        first = not self.warm
        try:
            if first:
                self.collect()      # nothing to render: nobody asked
            self._reconcile()
        finally:            # a failing pass is /healthz's and the logs' business
            self.warm = True

    def _reconcile(self) -> None:
        hooks = [(n, s.reconcile) for n, s in self.sources.items() if hasattr(s, "reconcile")]
        if not hooks:
            return
        with self._lock:
            snapshot = self.snapshot()
        for name, reconcile in hooks:
            try:
                reconcile(snapshot)
            except Exception:
                log.exception("reconciling collector %s", name)

    def stop(self) -> None:
        """Shutdown comes next: sources with a long pass running (BPF attaching)
        end it at the next step."""
        for source in self.sources.values():
            stop = getattr(source, "stop", None)
            if stop is not None:
                stop()

    def scrape(self) -> bytes:
        return b"".join(self.scrape_parts())

    def scrape_parts(self, sink: Callable[[Sequence[bytes]], None] | None = None,
                     keep: bool = True) -> list[bytes]:
        """The exposition as exporters/exposition.py's pieces (the HTTP server
        writes them without joining them into one more copy). `sink` gets each
        family's pieces as soon as they are rendered (the gzip stream deflates
        them on its own thread while the next sources run); with `keep` False
        only the sink has them (nothing is returned): a body nobody asked for
        plain is never whole in memory."""
        stream = Stream(sink, keep)
        self.collect(stream)
        return stream.parts

    def close(self) -> None:
        with self._lock:
            for name, source in self.sources.items():
                close = getattr(source, "close", None)
                if close:
                    try:
                        close()
                    except Exception:
                        log.exception("closing collector %s", name)
            self.resolver.close()
