"""collector/kubeclient.py: credentials from kubeconfig and in-cluster files,
watch-stream line splitting, errors, and (against the real kube-apiserver)
a list and a watch answered as the official client answers them."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import yaml

from collector import kubeclient
from collector.kubeclient import ApiError, Credentials, KubeClient, from_kubeconfig, in_cluster, resp_lines
from tests import kubeapi
from tests.conftest import REPO


class Chunks:
    def __init__(self, *chunks):
        self.chunks = chunks

    def stream(self, amt=None, decode_content=False):
        yield from self.chunks


def test_lines_split_across_chunks_and_blank_lines_skipped():
    events = list(resp_lines(Chunks(b'{"a":', b' 1}\n\n{"b"', b':2}\n{"c":3}')))
    assert [json.loads(e) for e in events] == [{"a": 1}, {"b": 2}, {"c": 3}]


def _kubeconfig(tmp_path, user: dict, cluster: dict | None = None) -> str:
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "here",
           "contexts": [{"name": "other", "context": {"cluster": "nowhere", "user": "nobody"}},
                        {"name": "here", "context": {"cluster": "c", "user": "u"}}],
           "clusters": [{"name": "c", "cluster": cluster or {"server": "http://127.0.0.1:1/prefix"}}],
           "users": [{"name": "u", "user": user}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_kubeconfig_token_and_relative_token_file(tmp_path):
    api = from_kubeconfig(_kubeconfig(tmp_path, {"token": "abc"}))
    assert (api.scheme, api.host, api.port, api.prefix) == ("http", "127.0.0.1", 1, "/prefix")
    assert api.authorization() == "Bearer abc"
    (tmp_path / "tok").write_text("first\n")
    api = from_kubeconfig(_kubeconfig(tmp_path, {"tokenFile": "tok"}))
    assert api.authorization() == "Bearer first"
    time.sleep(0.01)
    (tmp_path / "tok").write_text("rotated\n")
    os.utime(tmp_path / "tok", (time.time() + 5, time.time() + 5))
    assert api.authorization() == "Bearer rotated"          # re-read when the file changes


def test_kubeconfig_with_an_unknown_context_is_refused(tmp_path):
    path = _kubeconfig(tmp_path, {"token": "x"})
    doc = yaml.safe_load(open(path))
    doc["current-context"] = "missing"
    open(path, "w").write(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="missing"):
        from_kubeconfig(path)


def test_exec_users_go_to_the_official_loader(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(kubeclient, "from_official_config", lambda path: seen.append(path) or "official")
    path = _kubeconfig(tmp_path, {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "x"}})
    assert from_kubeconfig(path) == "official" and seen == [path]
    path = _kubeconfig(tmp_path, {"token": "t"}, {"server": "https://h", "proxy-url": "http://p:3128"})
    assert from_kubeconfig(path) == "official"


def test_in_cluster_needs_the_environment_and_a_token(tmp_path):
    with pytest.raises(RuntimeError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster(str(tmp_path), environ={})
    with pytest.raises(RuntimeError, match="token"):
        in_cluster(str(tmp_path), environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"})


def test_errors_carry_the_status_the_list_watch_loop_looks_for():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(410 if "continue=" in self.path else 403)
            body = b'{"kind":"Status","code":410}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        call = KubeClient(Credentials(f"http://127.0.0.1:{server.server_address[1]}", None)).pods("spec.nodeName=n")
        with pytest.raises(ApiError) as err:
            call(limit=5, _continue="tok")
        assert err.value.status == 410
        with pytest.raises(ApiError) as err:
            call(limit=5)
        assert err.value.status == 403 and "403" in kubeclient.describe(err.value)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.kube
def test_list_and_watch_against_the_real_api_server_with_tls_and_a_token(tmp_path):
    from tests.kubeapi import KubeAPIServer, kube_available
    reason = kube_available()
    if reason:
        pytest.skip(f"no kube-apiserver: {reason}")
    with KubeAPIServer() as kube:
        # the harness's kubeconfig holds a CA file and a token; test the -data form too
        doc = yaml.safe_load(open(kube.kubeconfig()))
        cluster = doc["clusters"][0]["cluster"]
        with open(cluster.pop("certificate-authority")) as f:
            cluster["certificate-authority-data"] = base64.b64encode(f.read().encode()).decode()
        path = tmp_path / "kc"
        path.write_text(yaml.safe_dump(doc))
        api = from_kubeconfig(str(path))
        assert kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": "kc"}})[0] in (201, 409)
        pod = {"metadata": {"name": "p1", "namespace": "kc"},
               "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]}}
        assert kube.request("POST", "/api/v1/namespaces/kc/pods", pod)[0] == 201
        listed = json.loads(api.pods("spec.nodeName=n1")(limit=10).data)
        assert [p["metadata"]["name"] for p in listed["items"]] == ["p1"]
        assert json.loads(api.pods("spec.nodeName=elsewhere")(limit=10).data)["items"] == []
        resp = api.pods("spec.nodeName=n1")(watch=True, resource_version=listed["metadata"]["resourceVersion"],
                                            timeout_seconds=5, _request_timeout=(5, 10))
        assert kube.request("DELETE", "/api/v1/namespaces/kc/pods/p1?gracePeriodSeconds=0")[0] == 200
        kinds = []
        for line in resp_lines(resp):
            kinds.append(json.loads(line)["type"])
            if "DELETED" in kinds:
                break
        resp.release_conn()
        assert "DELETED" in kinds
        # a wrong token is refused by the server, and said so
        doc["users"][0]["user"]["token"] = "wrong"
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(ApiError) as err:
            from_kubeconfig(str(path)).pods()(limit=1)
        assert err.value.status == 401


def test_serve_never_imports_the_heavy_libraries(tmp_path):
    """What the DaemonSet runs: the whole server built in API mode (every default
    collector) loads neither the kubernetes package, pyroute2 nor grafanalib
    (RSS: ~38, ~10 and ~5 MiB)."""
    kubeconfig = _kubeconfig(tmp_path, {"token": "t"})
    code = ("import sys, argparse; from exporters import cli, serve\n"
            "p = argparse.ArgumentParser(); s = p.add_subparsers(dest='c').add_parser('serve')\n"
            "cli.add_serve_flags(s)\n"
            f"args = p.parse_args(['serve', '--kubeconfig', {kubeconfig!r}, '--node-name', 'n'])\n"
            "server, feeds, _ = serve.build_server(args)\n"
            "assert feeds and type(feeds[0]).__name__ == 'KubeFeed'\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'kubernetes', 'grafanalib', 'urllib3',"
            " 'pydantic', 'prometheus_client', 'pyroute2'})\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def _go_accepted_pki(d) -> tuple[str, str, str]:
    """A CA without keyUsage and a leaf without an authority key identifier: what an
    `openssl req -x509` made by hand gives, which Go (kubectl, client-go) accepts and
    Python >= 3.13's default context (VERIFY_X509_STRICT) refuses."""
    def run(*args):
        kubeapi._openssl(*args, cwd=d)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
        "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=handmade-ca")
    (d / "leaf.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "leaf.key",
        "-out", "leaf.csr", "-subj", "/CN=kube-apiserver")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "leaf.crt", "-days", "2", "-extfile", "leaf.ext")
    return str(d / "ca.crt"), str(d / "leaf.crt"), str(d / "leaf.key")


def _handshake(ctx, server_ctx) -> None:
    import socket
    import ssl
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve():
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                    pass
        finally:
            t.join(timeout=10)


def test_the_api_server_chain_is_judged_as_go_judges_it(tmp_path, monkeypatch):
    """A cluster CA kubectl accepts is accepted on every Python (3.13 made its default
    context strict: done here on any version); what Go refuses is still refused: a CA
    that did not sign it."""
    import ssl
    default = ssl.create_default_context

    def as_in_313(*args, **kwargs):
        ctx = default(*args, **kwargs)
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        return ctx
    monkeypatch.setattr(ssl, "create_default_context", as_in_313)
    ca, crt, key = _go_accepted_pki(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(crt, key)
    ctx = kubeclient.client_context(cafile=ca)
    assert not ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    _handshake(ctx, server_ctx)                                   # accepted
    strict = ssl.create_default_context(cafile=ca)
    with pytest.raises(ssl.SSLCertVerificationError):             # what 3.13's default does
        _handshake(strict, server_ctx)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(kubeclient.client_context(cafile=_go_accepted_pki(other)[0]), server_ctx)
