"""`--web.config.file`: TLS and authentication for /metrics, exporter-toolkit style.

The file is the YAML every Prometheus exporter reads (prometheus/exporter-toolkit
`web/tls_config.go`), so operators can reuse what they already have:

    tls_server_config:
      cert_file: tls.crt            # relative paths are relative to this file
      key_file: tls.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
      client_allowed_sans: [prometheus.monitoring.svc]
      min_version: TLS12
    basic_auth_users:
      prometheus: $2b$10$...        # bcrypt hash, e.g. `htpasswd -nBC 10 prometheus`
    bearer_token_file: token        # planewatch extension, see below

`bearer_token_file` is planewatch's own addition (not in exporter-toolkit): a file
holding one or more tokens, one per line; `Authorization: Bearer <token>` is
accepted when it matches any of them (several lines allow rotation without a
gap). When both basic auth users and tokens are configured, either one admits.

Differences from exporter-toolkit, all refused with a clear message at start
rather than silently weakened: `RequireAnyClientCert` (Python's ssl cannot ask
for a certificate without verifying it), Go cipher suite / curve names, inline
`cert`/`key`, and `http_server_config`. `RequestClientCert` is accepted and
behaves as NoClientCert: Go does not verify that certificate either, so it
never grants anything. Verifying modes need `client_ca_file` (Go would fall
back to the system roots; a monitoring endpoint should not trust every public CA).

`client_allowed_sans` needs RequireAndVerifyClientCert (exporter-toolkit refuses
it with the other modes too: a client that sends no certificate has no SAN to
check). The certificate and key, and the bearer token file, are re-read when
they change (CertificateReloader, webauth.TokenFile); the file itself is read
once. Checking requests lives in exporters/webauth.py.

/healthz and /readyz are left open on purpose: kubelet probes can neither send
a password without writing it into the pod spec nor present a client cert.
They return only ok/not-ready; /metrics and /debug/* always need credentials
when any are configured.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Mapping

import yaml

from exporters.httpstats import REFUSALS
# Re-exported: the request checks live in webauth, the file format here.
from exporters.webauth import (  # noqa: F401
    UNAUTHENTICATED_PATHS, BasicAuthChecker, TokenFile, cert_sans, make_middleware,
    parse_authorization, parse_tokens, token_matches,
)

log = logging.getLogger(__name__)

# Certificate and key files are stat'ed at most this often (at a TLS handshake)
# to notice a renewal, as exporter-toolkit re-reads them for every connection.
CERT_RECHECK_SECONDS = 1.0

# Go's tls.ClientAuthType names → what Python's ssl can do.
CLIENT_AUTH_MODES = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNSUPPORTED_CLIENT_AUTH = {
    "RequireAnyClientCert": "Python's ssl cannot require a client certificate "
    "without verifying it; use RequireAndVerifyClientCert with client_ca_file",
}
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

TOP_KEYS = {"tls_server_config", "basic_auth_users", "bearer_token_file"}
TLS_KEYS = {
    "cert_file", "key_file", "client_ca_file", "client_auth_type",
    "min_version", "max_version", "client_allowed_sans",
    "prefer_server_cipher_suites",
}
# Keys exporter-toolkit knows that planewatch refuses, and why.
NOT_IMPLEMENTED = {
    "http_server_config": "planewatch serves HTTP/1.1 only and sets no extra headers",
    "rate_limit": "not implemented",
    "cipher_suites": "Go cipher suite names have no safe mapping to OpenSSL's; "
    "Python's defaults apply",
    "curve_preferences": "Go curve names are not mapped; OpenSSL's defaults apply",
    "cert": "inline certificates are not supported; use cert_file",
    "key": "inline keys are not supported; use key_file",
    "client_ca": "inline CAs are not supported; use client_ca_file",
}

# $2a$/$2b$/$2y$, two-digit cost, 22 salt + 31 hash characters.
BCRYPT_HASH = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")


class WebConfigError(ValueError):
    """The web config file cannot be used; the message says what and where."""


@dataclass(frozen=True)
class TLSServerConfig:
    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str = ""
    min_version: str = "TLS12"
    max_version: str = ""
    client_allowed_sans: tuple[str, ...] = ()


@dataclass(frozen=True)
class WebConfig:
    """Parsed web config. `WebConfig()` means plain HTTP and no authentication."""

    tls: TLSServerConfig | None = None
    basic_auth_users: Mapping[str, bytes] = field(default_factory=dict)
    bearer_tokens: tuple[bytes, ...] = ()
    _context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    bearer_token_file: str = ""

    @property
    def auth_required(self) -> bool:
        return bool(self.basic_auth_users or self.bearer_tokens)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server context (built and checked at load), or None for plain HTTP."""
        return self._context

    @functools.cached_property
    def middleware(self):
        """aiohttp middleware enforcing client SANs, basic auth and bearer tokens.

        One per config (cached): its bcrypt cache, worker threads and token file
        watch are shared by every request."""
        sans = set(self.tls.client_allowed_sans) if self.tls else set()
        return make_middleware(self.basic_auth_users,
                               TokenFile(self.bearer_token_file, self.bearer_tokens), sans)


# ---------------------------------------------------------------- parsing (pure)

def parse_web_config(doc: object, base_dir: str) -> tuple[dict, dict, str]:
    """Check the YAML structure; return (tls settings, users, token file path).

    Pure: no file is opened here. Paths come back resolved against `base_dir`.
    """
    if doc is None:
        return {}, {}, ""
    if not isinstance(doc, dict):
        raise WebConfigError("top level must be a mapping")
    _refuse_keys(doc, TOP_KEYS, "")
    tls = _parse_tls(doc.get("tls_server_config"), base_dir)
    users = _parse_users(doc.get("basic_auth_users"))
    token_file = doc.get("bearer_token_file") or ""
    if not isinstance(token_file, str):
        raise WebConfigError("bearer_token_file must be a path")
    return tls, users, _resolve(token_file, base_dir)


def _refuse_keys(section: dict, allowed: set, where: str) -> None:
    for key in section:
        if key in allowed:
            continue
        if key in NOT_IMPLEMENTED:
            raise WebConfigError(f"{where}{key}: not supported by planewatch: "
                                 f"{NOT_IMPLEMENTED[key]}")
        raise WebConfigError(f"{where}{key}: unknown key (known: {', '.join(sorted(allowed))})")


def _resolve(path: str, base_dir: str) -> str:
    return path if not path or os.path.isabs(path) else os.path.join(base_dir, path)


def _parse_tls(section: object, base_dir: str) -> dict:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise WebConfigError("tls_server_config must be a mapping")
    _refuse_keys(section, TLS_KEYS, "tls_server_config.")
    tls = {k: section.get(k) for k in TLS_KEYS if section.get(k) not in (None, "")}
    if not tls:
        return {}
    for key in ("cert_file", "key_file"):
        if key not in tls:
            raise WebConfigError(f"tls_server_config.{key} is missing")
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth in UNSUPPORTED_CLIENT_AUTH:
        raise WebConfigError(f"tls_server_config.client_auth_type {auth}: "
                             f"{UNSUPPORTED_CLIENT_AUTH[auth]}")
    if auth not in CLIENT_AUTH_MODES:
        raise WebConfigError(f"tls_server_config.client_auth_type {auth!r} is invalid "
                             f"(one of {', '.join(CLIENT_AUTH_MODES)})")
    verifying = CLIENT_AUTH_MODES[auth] != ssl.CERT_NONE
    if verifying and "client_ca_file" not in tls:
        raise WebConfigError(f"tls_server_config.client_auth_type {auth} needs client_ca_file")
    if not verifying and "client_ca_file" in tls:
        # exporter-toolkit refuses this too: a CA nobody checks against.
        raise WebConfigError("tls_server_config.client_ca_file is set but client_auth_type "
                             f"{auth} never verifies client certificates")
    sans = tls.get("client_allowed_sans", [])
    if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
        raise WebConfigError("tls_server_config.client_allowed_sans must be a list of strings")
    if sans and CLIENT_AUTH_MODES[auth] != ssl.CERT_REQUIRED:
        # exporter-toolkit refuses this too: with VerifyClientCertIfGiven a client
        # that sends no certificate has no SAN to check, and would get in.
        raise WebConfigError("tls_server_config.client_allowed_sans needs a verifying "
                             "client_auth_type that requires a certificate: "
                             f"RequireAndVerifyClientCert (with {auth} a client sending "
                             "no certificate would skip the SAN check)")
    for key in ("min_version", "max_version"):
        if key in tls and tls[key] not in TLS_VERSIONS:
            raise WebConfigError(f"tls_server_config.{key} {tls[key]!r} is invalid "
                                 f"(one of {', '.join(TLS_VERSIONS)})")
    if ("max_version" in tls and TLS_VERSIONS[tls.get("min_version", "TLS12")]
            > TLS_VERSIONS[tls["max_version"]]):
        raise WebConfigError(f"tls_server_config.min_version {tls.get('min_version', 'TLS12')} "
                             f"is above max_version {tls['max_version']}: no version is left")
    return {
        "cert_file": _resolve(str(tls["cert_file"]), base_dir),
        "key_file": _resolve(str(tls["key_file"]), base_dir),
        "client_auth_type": auth,
        "client_ca_file": _resolve(str(tls.get("client_ca_file", "")), base_dir),
        "min_version": tls.get("min_version", "TLS12"),
        "max_version": tls.get("max_version", ""),
        "client_allowed_sans": tuple(sans),
    }


def _parse_users(section: object) -> dict[str, bytes]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise WebConfigError("basic_auth_users must be a mapping of user: bcrypt hash")
    users = {}
    for user, hashed in section.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise WebConfigError(f"basic_auth_users: bad user name {user!r}")
        match = BCRYPT_HASH.match(hashed) if isinstance(hashed, str) else None
        if not match or not 4 <= int(match.group(1)) <= 31:
            raise WebConfigError(f"basic_auth_users.{user}: not a bcrypt hash "
                                 "(expected $2a$/$2b$/$2y$, e.g. from `htpasswd -nBC 10 user`)")
        users[user] = hashed.encode()
    return users


# ---------------------------------------------------------------- loading (I/O)

def load_web_config(path: str) -> WebConfig:
    """Read, validate and prepare `path`; raise WebConfigError on any problem.

    Everything that could fail later is done now (files read, key matched to
    certificate, CA parsed) so a bad file stops the process at start.
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise WebConfigError(f"{path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise WebConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        tls, users, token_file = parse_web_config(doc, os.path.dirname(os.path.abspath(path)))
        tokens = _read_tokens(token_file) if token_file else ()
        tls_config = TLSServerConfig(**tls) if tls else None
        context = build_ssl_context(tls_config) if tls_config else None
    except WebConfigError as e:
        raise WebConfigError(f"{path}: {e}") from e
    if (users or tokens) and context is None:
        log.warning("%s: credentials are configured without TLS; they travel in clear", path)
    if context is not None:
        CertificateReloader(tls_config, context).install()
    return WebConfig(tls_config, users, tokens, context, token_file)


def _read_tokens(path: str) -> tuple[bytes, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            tokens = parse_tokens(f.read())
    except OSError as e:
        raise WebConfigError(f"bearer_token_file {path}: {e.strerror}") from e
    if not tokens:
        raise WebConfigError(f"bearer_token_file {path} holds no token")
    return tokens


def build_ssl_context(tls: TLSServerConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    if tls.max_version:
        context.maximum_version = TLS_VERSIONS[tls.max_version]
    for name, file in (("cert_file", tls.cert_file), ("key_file", tls.key_file),
                       ("client_ca_file", tls.client_ca_file)):
        if file and not os.path.isfile(file):
            raise WebConfigError(f"tls_server_config.{name} {file}: no such file")
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as e:
        why = "key does not match certificate" if "KEY_VALUES_MISMATCH" in str(e) else str(e)
        raise WebConfigError(f"tls_server_config: {tls.cert_file} / {tls.key_file}: {why}") from e
    context.verify_mode = CLIENT_AUTH_MODES[tls.client_auth_type]
    if tls.client_ca_file:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as e:
            raise WebConfigError(f"tls_server_config.client_ca_file "
                                 f"{tls.client_ca_file}: {e}") from e
    return context


class CertificateReloader:
    """Serve a renewed certificate and key without a restart (cert-manager).

    At each TLS handshake (at most once a second) the files are stat'ed; when
    they changed, a complete new context is built the same way as at start and
    the handshake switches to it (SSL_set_SSL_CTX through `sni_callback`, which
    OpenSSL calls with or without SNI). A pair that does not load (key and
    certificate from different renewals, half written) is counted and the
    previous context stays, until the files change again."""

    def __init__(self, tls: TLSServerConfig, context: ssl.SSLContext, clock=time.monotonic):
        self.tls = tls
        self.first = context
        self.current = context
        self._clock = clock
        self._signature = self._files_signature()
        self._next_check = 0.0

    def install(self) -> None:
        self.first.sni_callback = self._on_hello

    def _files_signature(self) -> tuple:
        out = []
        for path in (self.tls.cert_file, self.tls.key_file):
            try:
                st = os.stat(path)
                out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def refresh(self) -> ssl.SSLContext:
        now = self._clock()
        if now < self._next_check:
            return self.current
        self._next_check = now + CERT_RECHECK_SECONDS
        signature = self._files_signature()
        if signature == self._signature:
            return self.current
        self._signature = signature
        try:
            self.current = build_ssl_context(self.tls)
        except (WebConfigError, OSError, ssl.SSLError) as err:
            log.warning("TLS certificate changed but cannot be loaded (%s); still serving the "
                        "previous one", err)
            REFUSALS.reloaded("certificate", False)
        else:
            log.info("TLS certificate %s re-read", self.tls.cert_file)
            REFUSALS.reloaded("certificate", True)
        return self.current

    def _on_hello(self, sslobj, server_name, context):
        try:
            fresh = self.refresh()
            if fresh is not self.first:
                sslobj.context = fresh
        except Exception:       # never fail a handshake over the reload itself
            log.exception("reloading the TLS certificate")
        return None
