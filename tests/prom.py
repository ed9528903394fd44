"""Debian's Prometheus as a child process for tests: its own config and data dir in
a temp directory, listening on 127.0.0.1 only, stopped by PID.

    with Prometheus(workdir, config(targets=["127.0.0.1:9808"], rule_files=[...])) as prom:
        prom.wait_for("up == 1")
        prom.query("planewatch_build_info")
        prom.alerts()
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.ports import free_port

PROMETHEUS = shutil.which("prometheus")


def config(targets: list[str], rule_files: list[str], node: str = "lab-node",
           job: str = "planewatch", interval: str = "1s") -> dict:
    """A prometheus.yml scraping `targets` as the ServiceMonitor would: honor_labels,
    job `planewatch`, and a `node` label set by relabelling (the constant stands for
    __meta_kubernetes_pod_node_name, which a static target does not have)."""
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval,
                   "evaluation_interval": interval},
        "rule_files": [str(f) for f in rule_files],
        "scrape_configs": [{
            "job_name": job, "honor_labels": True,
            "static_configs": [{"targets": targets}],
            "relabel_configs": [{"target_label": "node", "replacement": node, "action": "replace"}],
        }],
    }


class Prometheus:
    """One Prometheus child process; `stop()` (or leaving the `with`) kills it by PID."""

    def __init__(self, workdir: Path, prometheus_config: dict):
        if PROMETHEUS is None:
            raise RuntimeError("needs Debian's prometheus")
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(prometheus_config))
        self.log_path = self.workdir / "prometheus.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config_file}",
             f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "Prometheus":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text()[-chars:]

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    def query(self, expr: str) -> list[dict]:
        """The result vector of an instant query (fails on a query error)."""
        answer = self.api("/api/v1/query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def alerts(self) -> list[dict]:
        """Active (pending or firing) alerts: {labels, annotations, state, value}."""
        return self.api("/api/v1/alerts")["data"]["alerts"]

    def wait_for(self, predicate_or_expr, timeout: float = 30.0, interval: float = 0.25,
                 what: str = ""):
        """Poll until `predicate()` (or the query `expr`'s result) is truthy; return it."""
        if isinstance(predicate_or_expr, str):
            expr = predicate_or_expr
            predicate, what = (lambda: self.query(expr)), what or expr
        else:
            predicate = predicate_or_expr
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                value = predicate()
                if value:
                    return value
            except OSError:         # not listening yet
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or 'condition'}\n"
                                     f"{self.log_tail()}")
            time.sleep(interval)
