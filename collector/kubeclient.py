"""A small list/watch client for the Kubernetes API on the standard library.

The DaemonSet only lists and watches two resources as raw JSON (collector/kube.py
never used the official client's models), yet importing the official client's
API classes cost ~38 MiB of RSS on every node (kubernetes.client with its 700
model modules, urllib3, pydantic): more than the whole collector without it.
This module speaks the little HTTP that list/watch needs over http.client and
ssl (already loaded by aiohttp) and answers with the same shapes the official
client returns with `_preload_content=False` (`.data`, `.stream()`,
`.release_conn()`, errors with `.status`), so ListWatch runs on either.

Credentials: in-cluster (service account token re-read when the kubelet rotates
it, CA, KUBERNETES_SERVICE_HOST/PORT) and the kubeconfig forms a node agent
meets (server, CA file/data, insecure-skip-tls-verify, client certificate and
key file/data, token, tokenFile). Anything else in a kubeconfig (exec plugins,
auth-provider, basic auth, proxies) is loaded by the official package's own
loader, imported only then (`from_official_config`).
"""
from __future__ import annotations

import base64
import http.client
import os
import ssl
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterator

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CHUNK = 64 * 1024
# kubeconfig fields this module handles itself; any other user or cluster field
# means the official loader (exec plugins, auth-provider, proxy-url, ...).
OWN_USER_FIELDS = {"token", "tokenFile", "client-certificate", "client-certificate-data",
                   "client-key", "client-key-data"}
OWN_CLUSTER_FIELDS = {"server", "certificate-authority", "certificate-authority-data",
                      "insecure-skip-tls-verify", "extensions"}


class ApiError(Exception):
    """A non-2xx answer; `.status` as on the official client's ApiException."""

    def __init__(self, status: int, reason: str, body: bytes = b""):
        super().__init__(f"HTTP {status} {reason}")
        self.status, self.reason, self.body = status, reason, body[:512]


class Response:
    """An HTTP response read as the official client's (urllib3) one is read."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse):
        self._conn, self._resp = conn, resp
        self._data: bytes | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = self._resp.read()
            self.release_conn()
        return self._data

    def stream(self, amt=None, decode_content=False) -> Iterator[bytes]:
        while True:
            chunk = self._resp.read1(amt or CHUNK)
            if not chunk:
                return
            yield chunk

    def release_conn(self) -> None:
        self._conn.close()


def resp_lines(resp) -> Iterator[str]:
    """Non-empty lines of a watch stream (one JSON event each), from `.stream()`."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk if isinstance(chunk, bytes) else chunk.encode()
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield line.decode("utf-8", errors="replace")
    if buffer.strip():
        yield buffer.decode("utf-8", errors="replace")


@dataclass
class Credentials:
    server: str                         # https://host:port[/prefix]
    ssl_context: ssl.SSLContext | None  # None for http://
    token: str = ""
    token_file: str = ""
    header: Callable[[], str] | None = None   # Authorization from the official loader (refreshes itself)


class KubeClient:
    """GETs against one API server: paged lists and watches, raw JSON."""

    def __init__(self, creds: Credentials):
        self.creds = creds
        url = urllib.parse.urlsplit(creds.server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"API server URL {creds.server!r}: want https://host[:port]")
        self.scheme, self.host = url.scheme, url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self._token_lock = threading.Lock()
        self._token_cache: tuple[float, str] = (-1.0, "")

    # -- credentials ----------------------------------------------------------------

    def authorization(self) -> str:
        c = self.creds
        if c.header is not None:
            return c.header()
        if c.token_file:
            # Bound service-account tokens expire (1 h); the kubelet rewrites the
            # file well before. Re-read it whenever it changed.
            with self._token_lock:
                try:
                    mtime = os.stat(c.token_file).st_mtime
                    if mtime != self._token_cache[0]:
                        with open(c.token_file) as f:
                            self._token_cache = (mtime, f.read().strip())
                except OSError:
                    pass
                token = self._token_cache[1]
        else:
            token = c.token
        return f"Bearer {token}" if token else ""

    # -- requests -------------------------------------------------------------------

    def get(self, path: str, params: dict, timeout: float) -> Response:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, "")})
        conn: http.client.HTTPConnection
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self.creds.ssl_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Accept": "application/json", "User-Agent": "planewatch"}
        auth = self.authorization()
        if auth:
            headers["Authorization"] = auth
        try:
            conn.request("GET", f"{self.prefix}{path}?{query}" if query else f"{self.prefix}{path}",
                         headers=headers)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if resp.status // 100 != 2:
            body = resp.read(4096)
            conn.close()
            raise ApiError(resp.status, resp.reason, body)
        return Response(conn, resp)

    def list_call(self, path: str, **selectors) -> Callable[..., Response]:
        """A callable taking the official client's list keywords (limit, _continue,
        watch, resource_version, allow_watch_bookmarks, timeout_seconds,
        _request_timeout; _preload_content ignored: always raw) for `path`."""
        def call(**kw) -> Response:
            params = {"fieldSelector": selectors.get("field_selector"),
                      "labelSelector": selectors.get("label_selector")}
            if kw.get("watch"):
                params.update(watch="true", resourceVersion=kw.get("resource_version"),
                              allowWatchBookmarks="true" if kw.get("allow_watch_bookmarks") else None,
                              timeoutSeconds=kw.get("timeout_seconds"))
            else:
                params.update(limit=kw.get("limit"), **{"continue": kw.get("_continue")})
            timeout = kw.get("_request_timeout") or 60
            if isinstance(timeout, tuple):      # (connect, read): the socket has one timeout
                timeout = max(timeout)
            return self.get(path, params, float(timeout))
        return call

    def pods(self, field_selector: str = "") -> Callable[..., Response]:
        return self.list_call("/api/v1/pods", field_selector=field_selector)

    def cluster_custom_objects(self, group: str, version: str, plural: str) -> Callable[..., Response]:
        return self.list_call(f"/apis/{group}/{version}/{plural}")


# --- loading credentials ------------------------------------------------------------

def client_context(cafile: str | None = None, cadata: str | None = None) -> ssl.SSLContext:
    """A TLS client context that judges a server's chain as client-go (Go crypto/x509)
    does: the cluster CAs kubectl accepts are accepted. Python >= 3.13's default
    contexts add VERIFY_X509_STRICT, RFC 5280 profile checks Go does not make (a CA
    certificate without keyUsage, a leaf without an authority key identifier): a
    cluster whose CA was made without them would work for kubectl and for planewatch
    on 3.11, and not on 3.13. Cleared explicitly; the chain, its signatures, expiry
    and the host name are verified as before."""
    ctx = ssl.create_default_context(cafile=cafile, cadata=cadata)
    ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return ctx


def _context(ca_file: str = "", ca_data: str = "", insecure: bool = False,
             cert: tuple[str, str] | None = None, cert_data: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
    ctx = client_context(cafile=ca_file or None, cadata=ca_data or None)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(*cert)
    elif cert_data:
        # ssl wants files: write both to a private temporary file, load, remove.
        with tempfile.NamedTemporaryFile(prefix="planewatch-", suffix=".pem") as f:
            f.write(cert_data[0] + b"\n" + cert_data[1])
            f.flush()
            ctx.load_cert_chain(f.name)
    return ctx


def in_cluster(sa_dir: str = SA_DIR, environ=os.environ) -> KubeClient:
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise RuntimeError("not in a cluster: KUBERNETES_SERVICE_HOST/PORT unset (give --kubeconfig)")
    token_file = os.path.join(sa_dir, "token")
    if not os.path.exists(token_file):
        raise RuntimeError(f"no service account token at {token_file}")
    host = f"[{host}]" if ":" in host else host
    return KubeClient(Credentials(f"https://{host}:{port}", _context(ca_file=os.path.join(sa_dir, "ca.crt")),
                                  token_file=token_file))


def _b64(value: str) -> bytes:
    return base64.b64decode(value)


def from_kubeconfig(path: str) -> KubeClient:
    import yaml
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    base = os.path.dirname(os.path.abspath(path))

    def named(kind: str, name: str) -> dict:
        for entry in doc.get(kind + "s") or []:
            if entry.get("name") == name:
                return entry.get(kind) or {}
        raise ValueError(f"kubeconfig {path}: no {kind} named {name!r}")

    context = named("context", doc.get("current-context") or "")
    cluster = named("cluster", context.get("cluster", ""))
    user = named("user", context["user"]) if context.get("user") else {}
    if set(user) - OWN_USER_FIELDS or set(cluster) - OWN_CLUSTER_FIELDS:
        return from_official_config(path)

    def file(value: str) -> str:
        return value if os.path.isabs(value) else os.path.join(base, value)

    server = cluster.get("server", "")
    ctx = None
    if server.startswith("https://"):
        cert = cert_data = None
        if user.get("client-certificate") and user.get("client-key"):
            cert = (file(user["client-certificate"]), file(user["client-key"]))
        elif user.get("client-certificate-data") and user.get("client-key-data"):
            cert_data = (_b64(user["client-certificate-data"]), _b64(user["client-key-data"]))
        ctx = _context(ca_file=file(cluster["certificate-authority"]) if cluster.get("certificate-authority") else "",
                       ca_data=_b64(cluster["certificate-authority-data"]).decode()
                       if cluster.get("certificate-authority-data") else "",
                       insecure=bool(cluster.get("insecure-skip-tls-verify")), cert=cert, cert_data=cert_data)
    return KubeClient(Credentials(server, ctx, token=user.get("token", ""),
                                  token_file=file(user["tokenFile"]) if user.get("tokenFile") else ""))


def from_official_config(path: str) -> KubeClient:
    """Credentials the official loader resolves (exec plugins, auth-provider, ...):
    the kubernetes package is imported here only, for kubeconfigs that need it."""
    try:
        from kubernetes import config as kube_config
    except ModuleNotFoundError:
        raise RuntimeError(f"kubeconfig {path}: its user needs an exec plugin, auth-provider, basic auth or "
                           "a proxy; install the official client for those: pip install "
                           "'planewatch[kubeconfig-plugins]'") from None
    api = kube_config.new_client_from_config(config_file=path)
    conf = api.configuration
    ctx = None
    if conf.host.startswith("https://"):
        cert = (conf.cert_file, conf.key_file) if conf.cert_file and conf.key_file else None
        ctx = _context(ca_file=conf.ssl_ca_cert or "", insecure=not conf.verify_ssl, cert=cert)

    def header() -> str:
        # refresh_api_key_hook (exec/auth-provider tokens) runs inside this call
        return conf.get_api_key_with_prefix("authorization") or (conf.get_basic_auth_token() or "")
    return KubeClient(Credentials(conf.host, ctx, header=header))


def describe(err: Exception) -> str:
    status = getattr(err, "status", None)
    if status is not None:
        return f"HTTP {status} {getattr(err, 'reason', '')}".rstrip()
    text = str(err)
    return text if len(text) < 200 else text[:200] + "..."
