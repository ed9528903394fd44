"""exporters/metrics.py's Scraper streaming its exposition source by source
(what the gzip stream deflates while the next sources run), and the HTTP
answer built on it."""
from __future__ import annotations

import asyncio
import gzip
import logging

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from collector.discovery import Store
from collector.family import GAUGE, Family
from collector.netns import Resolver
from exporters.http import Server
from exporters.metrics import Scraper


class FakeSource:
    def __init__(self, name: str, log: list, families: dict[str, list[tuple[str, float]]]):
        self.name, self.log, self.families = name, log, families

    def collect(self, snapshot):
        self.log.append(("collect", self.name))
        out = []
        for fam_name, series in self.families.items():
            fam = Family(fam_name, GAUGE, f"{fam_name} help.", ("v",))
            for label, value in series:
                fam.add((label,), value)
            out.append(fam)
        return out


def scraper(tmp_path, sources: dict) -> Scraper:
    return Scraper(Store("node-a"), Resolver(str(tmp_path), "/proc"), sources, "test")


def parsed(body: bytes) -> dict:
    return {(f.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def test_each_sources_families_reach_the_sink_before_the_next_source_runs(tmp_path):
    log: list = []
    sources = {"a": FakeSource("a", log, {"planewatch_test_a": [("1", 1)]}),
               "b": FakeSource("b", log, {"planewatch_test_b": [("2", 2)], "planewatch_test_b2": [("3", 3)]})}
    seen: list[bytes] = []

    def sink(pieces):
        seen.extend(pieces)
        log.append(("sink", b"".join(pieces).split(b"\n")[0].decode()))
    parts = scraper(tmp_path, sources).scrape_parts(sink)
    assert b"".join(seen) == b"".join(parts)
    steps = [step for step in log if step[0] == "collect" or "planewatch_test_" in step[1]]
    assert steps == [("collect", "a"), ("sink", "# HELP planewatch_test_a planewatch_test_a help."),
                     ("collect", "b"), ("sink", "# HELP planewatch_test_b planewatch_test_b help."),
                     ("sink", "# HELP planewatch_test_b2 planewatch_test_b2 help.")]
    got = parsed(b"".join(parts))
    assert got[("planewatch_test_b2", (("v", "3"),))] == 3
    assert got[("planewatch_scrape_collector_success", (("collector", "b"),))] == 1


def test_a_source_repeating_another_sources_family_is_left_out_and_failed(tmp_path, caplog):
    log: list = []
    sources = {"a": FakeSource("a", log, {"planewatch_test_x": [("from-a", 1)]}),
               "b": FakeSource("b", log, {"planewatch_test_y": [("from-b", 2)],
                                          "planewatch_test_x": [("from-b", 3)]})}
    s = scraper(tmp_path, sources)
    with caplog.at_level(logging.ERROR, logger="exporters.metrics"):
        first = parsed(s.scrape())
        again = parsed(s.scrape())
    for got in (first, again):
        assert got[("planewatch_test_x", (("v", "from-a"),))] == 1
        assert ("planewatch_test_x", (("v", "from-b"),)) not in got
        assert ("planewatch_test_y", (("v", "from-b"),)) not in got
        assert got[("planewatch_scrape_collector_success", (("collector", "a"),))] == 1
        assert got[("planewatch_scrape_collector_success", (("collector", "b"),))] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "collector b" in errors[0] and "planewatch_test_x" in errors[0]


def test_gzip_and_plain_answers_from_the_real_scraper(tmp_path):
    log: list = []
    sources = {"a": FakeSource("a", log, {"planewatch_test_a": [(str(i), i) for i in range(5000)]}),
               "b": FakeSource("b", log, {"planewatch_test_b": [("x", 1)]})}

    async def run():
        server = Server(scraper(tmp_path, sources), reconcile_seconds=3600)
        async with TestClient(TestServer(server.app)) as client:
            zipped = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
            zipped_body = await zipped.read()
            plain = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
            return zipped.headers.get("Content-Encoding"), zipped_body, plain.headers, await plain.read()
    encoding, zipped_body, plain_headers, plain_body = asyncio.run(run())
    assert encoding == "gzip" and "Content-Encoding" not in plain_headers
    unzipped = parsed(gzip.decompress(zipped_body))
    plain = parsed(plain_body)
    assert unzipped[("planewatch_test_a", (("v", "4999"),))] == 4999
    durations = {k for k in unzipped if k[0] == "planewatch_scrape_collector_duration_seconds"}
    assert {k: v for k, v in unzipped.items() if k not in durations} == \
        {k: v for k, v in plain.items() if k not in durations}


def test_a_body_only_asked_for_gzip_is_not_kept(tmp_path):
    """Prometheus asks for gzip: the server has the scraper stream into the
    gzip thread without keeping the pieces (each is let go once deflated); a
    plain request waiting for the same collection makes it keep them."""
    log: list = []
    sources = {"a": FakeSource("a", log, {"planewatch_test_a": [(str(i), i) for i in range(3000)]})}
    real = scraper(tmp_path, sources)
    seen: list[bytes] = []
    assert real.scrape_parts(seen.extend, keep=False) == []
    assert b"planewatch_test_a{v=\"2999\"} 2999\n" in b"".join(seen)
    kept: list = []

    class Watching:
        store, sources = real.store, real.sources

        def scrape_parts(self, sink=None, keep=True):
            parts = real.scrape_parts(sink, keep)
            kept.append((keep, len(parts)))
            return parts

        def reconcile(self):
            pass

        def close(self):
            pass

    async def run():
        server = Server(Watching(), reconcile_seconds=3600)
        async with TestClient(TestServer(server.app)) as client:
            resp = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
            return await resp.read()
    body = gzip.decompress(asyncio.run(run()))
    assert kept == [(False, 0)]
    assert parsed(body)[("planewatch_test_a", (("v", "2999"),))] == 2999
