"""exporters/webconfig.py: parsing tables, then a real aiohttp server on 127.0.0.1.

Certificates are made with openssl in a temporary directory, with explicit
RFC 5280 profiles (a strict verifier accepts them): a CA, a server certificate for
IP:127.0.0.1, client certificates from that CA (two different SANs), one from a
stranger CA, one from an intermediate, and one from a legacy-profile CA.
"""
from __future__ import annotations

import asyncio
import base64
import os
import ssl
import subprocess

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from exporters.webconfig import (
    BasicAuthChecker,
    WebConfig,
    WebConfigError,
    load_web_config,
    parse_authorization,
    parse_tokens,
    parse_web_config,
    token_matches,
)

PASSWORD = "s3cret-scrape"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
TOKEN = "tok-0123456789abcdef"


# ---------------------------------------------------------------- certificates

def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


# Proper RFC 5280 profiles, written out rather than left to the machine's
# openssl.cnf: Python >= 3.13 clients verify strictly (VERIFY_X509_STRICT: a CA
# needs keyUsage and a critical basicConstraints, a leaf an AKI), and so do the
# tests' clients on every Python (_client_ctx).
CA_EXT = """basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
INTERMEDIATE_EXT = CA_EXT.replace("CA:TRUE", "CA:TRUE,pathlen:0")
# What a hand-rolled CA often is: no keyUsage, basicConstraints not critical. Go's
# crypto/x509 (Prometheus, exporter-toolkit) trusts it; strict OpenSSL does not.
LEGACY_CA_EXT = "basicConstraints = CA:TRUE\n"
LEAF_EXT = """basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}
extendedKeyUsage = {usage}
"""


def _make_cert(d: str, name: str, issuer: str | None, extensions: str) -> None:
    """name.key + name.crt with exactly `extensions`, signed by issuer (self when None)."""
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write("[ext]\n" + extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    signer = (["-signkey", f"{name}.key"] if issuer is None else
              ["-CA", f"{issuer}.crt", "-CAkey", f"{issuer}.key", "-CAcreateserial"])
    _openssl("x509", "-req", "-in", f"{name}.csr", *signer, "-out", f"{name}.crt", "-days", "2",
             "-extfile", f"{name}.ext", "-extensions", "ext", cwd=d)


def _make_ca(d: str, name: str, issuer: str | None = None, extensions: str = CA_EXT) -> None:
    _make_cert(d, name, issuer, extensions)


def _make_leaf(d: str, name: str, ca: str, san: str, usage: str) -> None:
    _make_cert(d, name, ca, LEAF_EXT.format(san=san, usage=usage))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("pki"))
    _make_ca(d, "ca")
    _make_ca(d, "stranger")
    _make_leaf(d, "server", "ca", "IP:127.0.0.1,DNS:localhost", "serverAuth")
    _make_leaf(d, "client", "ca", "DNS:prometheus.monitoring.svc", "clientAuth")
    _make_leaf(d, "other-client", "ca", "DNS:someone-else", "clientAuth")
    _make_leaf(d, "stranger-client", "stranger", "DNS:prometheus.monitoring.svc", "clientAuth")
    # an issuing intermediate under ca, and a legacy-profile CA (LEGACY_CA_EXT)
    _make_ca(d, "issuing", issuer="ca", extensions=INTERMEDIATE_EXT)
    _make_leaf(d, "issued-client", "issuing", "DNS:prometheus.monitoring.svc", "clientAuth")
    _make_ca(d, "legacy", extensions=LEGACY_CA_EXT)
    _make_leaf(d, "legacy-client", "legacy", "DNS:prometheus.monitoring.svc", "clientAuth")
    return d


def _write_config(d: str, text: str, name: str = "web.yml") -> str:
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------- parsing tables

GOOD_TLS = {"cert_file": "s.crt", "key_file": "s.key"}


@pytest.mark.parametrize("doc, message", [
    ("nope", "top level must be a mapping"),
    ({"tls_config": {}}, "tls_config: unknown key"),
    ({"http_server_config": {"http2": False}}, "not supported by planewatch"),
    ({"tls_server_config": {**GOOD_TLS, "cipher_suites": ["TLS_AES_128_GCM_SHA256"]}},
     "cipher_suites: not supported"),
    ({"tls_server_config": {**GOOD_TLS, "certfile": "x"}}, "certfile: unknown key"),
    ({"tls_server_config": {"cert_file": "s.crt"}}, "key_file is missing"),
    ({"tls_server_config": {**GOOD_TLS, "client_auth_type": "RequireAnyClientCert"}},
     "cannot require a client certificate without verifying"),
    ({"tls_server_config": {**GOOD_TLS, "client_auth_type": "Always"}}, "'Always' is invalid"),
    ({"tls_server_config": {**GOOD_TLS, "client_auth_type": "RequireAndVerifyClientCert"}},
     "needs client_ca_file"),
    ({"tls_server_config": {**GOOD_TLS, "client_ca_file": "ca.crt"}},
     "never verifies client certificates"),
    ({"tls_server_config": {**GOOD_TLS, "client_allowed_sans": ["a"]}},
     "needs a verifying client_auth_type"),
    ({"tls_server_config": {**GOOD_TLS, "min_version": "TLS1.2"}}, "'TLS1.2' is invalid"),
    ({"basic_auth_users": {"prom": "plain-password"}}, "basic_auth_users.prom: not a bcrypt hash"),
    ({"basic_auth_users": {"prom": HASH[:-1]}}, "not a bcrypt hash"),
    ({"basic_auth_users": {"a:b": HASH}}, "bad user name"),
    ({"basic_auth_users": ["prom"]}, "must be a mapping"),
    ({"bearer_token_file": ["x"]}, "bearer_token_file must be a path"),
])
def test_parse_refuses(doc, message):
    with pytest.raises(WebConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_web_config(doc, "/etc/planewatch")


def test_parse_resolves_relative_paths_and_defaults():
    tls, users, token_file = parse_web_config({
        "tls_server_config": {"cert_file": "tls.crt", "key_file": "/abs/tls.key",
                              "client_auth_type": "VerifyClientCertIfGiven",
                              "client_ca_file": "ca.crt"},
        "basic_auth_users": {"prom": HASH},
        "bearer_token_file": "token",
    }, "/etc/pw")
    assert tls["cert_file"] == "/etc/pw/tls.crt"
    assert tls["key_file"] == "/abs/tls.key"
    assert tls["client_ca_file"] == "/etc/pw/ca.crt"
    assert tls["min_version"] == "TLS12"
    assert users == {"prom": HASH.encode()}
    assert token_file == "/etc/pw/token"


@pytest.mark.parametrize("doc", [None, {}, {"tls_server_config": {}},
                                 {"tls_server_config": {"cert_file": "", "key_file": ""}}])
def test_parse_empty_means_plain_http_without_auth(doc):
    assert parse_web_config(doc, "/x") == ({}, {}, "")


@pytest.mark.parametrize("header, expected", [
    ("Basic " + base64.b64encode(b"prom:pa:ss").decode(), ("basic", ("prom", "pa:ss"))),
    ("basic " + base64.b64encode(b"prom:").decode(), ("basic", ("prom", ""))),
    ("Basic " + base64.b64encode(b"no-colon").decode(), None),
    ("Basic !!notbase64", None),
    ("Bearer abc", ("bearer", b"abc")),
    ("Bearer ", None),
    ("Digest x", None),
    ("", None),
])
def test_parse_authorization(header, expected):
    assert parse_authorization(header) == expected


def test_tokens_one_per_line_and_compared_whole():
    tokens = parse_tokens("  old-token \n\nnew-token\n")
    assert tokens == (b"old-token", b"new-token")
    assert token_matches(b"new-token", tokens)
    assert not token_matches(b"new-toke", tokens)
    assert not token_matches(b"new-token2", tokens)


# ---------------------------------------------------------------- loading files

def test_load_reports_missing_file(tmp_path):
    with pytest.raises(WebConfigError, match="No such file"):
        load_web_config(str(tmp_path / "absent.yml"))


def test_load_reports_bad_yaml(tmp_path):
    with pytest.raises(WebConfigError, match="not valid YAML"):
        load_web_config(_write_config(str(tmp_path), "basic_auth_users: [unclosed\n"))


def test_load_reports_missing_cert_file(tmp_path, pki):
    path = _write_config(str(tmp_path), f"tls_server_config:\n  cert_file: nope.crt\n"
                                        f"  key_file: {pki}/server.key\n")
    with pytest.raises(WebConfigError, match=r"cert_file .*nope\.crt: no such file"):
        load_web_config(path)


def test_load_reports_key_not_matching_cert(tmp_path, pki):
    path = _write_config(str(tmp_path), f"tls_server_config:\n  cert_file: {pki}/server.crt\n"
                                        f"  key_file: {pki}/client.key\n")
    with pytest.raises(WebConfigError, match="key does not match certificate"):
        load_web_config(path)


def test_load_reports_empty_token_file(tmp_path):
    _write_config(str(tmp_path), "\n\n", name="token")
    with pytest.raises(WebConfigError, match="holds no token"):
        load_web_config(_write_config(str(tmp_path), "bearer_token_file: token\n"))


def test_load_error_names_the_file(tmp_path):
    path = _write_config(str(tmp_path), "basic_auth_users:\n  prom: plain\n")
    with pytest.raises(WebConfigError) as e:
        load_web_config(path)
    assert str(e.value).startswith(path + ": basic_auth_users.prom")


def test_load_plain_config(tmp_path):
    _write_config(str(tmp_path), TOKEN + "\n", name="token")
    config = load_web_config(_write_config(
        str(tmp_path), f"basic_auth_users:\n  prom: '{HASH}'\nbearer_token_file: token\n"))
    assert config.ssl_context() is None
    assert config.auth_required
    assert config.middleware is config.middleware       # one bcrypt cache per config
    assert config.bearer_tokens == (TOKEN.encode(),)


# ---------------------------------------------------------------- bcrypt cache

def test_successful_checks_are_cached_and_failures_are_not(monkeypatch):
    """Counted bcrypt checks, not timings: a cached success runs none; every wrong
    password, an unknown user (against a decoy: no user enumeration by timing) and an
    expired success run one each."""
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4))
    now = [1000.0]
    checker = BasicAuthChecker({"prom": hashed}, ttl=60, clock=lambda: now[0])
    real, calls = bcrypt.checkpw, []

    def counted(secret, against):
        calls.append(against)
        return real(secret, against)
    monkeypatch.setattr(bcrypt, "checkpw", counted)

    async def checks(user, password):
        before = len(calls)
        ok = await checker.check(user, password)
        return ok, calls[before:]

    async def scenario():
        first = await checks("prom", "pw")
        cached = await checks("prom", "pw")
        wrong = [await checks("prom", "bad") for _ in range(2)]
        ghost = await checks("ghost", "pw")
        now[0] += 61
        expired = await checks("prom", "pw")
        return first, cached, wrong, ghost, expired

    first, cached, wrong, ghost, expired = asyncio.run(scenario())
    assert first == (True, [hashed]) and expired == (True, [hashed])
    assert cached == (True, [])
    assert wrong == [(False, [hashed])] * 2
    assert ghost == (False, [hashed])     # the decoy is a real user's hash: the same bcrypt cost


# ---------------------------------------------------------------- a real server

async def _hello(request):
    return web.Response(text="ok " + request.path)


async def _serve_and_get(config: WebConfig, requests: list[dict]) -> list:
    """Start an app with the config's middleware and TLS, run each request.

    Each request dict: path, headers, ssl (client context or None). Returns the
    (status, headers) of each, or the exception class name if the connection failed.
    """
    app = web.Application(middlewares=[config.middleware])
    for path in ("/metrics", "/healthz", "/readyz", "/debug/attachments"):
        app.router.add_get(path, _hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=config.ssl_context())
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    scheme = "https" if config.ssl_context() else "http"
    results = []
    try:
        for req in requests:
            results.append(await _one_request(f"{scheme}://127.0.0.1:{port}", req))
    finally:
        await runner.cleanup()
    return results


async def _one_request(base: str, req: dict):
    connector = aiohttp.TCPConnector(ssl=req.get("ssl", False), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            async with session.get(base + req.get("path", "/metrics"),
                                   headers=req.get("headers", {})) as resp:
                await resp.read()
                return resp.status, resp.headers
        except aiohttp.ClientError as e:
            return type(e).__name__


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _client_ctx(pki: str, cert: str | None = None, ca: str = "ca") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=os.path.join(pki, f"{ca}.crt"))
    # Python 3.13's default, on every Python: the test PKI must pass a strict client.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if cert:
        ctx.load_cert_chain(os.path.join(pki, f"{cert}.crt"), os.path.join(pki, f"{cert}.key"))
    return ctx


def test_basic_auth_over_plain_http(tmp_path):
    _write_config(str(tmp_path), TOKEN + "\n", name="token")
    config = load_web_config(_write_config(
        str(tmp_path), f"basic_auth_users:\n  prom: '{HASH}'\nbearer_token_file: token\n"))
    got = asyncio.run(_serve_and_get(config, [
        {},
        {"headers": _basic("prom", PASSWORD)},
        {"headers": _basic("prom", PASSWORD + "x")},
        {"headers": _basic("root", PASSWORD)},
        {"headers": {"Authorization": f"Bearer {TOKEN}"}},
        {"headers": {"Authorization": f"Bearer {TOKEN}x"}},
        {"path": "/healthz"},
        {"path": "/readyz"},
        {"path": "/debug/attachments"},
    ]))
    statuses = [status for status, _ in got]
    assert statuses == [401, 200, 401, 401, 200, 401, 200, 200, 401]
    challenges = got[0][1].getall("WWW-Authenticate")
    assert any(c.startswith("Basic") for c in challenges)
    assert any(c.startswith("Bearer") for c in challenges)


def test_no_config_lets_everything_through():
    got = asyncio.run(_serve_and_get(WebConfig(), [{}, {"path": "/debug/attachments"}]))
    assert [status for status, _ in got] == [200, 200]


def test_tls_with_basic_auth(tmp_path, pki):
    config = load_web_config(_write_config(str(tmp_path), f"""
tls_server_config:
  cert_file: {pki}/server.crt
  key_file: {pki}/server.key
basic_auth_users:
  prom: '{HASH}'
"""))
    assert config.ssl_context() is not None
    got = asyncio.run(_serve_and_get(config, [
        {"ssl": _client_ctx(pki)},
        {"ssl": _client_ctx(pki), "headers": _basic("prom", PASSWORD)},
        {"ssl": _client_ctx(pki), "headers": _basic("prom", "nope")},
        {"ssl": _client_ctx(pki, ca="stranger"), "headers": _basic("prom", PASSWORD)},
    ]))
    assert got[0][0] == 401 and got[0][1]["WWW-Authenticate"].startswith("Basic")
    assert got[1][0] == 200
    assert got[2][0] == 401
    assert got[3] == "ClientConnectorCertificateError"   # client does not trust the server


def test_client_certificate_required(tmp_path, pki):
    config = load_web_config(_write_config(str(tmp_path), f"""
tls_server_config:
  cert_file: {pki}/server.crt
  key_file: {pki}/server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {pki}/ca.crt
  client_allowed_sans: [prometheus.monitoring.svc]
"""))
    got = asyncio.run(_serve_and_get(config, [
        {"ssl": _client_ctx(pki, "client")},
        {"ssl": _client_ctx(pki)},
        {"ssl": _client_ctx(pki, "stranger-client")},
        {"ssl": _client_ctx(pki, "other-client")},
        {"ssl": _client_ctx(pki, "other-client"), "path": "/healthz"},
    ]))
    assert got[0][0] == 200
    # TLS 1.3: the server's refusal arrives after the client's handshake ends,
    # as a failed read/connection rather than a handshake error on the client.
    assert isinstance(got[1], str) and isinstance(got[2], str), got
    assert got[3][0] == 403 and got[4][0] == 403


def test_client_certificate_if_given(tmp_path, pki):
    config = load_web_config(_write_config(str(tmp_path), f"""
tls_server_config:
  cert_file: {pki}/server.crt
  key_file: {pki}/server.key
  client_auth_type: VerifyClientCertIfGiven
  client_ca_file: {pki}/ca.crt
"""))
    got = asyncio.run(_serve_and_get(config, [
        {"ssl": _client_ctx(pki)},
        {"ssl": _client_ctx(pki, "client")},
        {"ssl": _client_ctx(pki, "stranger-client")},
    ]))
    assert got[0][0] == 200 and got[1][0] == 200
    assert isinstance(got[2], str), got


def test_client_ca_file_is_trusted_as_go_trusts_it(tmp_path, pki):
    """Client certificates are judged as exporter-toolkit (Go crypto/x509) judges them,
    whatever Python's defaults: every certificate in client_ca_file is a trust anchor,
    an intermediate included, and a CA without keyUsage still issues clients."""
    def serve(client_ca: str, requests: list[dict]) -> list:
        with open(tmp_path / f"{client_ca}-bundle.crt", "w") as out:
            for name in client_ca.split("+"):
                with open(os.path.join(pki, f"{name}.crt")) as f:
                    out.write(f.read())
        config = load_web_config(_write_config(str(tmp_path), f"""
tls_server_config:
  cert_file: {pki}/server.crt
  key_file: {pki}/server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {tmp_path}/{client_ca}-bundle.crt
"""))
        return asyncio.run(_serve_and_get(config, requests))

    only_issuing = serve("issuing", [
        {"ssl": _client_ctx(pki, "issued-client")},
        {"ssl": _client_ctx(pki, "client")},           # ca issued it: ca is not trusted here
    ])
    assert only_issuing[0][0] == 200, only_issuing
    assert isinstance(only_issuing[1], str), only_issuing
    legacy = serve("legacy+ca", [
        {"ssl": _client_ctx(pki, "legacy-client")},
        {"ssl": _client_ctx(pki, "client")},
        {"ssl": _client_ctx(pki, "stranger-client")},
    ])
    assert legacy[0][0] == 200 and legacy[1][0] == 200, legacy
    assert isinstance(legacy[2], str), legacy


def test_test_pki_passes_strict_verification(pki):
    """The PKI above is a proper one: what a strict verifier (Python >= 3.13's default)
    accepts, except the CA deliberately made the legacy way."""
    store = ssl.create_default_context(cafile=os.path.join(pki, "ca.crt"))
    store.verify_flags |= ssl.VERIFY_X509_STRICT
    assert store.verify_flags & ssl.VERIFY_X509_STRICT
    for name in ("ca", "stranger", "issuing", "server", "client", "issued-client"):
        text = subprocess.run(["openssl", "x509", "-in", os.path.join(pki, f"{name}.crt"), "-noout",
                               "-ext", "basicConstraints,keyUsage,subjectKeyIdentifier,"
                               "authorityKeyIdentifier"], capture_output=True, text=True,
                              check=True).stdout
        assert "Basic Constraints: critical" in text and "Key Usage: critical" in text, (name, text)
        assert "Subject Key Identifier" in text and "Authority Key Identifier" in text, (name, text)
    strict = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", os.path.join(pki, "ca.crt"),
                             "-untrusted", os.path.join(pki, "issuing.crt"),
                             *(os.path.join(pki, f"{n}.crt") for n in ("server", "client", "issued-client"))],
                            capture_output=True, text=True)
    assert strict.returncode == 0, strict.stdout + strict.stderr
    legacy = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", os.path.join(pki, "legacy.crt"),
                             os.path.join(pki, "legacy-client.crt")], capture_output=True, text=True)
    assert legacy.returncode != 0, legacy.stdout


def test_min_version_refuses_older_clients(tmp_path, pki):
    config = load_web_config(_write_config(str(tmp_path), f"""
tls_server_config:
  cert_file: {pki}/server.crt
  key_file: {pki}/server.key
  min_version: TLS13
"""))
    old = _client_ctx(pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    got = asyncio.run(_serve_and_get(config, [{"ssl": _client_ctx(pki)}, {"ssl": old}]))
    assert got[0][0] == 200
    assert isinstance(got[1], str), got
