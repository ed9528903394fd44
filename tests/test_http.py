"""The HTTP layer alone (no kernel): concurrent scrapes share collections, and
every answer is read after its request arrived."""
from __future__ import annotations

import asyncio
import threading
import time

from aiohttp.test_utils import TestClient, TestServer

from exporters.http import Server


def streamed(parts: list[bytes], sink) -> list[bytes]:
    """What a scraper does with the sink the server gives it (a gzip request's
    stream): every piece goes through it, in order."""
    if sink is not None:
        for i in range(0, len(parts), 2):
            sink(parts[i:i + 2])
    return parts


class SlowScraper:
    """Counts collections; each takes 0.3 s and reports when it started."""

    def __init__(self):
        self.started: list[float] = []
        self.lock = threading.Lock()
        self.store = type("S", (), {"ready": True, "node_name": "n"})()
        self.sources = {}

    def scrape_parts(self, sink=None, keep=True) -> list[bytes]:
        with self.lock:
            self.started.append(time.monotonic())
            n = len(self.started)
        time.sleep(0.3)
        return streamed([b"planewatch_test_collection ", b"%d\n" % n], sink)

    def reconcile(self):
        pass

    def close(self):
        pass


class PiecesScraper(SlowScraper):
    """Serves `parts` as the exposition's pieces (Server writes them one by one)."""

    def __init__(self, parts: list[bytes]):
        super().__init__()
        self.parts = parts

    def scrape_parts(self, sink=None, keep=True) -> list[bytes]:
        return streamed(self.parts, sink)


def test_requests_during_a_collection_share_the_next_one():
    async def run():
        scraper = SlowScraper()
        server = Server(scraper, reconcile_seconds=3600)
        async with TestClient(TestServer(server.app)) as client:
            async def get(delay):
                await asyncio.sleep(delay)
                arrived = time.monotonic()
                resp = await client.get("/metrics")
                return arrived, int((await resp.text()).split()[-1])
            results = await asyncio.gather(get(0), *(get(0.1) for _ in range(20)), get(0.35))
        return scraper, results
    scraper, results = asyncio.run(run())
    first, *middle, late = results
    assert first[1] == 1
    # 20 requests that arrived while #1 ran all got #2, started after they arrived
    assert {n for _, n in middle} == {2}
    assert all(scraper.started[1] >= arrived for arrived, _ in middle)
    # one arriving while #2 runs gets #3; three collections for 22 requests
    assert late[1] == 3 and len(scraper.started) == 3
    assert scraper.started[2] >= late[0]


def test_ready_only_after_a_complete_collection_following_the_pod_list():
    """/readyz: 503 before the pod list, 503 until the warm-up collection has run
    (made by the server itself: not-ready pods are not scraped), then 200."""
    from collector.discovery import Store
    from exporters.metrics import Scraper

    class Resolver:
        pool = None
        collected_at: list[float] = []

        def resolve(self, pods):
            time.sleep(0.5)             # opening every pod netns, cold
            self.collected_at.append(time.monotonic())
            return []

        def close(self):
            pass

    async def run():
        store = Store("n")
        store.expect("feed")
        scraper = Scraper(store, Resolver(), {}, "test")
        server = Server(scraper, reconcile_seconds=3600)
        seen = []
        async with TestClient(TestServer(server.app)) as client:
            async def status():
                resp = await client.get("/readyz")
                return resp.status, await resp.text()
            seen.append(await status())
            store.mark_ready("feed")
            listed = time.monotonic()
            while (got := await status())[0] != 200:
                seen.append(got)
                await asyncio.sleep(0.02)
            ready_at = time.monotonic()
        return seen, listed, ready_at, Resolver.collected_at
    seen, listed, ready_at, collected = asyncio.run(run())
    assert seen[0] == (503, "waiting for the first pod list\n")
    assert (503, "waiting for the first complete collection\n") in seen[1:]
    assert len(collected) == 1 and listed < collected[0] <= ready_at


def test_the_body_is_the_pieces_in_order_plain_or_gzip():
    """/metrics writes the exposition's pieces one after the other: the client
    reads exactly their concatenation, with its Content-Length; gzip (what
    Prometheus asks for) decompresses to the same bytes. Pieces big enough that
    the writer has to wait for the socket between them."""
    import gzip
    import random

    rng = random.Random(16)
    parts = [bytes(rng.choice(b"abcdefgh{}=,\n ") for _ in range(rng.choice((0, 17, 70_000, 400_000))))
             for _ in range(24)]

    async def run():
        server = Server(PiecesScraper(parts), reconcile_seconds=3600)
        async with TestClient(TestServer(server.app)) as client:
            plain = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
            plain_body = await plain.read()
            zipped = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
            zipped_body = await zipped.read()
        return plain, plain_body, zipped, zipped_body
    plain, plain_body, zipped, zipped_body = asyncio.run(run())
    want = b"".join(parts)
    assert len(want) > 2_000_000
    assert plain.status == 200 and plain_body == want
    assert int(plain.headers["Content-Length"]) == len(want)
    assert plain.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert zipped.headers["Content-Encoding"] == "gzip" and gzip.decompress(zipped_body) == want
    assert len(zipped_body) < len(want)


def test_shutdown_ends_a_running_reconcile_pass():
    """A cold start's reconcile pass attaches BPF to every interface, ~30 s at
    1 000: on shutdown the server asks it to stop at the next step instead of
    waiting for all of them (a pod's termination grace period is 30 s)."""
    class Attaching(SlowScraper):
        def __init__(self):
            super().__init__()
            self.stopped = threading.Event()
            self.running = threading.Event()
            self.attached = 0

        def reconcile(self):
            self.running.set()
            while not self.stopped.is_set() and self.attached < 300:
                time.sleep(0.1)             # one TCX attach
                self.attached += 1

        def stop(self):
            self.stopped.set()

    scraper = Attaching()

    async def run():
        server = Server(scraper, reconcile_seconds=3600)
        async with TestClient(TestServer(server.app)):
            while not scraper.running.is_set():
                await asyncio.sleep(0.05)
            started = time.monotonic()
        return time.monotonic() - started
    took = asyncio.run(run())
    assert scraper.stopped.is_set() and scraper.attached < 30, scraper.attached
    assert took < 3, took


def test_head_has_the_length_and_no_body_and_a_client_may_leave_mid_body(caplog):
    """HEAD answers the headers alone (a body after them would be read as the
    next response on a kept-alive connection); a scraper that gives up half-way
    through a big body (its scrape timeout) costs no error and no later scrape."""
    parts = [b"x" * 300_000 + b"\n" for _ in range(10)]

    async def run():
        server = Server(PiecesScraper(parts), reconcile_seconds=3600)
        async with TestClient(TestServer(server.app)) as client:
            head = await client.head("/metrics", headers={"Accept-Encoding": "identity"})
            head_body = await head.read()
            after = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
            after_body = await after.read()
            reader, writer = await asyncio.open_connection(client.host, client.port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await reader.readexactly(1000)
            writer.transport.abort()            # gone, with ~3 MB unsent
            await asyncio.sleep(0.5)
            last = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
            last_body = await last.read()
        return head, head_body, after_body, last_body
    with caplog.at_level("DEBUG"):
        head, head_body, after_body, last_body = asyncio.run(run())
    want = b"".join(parts)
    assert head.status == 200 and head_body == b"" and int(head.headers["Content-Length"]) == len(want)
    assert after_body == want and last_body == want
    assert not [r for r in caplog.records if r.levelno >= 40], [r.getMessage() for r in caplog.records]


def test_the_pieces_are_let_go_once_written():
    """The body (~3 MB at 1 000 interfaces) must not outlive its answer: aiohttp
    keeps an answered response around (until the cyclic GC, or the connection's
    next request), and a body held with it stayed resident between scrapes
    (RSS +2.7 MiB). The GC is off while looking, so only plain references count."""
    import gc
    import weakref

    class Pieces(list):
        pass
    made: list = []

    class Scraper(SlowScraper):
        def scrape_parts(self, sink=None, keep=True) -> list[bytes]:
            parts = Pieces([b"x" * 200_000 + b"\n" for _ in range(5)])
            made.append(weakref.ref(parts))
            return streamed(parts, sink)

    async def run():
        server = Server(Scraper(), reconcile_seconds=3600)
        async with TestClient(TestServer(server.app)) as client:
            resp = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
            body = await resp.read()
            await asyncio.sleep(0.2)
            return len(body), made[0]() is None
    gc.disable()
    try:
        length, released = asyncio.run(run())
    finally:
        gc.enable()
    assert length == 5 * 200_001 and released


def test_a_collection_streams_gzip_when_any_request_waiting_for_it_asked():
    """Requests arriving during a plain collection share the next one; one of
    them asking for gzip makes that one stream into the gzip thread, and the
    plain requests sharing it still get the plain body."""
    import gzip

    class Recording(SlowScraper):
        def __init__(self):
            super().__init__()
            self.sinks: list[bool] = []

        def scrape_parts(self, sink=None, keep=True):
            self.sinks.append((sink is not None, keep))
            return super().scrape_parts(sink, keep)

    async def run():
        scraper = Recording()
        server = Server(scraper, reconcile_seconds=3600)
        async with TestClient(TestServer(server.app)) as client:
            async def get(delay, encoding):
                await asyncio.sleep(delay)
                resp = await client.get("/metrics", headers={"Accept-Encoding": encoding}, auto_decompress=False)
                return resp.headers.get("Content-Encoding"), await resp.read()
            answers = await asyncio.gather(get(0, "identity"), get(0.1, "identity"), get(0.1, "gzip"),
                                           get(0.15, "identity"))
        return scraper.sinks, answers
    sinks, answers = asyncio.run(run())
    assert sinks == [(False, True), (True, True)]
    (e0, b0), (e1, b1), (e2, b2), (e3, b3) = answers
    assert (e0, e1, e3) == (None, None, None) and e2 == "gzip"
    assert b0 == b"planewatch_test_collection 1\n"
    assert b1 == b3 == gzip.decompress(b2) == b"planewatch_test_collection 2\n"
