"""Hostile tenants seen through the Kubernetes API and through `planewatch inspect`
(issue 13, Medium 7 and 8): a fake API server on 127.0.0.1 that closes every
watch at once, answers every watch with 410, or serves NADs with megabyte
configs; a fake collector whose annotation text carries terminal escapes.
Each test counts what reached the fake and what the collector refused.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest
from kubernetes import client

from collector.discovery import Store
from collector.kube import MAX_NAD_CONFIG_CHARS, NAD_PAGE, Backoff, KubeFeed
from collector.kubeclient import Credentials, KubeClient
from exporters.exposition import render
from tests.conftest import REPO, parse_metrics, series, wait_for

NODE = "hostile-node"
NAD_PATH = "/apis/k8s.cni.cncf.io/v1/network-attachment-definitions"


class FakeAPI:
    """A Kubernetes API stand-in. `watch_mode`: "close" (200, empty body, at
    once), "gone" (one ERROR 410 event), "hold" (keeps the watch open)."""

    def __init__(self, watch_mode: str = "hold", nads: list[dict] | None = None):
        self.watch_mode = watch_mode
        self.nads = nads or []
        self.requests: list[tuple[str, dict]] = []       # (path, query)
        self.held: Counter[str] = Counter()               # watches held open, by path
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                with api.lock:
                    api.requests.append((url.path, query))
                if query.get("watch") in ("true", "True", "1"):
                    return api.watch(self)
                if url.path == NAD_PATH:
                    return api.send(self, api.nad_page(query))
                return api.send(self, {"kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": []})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def send(self, handler, body: dict | bytes, status: int = 200) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def watch(self, handler) -> None:
        if self.watch_mode == "close":
            return self.send(handler, b"")
        if self.watch_mode == "gone":
            event = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
            return self.send(handler, json.dumps(event).encode() + b"\n")
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        path = urllib.parse.urlsplit(handler.path).path
        with self.lock:
            self.held[path] += 1
        try:
            self.stopping.wait(30)
        finally:
            with self.lock:
                self.held[path] -= 1

    def nad_page(self, query: dict) -> dict:
        limit = int(query.get("limit", len(self.nads) or 1))
        start = int(query.get("continue", "0") or 0)
        page = self.nads[start:start + limit]
        more = start + limit < len(self.nads)
        return {"kind": "NetworkAttachmentDefinitionList",
                "metadata": {"resourceVersion": "9", **({"continue": str(start + limit)} if more else {})},
                "items": page}

    def count(self, path: str, watch: bool) -> int:
        with self.lock:
            return sum(1 for p, q in self.requests if p == path and (q.get("watch") is not None) == watch)

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


# "own": collector/kubeclient.py, what `serve` uses; "official": the kubernetes
# package's ApiClient, which KubeFeed still accepts (and cluster mode uses).
CLIENTS = ["own", "official"]


# The watches' backoff, scaled down from Backoff()'s 0.5 s first step: the same
# doubling schedule (each step drawn from [half, full]), a quarter of the wait.
BACKOFF_FIRST = 0.125


def _run_source(api: FakeAPI, kind: str = "own", watch_nads: bool = True, seconds: float | None = None,
                until: Callable[[KubeFeed], bool] | None = None) -> tuple[KubeFeed, Store]:
    """Run the feed against `api` for `seconds`, or until `until(feed)` holds."""
    if kind == "own":
        api_client = KubeClient(Credentials(f"http://127.0.0.1:{api.port}", None))
    else:
        config = client.Configuration()
        config.host = f"http://127.0.0.1:{api.port}"
        api_client = client.ApiClient(config)
    store = Store(NODE)
    source = KubeFeed(store, api_client, NODE, watch_nads=watch_nads,
                      backoff=functools.partial(Backoff, first=BACKOFF_FIRST))
    source.start()
    try:
        if until is not None:
            wait_for(lambda: until(source), timeout=30, interval=0.05, what="the feed's condition")
        else:
            assert seconds is not None
            time.sleep(seconds)
    finally:
        source.stop()
    return source, store


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("mode", ["close", "gone"])
def test_an_api_that_ends_every_watch_at_once_gets_backoff_not_a_storm(mode, kind):
    """"close": 200 and an empty body for every WATCH (drew 220 000 requests in
    one second); "gone": every watch answered 410, so every round relists."""
    api = FakeAPI(watch_mode=mode)
    window = 8 * BACKOFF_FIRST
    try:
        source, _ = _run_source(api, kind=kind, seconds=window)
        pods = "/api/v1/pods"
        watches, lists = api.count(pods, watch=True), api.count(pods, watch=False)
    finally:
        api.close()
    # backoff steps of 1/4-1/2, 1/2-1, 1-2, 2-4 x first (1/4 of Backoff()'s, as is
    # the window): at most ~6 rounds in 8 x first
    assert 2 <= watches <= 8, f"{watches} watches in {window} s"
    if mode == "gone":
        assert lists == watches or lists == watches + 1, (lists, watches)
    else:
        assert lists == 1
    parsed = parse_metrics(render(source.families()).decode())
    restarts = series(parsed, "planewatch_kube_watch_restarts_total", resource="pods",
                      reason="closed_early" if mode == "close" else "gone").popitem()[1]
    assert restarts >= watches - 1
    assert series(parsed, "planewatch_kube_requests_total", resource="pods", verb="watch").popitem()[1] == watches


def _nad(namespace: str, name: str, config: str) -> dict:
    return {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"namespace": namespace, "name": name, "resourceVersion": "3"},
            "spec": {"config": config}}


@pytest.mark.parametrize("kind", CLIENTS)
def test_nad_lists_are_paged_small_and_huge_configs_dropped(kind):
    """A tenant's namespace full of megabyte NADs: listed a few at a time, the
    oversized configs dropped on arrival and reported, the honest NADs intact."""
    honest = json.dumps({"cniVersion": "0.4.0", "type": "macvlan", "master": "eth1",
                         "ipam": {"type": "whereabouts"}})
    huge = json.dumps({"cniVersion": "0.4.0", "type": "macvlan", "pad": "x" * (1 << 20)})
    nads = [_nad("tenant", f"big-{i}", huge) for i in range(30)]
    nads += [_nad("honest", f"net-{i}", honest) for i in range(15)]
    api = FakeAPI(nads=nads)
    try:
        # until both resources are listed and the NAD watch that follows is held open:
        # from then on nothing is requested until the stop
        source, store = _run_source(api, kind=kind, until=lambda feed: all(w.relists for w in feed.watches)
                                    and api.held[NAD_PATH] > 0)
        with api.lock:
            limits = [int(q["limit"]) for p, q in api.requests if p == NAD_PATH and "watch" not in q]
    finally:
        api.close()
    assert limits and max(limits) <= NAD_PAGE <= 20
    assert len(limits) == -(-len(nads) // NAD_PAGE)          # every page fetched once
    networks = store.view().networks
    assert len(networks) == 45
    assert {networks[f"tenant/big-{i}"].config_error for i in range(30)} == {"too_large"}
    assert all(networks[f"honest/net-{i}"].cni_type == "macvlan" and not networks[f"honest/net-{i}"].config_error
               for i in range(15))
    parsed = parse_metrics(render(source.families()).decode())
    assert series(parsed, "planewatch_kube_objects_trimmed_total",
                  resource="network-attachment-definitions").popitem()[1] == 30
    assert len(huge) > MAX_NAD_CONFIG_CHARS > len(honest)


# ---------------------------------------------------------------- planewatch inspect

ESCAPES = "\x1b]0;owned\x07\x1b[2J\r\u202e"


class FakeCollector:
    """Serves /metrics and /debug/attachments with a tenant's escape sequences
    in label values and findings."""

    def __init__(self):
        metrics = (
            "# TYPE planewatch_pod_interface_info gauge\n"
            f'planewatch_pod_interface_info{{namespace="evil",pod="p{ESCAPES}",interface="net1",'
            f'network="evil/n{ESCAPES}",plane="data{ESCAPES}",ips="10.9.0.1"}} 1\n'
        ).encode()
        debug = json.dumps({"findings": [{"namespace": "evil", "pod": f"p{ESCAPES}", "interface": "net1",
                                          "sentence": f"annotation says {ESCAPES}"}]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = metrics if self.path == "/metrics" else debug
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _inspect(url: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "exporters", "inspect", "--url", url,
                          "--interval", "0.1", *args], cwd=REPO, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode()


def test_inspect_never_prints_a_tenants_control_characters():
    fake = FakeCollector()
    try:
        table = _inspect(fake.url)
        as_json = _inspect(fake.url, "-o", "json")
    finally:
        fake.close()
    assert "evil/p" in table and "annotation says" in table
    bad = [c for c in table if (ord(c) < 0x20 and c != "\n") or 0x7f <= ord(c) < 0xa0 or c == "\u202e"]
    assert not bad, sorted(set(bad))
    assert "\\x1b]0;owned\\x07" in table
    assert as_json.isascii()
    rows = json.loads(as_json)
    assert rows[0]["pod"] == f"p{ESCAPES}" and rows[0]["findings"] == [f"annotation says {ESCAPES}"]


# The last round is a watch that ends within seconds: it backs off too (one wait).
@pytest.mark.parametrize("rounds, waits", [
    # an outage, then the 410 of the expired resourceVersion: the resuming relist goes at once
    (["error", "error", "gone", "ok"], 3),
    # a 410 storm with no outage before it backs off on every round
    (["gone", "gone", "gone", "ok"], 4),
    # an outage whose resume draws a 410 twice: only the first is free
    (["error", "gone", "gone", "ok"], 3),
])
def test_a_410_right_after_an_outage_relists_at_once_but_a_410_storm_backs_off(rounds, waits):
    from collector.kube import Gone, ListWatch

    class CountingBackoff:
        def __init__(self):
            self.calls = 0

        def next(self) -> float:
            self.calls += 1
            return 0.0

        def reset(self) -> None:
            pass

    stop = threading.Event()
    backoff = CountingBackoff()
    lw = ListWatch("pods", call=None, on_replace=None, on_upsert=None, on_delete=None, stop=stop, backoff=backoff)
    script = iter(rounds)

    def one_round():
        step = next(script)
        if step == "error":
            raise ConnectionRefusedError("API down")
        if step == "gone":
            raise Gone()
        stop.set()                        # a round that worked: the script is over
    lw.list = lambda: None
    lw.watch = one_round
    lw.run()
    assert backoff.calls == waits
