"""Shared fixtures: root checks, unique kernel-object prefixes, the lab, a running
collector, the real API server, and the --update-golden flag."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.ports import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    from tests.skipguard import SkipGuard
    if not config.pluginmanager.has_plugin("planewatch-skipguard"):
        config.pluginmanager.register(SkipGuard(), "planewatch-skipguard")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/ from this run")


@pytest.fixture(scope="session")
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


def unique_prefix(tag: str) -> str:
    """A short prefix for kernel objects: tag + pid digits (lab names are <= 8 chars)."""
    return f"{tag}{os.getpid() % 10000:04d}"[:8]


@pytest.fixture
def root():
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")


@pytest.fixture(scope="module")
def lab():
    """The demo lab under a unique prefix, removed afterwards whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    from lab import topology
    prefix = unique_prefix("pwt")
    topology.down(prefix)            # a leftover from a killed run of the same pid
    state = topology.up(prefix)
    try:
        yield state
    finally:
        topology.down(prefix)


SERVE = ("exporters", "serve")
CLUSTER = ("exporters.cluster",)


class Collector:
    """`planewatch serve` (or another planewatch server: `command=CLUSTER`) as a
    child process on 127.0.0.1."""

    def __init__(self, *args: str, env: dict | None = None, command: tuple[str, ...] = SERVE):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", *command, "--web.listen-address", f"127.0.0.1:{self.port}", *args]
        self.log_path = f"/tmp/planewatch-test-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200, body
        return body.decode()

    def answering(self) -> bool:
        """True once /healthz answers; raises if the process died."""
        if self.proc.poll() is not None:
            raise AssertionError(f"exited {self.proc.returncode}:\n{self.logs()}")
        try:
            return self.get("/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"collector exited {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.get("/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"collector not ready in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        os.unlink(self.log_path)
        return self.proc.returncode


@pytest.fixture
def collector_factory():
    started: list[Collector] = []

    def start(*args: str, env: dict | None = None) -> Collector:
        c = Collector(*args, env=env)
        started.append(c)
        return c
    yield start
    for c in started:
        c.stop()


@pytest.fixture
def loader_factory():
    """ebpf.loader.Loader(**kw), each closed (programs detached, maps freed) after the test."""
    from ebpf.loader import Loader
    made = []

    def make(**kw):
        made.append(Loader(**kw))
        return made[-1]
    yield make
    for loader in made:
        loader.close()


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """{(name, frozenset(labels.items())): value} via prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def series(parsed: dict, name: str, **labels) -> dict[frozenset, float]:
    """The series of one metric whose labels include `labels`."""
    want = set(labels.items())
    return {lbl: v for (n, lbl), v in parsed.items() if n == name and want <= lbl}


@pytest.fixture(scope="session")
def kube():
    """One real kube-apiserver + etcd for the session, with the NAD CRD served.

    Users: `collector` (stands for the DaemonSet's ServiceAccount; rights only
    from RBAC) and `nobody` (no rights at all)."""
    from tests.kubeapi import KubeAPIServer, kube_available
    reason = kube_available()
    if reason:
        pytest.skip(reason)
    with KubeAPIServer(users={"collector": ["system:serviceaccounts"], "nobody": []}) as server:
        server.create_nad_crd()
        yield server


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.2, what: str = "condition"):
    """Poll until predicate() is truthy; return its value or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- the quick tier: `make test-quick` runs `pytest -m "not root"` as uid 65534 ------
# A test that needs root is marked `root` here, from what it asks for, so the quick
# tier deselects it instead of letting it skip.
ROOT_MARKERS = frozenset({"lab", "kube", "ebpf"})
ROOT_FIXTURES = frozenset({"root", "lab", "golden_lab", "kube", "capability_lab", "node"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if ROOT_MARKERS & {m.name for m in item.iter_markers()} or ROOT_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.root)
