"""Hostile clients of the HTTP face (issue 13): each test performs the attack on
127.0.0.1 against a real `planewatch serve` (or the real Server on a real
socket) and asserts that the collector keeps answering, with the refusal
visible on /metrics.

Attacks: unfinished requests, connection floods, huge headers, bcrypt floods,
non-UTF-8 credentials, a client certificate left out, renewed certificates and
tokens, a hung collection, /debug floods. The Kubernetes API and `inspect`
attacks are in tests/test_hostile_kube.py.
"""
from __future__ import annotations

import asyncio
import base64
import http.client
import os
import resource
import select
import socket
import ssl
import subprocess
import threading
import time

import bcrypt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from exporters.http import Server
from exporters.webconfig import WebConfigError, parse_web_config
from tests.conftest import Collector, parse_metrics, series, wait_for
from tests.test_http import PiecesScraper

NO_KERNEL = ("--no-collector.netlink", "--no-collector.ebpf", "--no-collector.routes",
             "--no-collector.sriov")
MIB = 1 << 20


@pytest.fixture
def pods_file(tmp_path) -> str:
    path = tmp_path / "pods.json"
    path.write_text("[]")
    return str(path)


@pytest.fixture
def serve(pods_file):
    started: list[Collector] = []

    def start(*args: str) -> Collector:
        c = Collector("--pods-file", pods_file, "--node-name", "hostile-node", *NO_KERNEL, *args)
        started.append(c)
        return c
    yield start
    for c in started:
        c.stop()


def refused(c: Collector, reason: str, get=None) -> float:
    text = (get or c.metrics)()
    return series(parse_metrics(text), "planewatch_http_refused_total", reason=reason).popitem()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the server closed (EOF or reset), False while it is still open."""
    poller = select.poll()          # not select(): the floods use fds above 1024
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        data = sock.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return True
    if not data:
        return True
    return closed_by_peer(sock)     # a response (a 400) first, then EOF


def get_from(port: int, path: str, source: str = "127.0.0.1", headers: dict | None = None,
             timeout: float = 10) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------- unfinished requests

def test_unfinished_requests_are_closed_after_the_read_timeout(serve):
    """1000 connections each holding half a request header: all closed by the
    server after --web.read-timeout, counted, and /metrics answers meanwhile."""
    raise_nofile(4096)
    c = serve("--web.read-timeout", "2", "--web.max-connections", "1100",
              "--web.max-connections-per-client", "1100")
    c.wait_ready()
    socks, idle = [], []
    try:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", c.port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: planewatch\r\nX-Never-Ends: aaaa")
            socks.append(s)
        # connected but silent (a tcpSocket probe, an idle keep-alive): closed, not counted
        idle = [socket.create_connection(("127.0.0.1", c.port), timeout=5) for _ in range(20)]
        # answered while the attack is held (how fast: bench/hostile_http.py)
        status, _, _ = get_from(c.port, "/metrics")
        assert status == 200
        wait_for(lambda: all(closed_by_peer(s) for s in socks + idle), timeout=20,
                 what="the server closing every unfinished request")
    finally:
        for s in socks + idle:
            s.close()
    assert refused(c, "header_timeout") == 1000


# ---------------------------------------------------------------- connection caps

def test_one_client_cannot_take_every_connection(serve):
    """A pod opening connections until refused leaves room for Prometheus,
    which comes from another address."""
    c = serve("--web.max-connections", "40", "--web.max-connections-per-client", "10",
              "--web.read-timeout", "30")
    c.wait_ready()
    held = []
    try:
        for _ in range(30):
            s = socket.create_connection(("127.0.0.1", c.port), timeout=5)
            held.append(s)
        time.sleep(1.5)         # refused after waiting up to 1 s for a slot
        closed = [s for s in held if closed_by_peer(s)]
        assert len(closed) == 20, f"{len(closed)} of 30 refused, expected 20 over the per-client cap"
        status, _, body = get_from(c.port, "/metrics", source="127.0.0.2")
        assert status == 200
        assert series(parse_metrics(body.decode()), "planewatch_http_refused_total",
                      reason="connection_limit").popitem()[1] >= 20
    finally:
        for s in held:
            s.close()


# ---------------------------------------------------------------- huge headers

def _send_until_refused(sock: socket.socket, payload: bytes) -> None:
    sock.setblocking(False)
    view = memoryview(payload)
    deadline = time.monotonic() + 10
    while view and time.monotonic() < deadline:
        try:
            n = sock.send(view[:65536])
            view = view[n:]
        except BlockingIOError:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            poller.poll(200)
        except (BrokenPipeError, ConnectionResetError):
            return


def test_huge_headers_are_refused_before_they_cost_memory(serve):
    """60 connections each sending 1.6 MB of headers (used to take RSS from 71
    to 140 MiB before any authentication): each gets a 400 and is closed."""
    c = serve("--web.max-connections-per-client", "100", "--web.max-connections", "200")
    c.wait_ready()
    c.metrics()
    before = rss_bytes(c.proc.pid)
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 8000) for i in range(200))
    assert len(headers) > 1_600_000
    socks = []
    try:
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", c.port), timeout=5)
            socks.append(s)
            _send_until_refused(s, b"GET /metrics HTTP/1.1\r\nHost: planewatch\r\n" + headers)
        wait_for(lambda: all(closed_by_peer(s) for s in socks), timeout=20, what="every flood closed")
        grown = rss_bytes(c.proc.pid) - before
    finally:
        for s in socks:
            s.close()
    print(f"\nRSS grew {grown / MIB:.1f} MiB")       # the figure: bench/hostile_http.py
    assert refused(c, "request_too_large") >= 60
    assert "Traceback" not in c.logs()


def test_server_header_names_no_versions(serve):
    c = serve()
    c.wait_ready()
    for path in ("/metrics", "/healthz", "/nowhere"):
        _, headers, _ = get_from(c.port, path)
        assert headers["Server"] == "planewatch", headers
    s = socket.create_connection(("127.0.0.1", c.port), timeout=5)
    s.sendall(b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = s.recv(4096)
    s.close()
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    assert b"\r\nServer: planewatch\r\n" in answer and b"aiohttp" not in answer


# ---------------------------------------------------------------- credentials

PASSWORD = "right-password"


def _basic(user: str, password: str | bytes) -> str:
    raw = password if isinstance(password, bytes) else password.encode()
    return "Basic " + base64.b64encode(user.encode() + b":" + raw).decode()


def _web_config(tmp_path, text: str) -> str:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return str(path)


def _raw_request(port: int, authorization: bytes) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
              + authorization + b"\r\n\r\n")
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out.split(b"\r\n")[0]


def test_hostile_credentials_are_401_not_500(serve, tmp_path):
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    (tmp_path / "token").write_text("the-token\n")
    c = serve("--web.config.file", _web_config(
        tmp_path, f"basic_auth_users:\n  prom: '{hashed}'\nbearer_token_file: token\n"))
    wait_for(c.answering, what="collector up")
    hostile = [
        b"Bearer \xff\xfe\xfd",                                          # not UTF-8
        _basic("prom", b"\xff\xfe-not-utf8").encode(),
        b"Basic \xc3\x28\xa0\xa1",                                      # not base64, not UTF-8
        _basic("prom", "x" * 100).encode(),                             # over bcrypt's 72 bytes
        _basic("\xe9\u202e", PASSWORD).encode("utf-8"),
        b"Bearer " + b"t" * 7000,
    ]
    for value in hostile:
        assert b" 401 " in _raw_request(c.port, value), value
    assert b" 200 " in _raw_request(c.port, _basic("prom", PASSWORD).encode())
    assert b" 200 " in _raw_request(c.port, b"Bearer the-token")
    assert "Traceback" not in c.logs()


def test_bcrypt_flood_is_refused_fast_and_scrapes_continue(serve, tmp_path):
    """60 concurrent wrong passwords against a cost-12 hash: the excess is a
    fast 503, the cached right password still scrapes, /healthz stays quick."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(12)).decode()
    c = serve("--web.config.file", _web_config(tmp_path, f"basic_auth_users:\n  prom: '{hashed}'\n"),
              "--web.max-connections-per-client", "200", "--web.max-connections", "300")
    wait_for(c.answering, what="collector up")
    good = {"Authorization": _basic("prom", PASSWORD)}
    assert get_from(c.port, "/metrics", headers=good, timeout=30)[0] == 200     # now cached
    results: list[tuple[int, float]] = []

    def guess(i: int) -> None:
        started = time.monotonic()
        status, _, _ = get_from(c.port, "/metrics", headers={"Authorization": _basic("prom", f"guess{i}")},
                                timeout=120)
        results.append((status, time.monotonic() - started))
    threads = [threading.Thread(target=guess, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert get_from(c.port, "/healthz", timeout=10)[0] == 200
    assert get_from(c.port, "/metrics", headers=good, timeout=10)[0] == 200
    during = time.monotonic() - started
    for t in threads:
        t.join(timeout=180)
    statuses = sorted({s for s, _ in results})
    assert set(statuses) <= {401, 503}, statuses
    busy = [t for s, t in results if s == 503]
    assert len(busy) >= 30, f"only {len(busy)} of 60 refused as busy"
    # answered, within get_from's deadline; the seconds are figures, not limits
    print(f"\nslowest busy refusal {max(busy):.1f} s; cached scrape during the flood {during:.1f} s")
    text = get_from(c.port, "/metrics", headers=good)[2].decode()
    assert series(parse_metrics(text), "planewatch_http_refused_total", reason="auth_busy").popitem()[1] >= 30


# ---------------------------------------------------------------- TLS

def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


# The extensions RFC 5280 asks for (keyUsage on the CA, key identifiers): Python >= 3.13's
# default client context (VERIFY_X509_STRICT), which these tests' clients use, refuses
# a chain without them.
CA_EXT = ("basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign",
          "subjectKeyIdentifier=hash")


def _ca(d, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
             *(arg for ext in CA_EXT for arg in ("-addext", ext)), cwd=d)


def _leaf(d, name: str, san: str, usage: str = "serverAuth") -> None:
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n"
                                   "keyUsage=critical,digitalSignature\n"
                                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    _ca(d, "ca")
    for name in ("first", "renewed", "other"):
        _leaf(d, name, "IP:127.0.0.1")
    _leaf(d, "client", "DNS:prometheus.monitoring.svc", "clientAuth")
    return d


def _served_cert(port: int, ca: str) -> bytes:
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return s.getpeercert(binary_form=True)


def _der(path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def _replace(src, dst) -> None:
    tmp = dst.with_suffix(".tmp")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)


def _https_metrics(port: int, ca: str, token: str) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=ca)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_renewed_certificate_and_token_are_served_without_restart(serve, tmp_path, pki):
    live = tmp_path / "live"
    live.mkdir()
    for ext in ("crt", "key"):
        _replace(pki / f"first.{ext}", live / f"tls.{ext}")
    (live / "token").write_text("old-token\n")
    c = serve("--web.config.file", _web_config(tmp_path, f"""
tls_server_config:
  cert_file: {live}/tls.crt
  key_file: {live}/tls.key
bearer_token_file: {live}/token
"""))
    ca = str(pki / "ca.crt")
    wait_for(lambda: c.proc.poll() is None and _port_open(c.port), what="collector listening")
    assert _served_cert(c.port, ca) == _der(pki / "first.crt")
    assert _https_metrics(c.port, ca, "old-token")[0] == 200

    # cert-manager renews: key first, then certificate, each replaced atomically
    _replace(pki / "renewed.key", live / "tls.key")
    _replace(pki / "renewed.crt", live / "tls.crt")
    (live / "token.new").write_text("new-token\n")
    os.replace(live / "token.new", live / "token")
    wait_for(lambda: _served_cert(c.port, ca) == _der(pki / "renewed.crt"), timeout=10,
             what="the renewed certificate served")
    wait_for(lambda: _https_metrics(c.port, ca, "new-token")[0] == 200, timeout=10, what="new token")
    assert _https_metrics(c.port, ca, "old-token")[0] == 401

    # a half-finished renewal (certificate without its key) keeps the working pair;
    # the files are re-checked at a handshake at most once a second: until the
    # change is seen and refused (the first failure this process counts)
    _replace(pki / "other.crt", live / "tls.crt")
    failure = frozenset({("file", "certificate"), ("result", "failure")})

    def scraped_after_the_refusal() -> str | None:
        status, text = _https_metrics(c.port, ca, "new-token")
        assert status == 200
        counted = series(parse_metrics(text), "planewatch_web_config_reloads_total", file="certificate")
        return text if counted.get(failure, 0) >= 1 else None
    text = wait_for(scraped_after_the_refusal, timeout=10, what="the half-finished renewal refused")
    assert _served_cert(c.port, ca) == _der(pki / "renewed.crt")
    reloads = series(parse_metrics(text), "planewatch_web_config_reloads_total", file="certificate")
    assert reloads[frozenset({("file", "certificate"), ("result", "success")})] >= 1
    assert reloads[frozenset({("file", "certificate"), ("result", "failure")})] >= 1
    assert series(parse_metrics(text), "planewatch_web_config_last_reload_success",
                  file="certificate").popitem()[1] == 0
    _replace(pki / "other.key", live / "tls.key")
    wait_for(lambda: _served_cert(c.port, ca) == _der(pki / "other.crt"), timeout=10,
             what="the completed renewal served")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_allowed_sans_without_a_required_certificate_refuses_to_start(serve, tmp_path, pki):
    """With VerifyClientCertIfGiven a client that sends no certificate skipped
    the SAN check and got 200: that configuration no longer starts."""
    c = serve("--web.config.file", _web_config(tmp_path, f"""
tls_server_config:
  cert_file: {pki}/first.crt
  key_file: {pki}/first.key
  client_auth_type: VerifyClientCertIfGiven
  client_ca_file: {pki}/ca.crt
  client_allowed_sans: [prometheus.monitoring.svc]
"""))
    assert c.proc.wait(timeout=30) == 2
    assert "client_allowed_sans" in c.logs() and "RequireAndVerifyClientCert" in c.logs()


def test_allowed_sans_refuse_a_request_without_certificate(tmp_path, pki):
    """Defence in depth: a context that lets a certificate-less client through
    (built by hand, bypassing the parser) still gets 403, never 200."""
    from exporters.webconfig import TLSServerConfig, WebConfig, build_ssl_context
    tls = TLSServerConfig(cert_file=str(pki / "first.crt"), key_file=str(pki / "first.key"),
                          client_auth_type="VerifyClientCertIfGiven", client_ca_file=str(pki / "ca.crt"),
                          client_allowed_sans=("prometheus.monitoring.svc",))
    config = WebConfig(tls, {}, (), build_ssl_context(tls))

    async def run():
        from aiohttp import web
        app = web.Application(middlewares=[config.middleware])
        async def secret(request):
            return web.Response(text="secret")
        app.router.add_get("/metrics", secret)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(ssl=config.ssl_context())
        loop = asyncio.get_running_loop()
        ca = str(pki / "ca.crt")

        def fetch(with_cert: bool) -> int:
            ctx = ssl.create_default_context(cafile=ca)
            if with_cert:
                ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
            conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
            conn.request("GET", "/metrics")
            return conn.getresponse().status
        try:
            return (await loop.run_in_executor(None, fetch, False),
                    await loop.run_in_executor(None, fetch, True))
        finally:
            await server.close()
    without, with_cert = asyncio.run(run())
    assert without == 403 and with_cert == 200


def test_silent_tls_clients_are_dropped_after_the_handshake_timeout(pki):
    """Connections that never send a ClientHello (or stop half-way) hold a slot
    only until the handshake timeout, and count as tls_handshake refusals."""
    from aiohttp import web

    from exporters.httpstats import Refusals
    from exporters.listener import GuardedListener, Limits
    from exporters.webconfig import TLSServerConfig, build_ssl_context
    context = build_ssl_context(TLSServerConfig(cert_file=str(pki / "first.crt"),
                                                key_file=str(pki / "first.key")))

    async def run():
        async def ok(request):
            return web.Response(text="ok")
        app = web.Application()
        app.router.add_get("/healthz", ok)
        runner = web.AppRunner(app)
        await runner.setup()
        refusals = Refusals()
        listener = GuardedListener(runner.server, "127.0.0.1", 0, context,
                                   Limits(handshake_timeout=1.0, max_connections=100, max_per_client=100),
                                   refusals=refusals)
        await listener.start()
        loop = asyncio.get_running_loop()
        try:
            silent = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(40)]
            for s in silent[:20]:
                s.sendall(b"\x16\x03\x01\x02\x00\x01")       # the start of a ClientHello, no more
            await asyncio.sleep(0.3)
            during = listener.active
            ca = str(pki / "ca.crt")
            status = await loop.run_in_executor(None, _https_status, listener.port, ca)
            await asyncio.sleep(1.5)
            closed = sum(closed_by_peer(s) for s in silent)
            for s in silent:
                s.close()
            return during, status, closed, listener.active, refusals.count("tls_handshake")
        finally:
            await listener.stop()
            await runner.cleanup()
    during, status, closed, after, counted = asyncio.run(run())
    assert during == 40
    assert status == 200            # an honest client still gets in meanwhile
    assert closed == 40 and after == 0
    assert counted == 40


@pytest.mark.parametrize("app_kind", ["one body", "planewatch pieces"])
def test_a_client_that_never_reads_its_response_is_cut_off(app_kind):
    """Ten clients ask for a 24 MB /metrics and never read: each would keep its
    slot and a copy of the body in the transport's buffer forever. Both for a
    plain aiohttp body and for planewatch's /metrics, which writes the
    exposition's pieces as the socket drains (the write timeout must bound
    that too)."""
    from aiohttp import web

    from exporters.httpstats import Refusals
    from exporters.listener import GuardedListener, Limits

    body = b"planewatch_padding 1\n" * (24 * MIB // 21)

    async def run():
        if app_kind == "one body":
            async def metrics(request):
                return web.Response(body=body)
            app = web.Application()
            app.router.add_get("/metrics", metrics)
        else:
            app = Server(PiecesScraper([body[i:i + MIB] for i in range(0, len(body), MIB)]),
                         reconcile_seconds=3600).app
        runner = web.AppRunner(app)
        await runner.setup()
        refusals = Refusals()
        listener = GuardedListener(runner.server, "127.0.0.1", 0, None,
                                   Limits(write_timeout=1.0), refusals=refusals)
        await listener.start()
        loop = asyncio.get_running_loop()
        try:
            readers = []
            for _ in range(10):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", listener.port))
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                readers.append(s)
            # every slot taken (the ten are accepted and answering) before the honest reader
            for _ in range(100):
                if listener.active == 10:
                    break
                await asyncio.sleep(0.05)
            during = listener.active
            honest = await loop.run_in_executor(None, lambda: len(get_from(listener.port, "/metrics")[2]))
            # the write timeout is 1 s; the deadline only keeps a broken cut-off from hanging
            closed: set[int] = set()
            for _ in range(200):
                closed |= {i for i, s in enumerate(readers) if i not in closed and closed_by_peer(s)}
                if listener.active == 0 and len(closed) == len(readers):
                    break
                await asyncio.sleep(0.05)
            after, cut = listener.active, len(closed)
            for s in readers:
                s.close()
            return during, honest, after, cut, refusals.count("write_timeout")
        finally:
            await listener.stop()
            await runner.cleanup()
    during, honest, after, cut, counted = asyncio.run(run())
    assert during == 10
    assert honest == len(body)          # a reader that reads gets all of it meanwhile
    assert after == 0 and cut == 10
    assert counted == 10


def _https_status(port: int, ca: str) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                       context=ssl.create_default_context(cafile=ca))
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize("tls, message", [
    ({"client_auth_type": "VerifyClientCertIfGiven", "client_ca_file": "ca.crt",
      "client_allowed_sans": ["a"]}, "RequireAndVerifyClientCert"),
    ({"min_version": "TLS13", "max_version": "TLS12"}, "above max_version"),
])
def test_web_config_refuses(tls, message):
    with pytest.raises(WebConfigError, match=message):
        parse_web_config({"tls_server_config": {"cert_file": "c", "key_file": "k", **tls}}, "/")


# ---------------------------------------------------------------- hung collections, /debug floods

class HangingScraper:
    """A scraper whose collection can be made to hang, as on a FIFO or a dead NFS path."""

    def __init__(self, snapshot_seconds: float = 0.0):
        self.release = threading.Event()
        self.release.set()
        self.snapshot_seconds = snapshot_seconds
        self.snapshots = 0
        self.collections = 0
        self.store = type("S", (), {"ready": True, "node_name": "n"})()
        self.sources = {}

    def scrape_parts(self, sink=None, keep=True) -> list[bytes]:
        self.collections += 1
        self.release.wait()
        time.sleep(0.05)
        if sink is not None:
            sink([b"planewatch_test 1\n"])
        return [b"planewatch_test 1\n"]

    def snapshot(self):
        self.snapshots += 1
        time.sleep(self.snapshot_seconds)
        return type("Snap", (), {"pods": ()})()

    def reconcile(self):
        pass

    def close(self):
        self.release.set()


def test_a_hung_collection_fails_healthz_until_it_ends():
    async def run():
        scraper = HangingScraper()
        server = Server(scraper, reconcile_seconds=3600, max_scrape_seconds=1.0)
        async with TestClient(TestServer(server.app)) as client:
            assert (await client.get("/healthz")).status == 200
            scraper.release.clear()
            stuck = asyncio.ensure_future(client.get("/metrics"))
            await asyncio.sleep(0.3)
            early = await client.get("/healthz")
            await asyncio.sleep(1.2)
            late = await client.get("/healthz")
            late_text = await late.text()
            scraper.release.set()
            assert (await stuck).status == 200
            after = await client.get("/healthz")
            return early.status, late.status, late_text, after.status
    early, late, text, after = asyncio.run(run())
    assert early == 200
    assert late == 503 and "limit 1 s" in text
    assert after == 200


def test_debug_flood_does_not_delay_scrapes():
    """300 concurrent /debug/attachments used to queue 600 jobs ahead of the
    next collection (a scrape went from 0.17 s to 5.2 s)."""
    async def run():
        scraper = HangingScraper(snapshot_seconds=0.05)
        server = Server(scraper, reconcile_seconds=3600)
        async with TestClient(TestServer(server.app)) as client:
            async def debug():
                resp = await client.get("/debug/attachments")
                return resp.status
            flood = [asyncio.ensure_future(debug()) for _ in range(300)]
            await asyncio.sleep(0.1)
            started = time.monotonic()
            resp = await client.get("/metrics")
            took = time.monotonic() - started
            statuses = await asyncio.gather(*flood)
            return resp.status, took, statuses, scraper.snapshots
    status, took, statuses, snapshots = asyncio.run(run())
    assert status == 200
    assert set(statuses) == {200}
    assert snapshots <= 5, f"{snapshots} snapshots for 300 requests"
    print(f"\nthe scrape took {took:.2f} s behind the /debug flood")   # coalesced: `snapshots` above
