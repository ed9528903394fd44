"""tests/skipguard.py: in CI a skip outside the allow-list fails the run."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO
from tests.skipguard import ALLOWED, Skip, allowed_by

SUITE = '''
import os, pytest

def test_runs():
    assert True

def test_tool_missing():
    pytest.skip("kubectl missing")

def test_soak_like():
    pytest.skip("soak test: run with -m soak or PLANEWATCH_SOAK=1")
'''


def test_allow_list_matches_test_and_reason_both():
    soak = Skip("tests/test_soak.py::test_50_concurrent_scrapers_60s",
                "soak test: run with -m soak or PLANEWATCH_SOAK=1")
    assert allowed_by(soak) is ALLOWED[0]
    assert allowed_by(soak._replace(reason="kubectl missing")) is None
    assert allowed_by(soak._replace(nodeid="tests/test_deploy.py::test_x")) is None
    pid1 = Skip("tests/test_sriov.py::test_real_rtnetlink_socket[/proc/1/ns/net]",
                "/proc/1/ns/net: [Errno 13] Permission denied: '/proc/1/ns/net'")
    assert allowed_by(pid1) is ALLOWED[1]
    assert allowed_by(pid1._replace(reason="/proc/1/ns/net: [Errno 2] No such file")) is None
    assert allowed_by(pid1._replace(nodeid="tests/test_sriov.py::test_real_rtnetlink_socket[]")) is None


def run_suite(tmp_path, strict: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_configure  # noqa: F401\n")
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {**os.environ, "PLANEWATCH_STRICT_SKIPS": strict, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), *args, str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_strict_run_fails_on_an_unexpected_skip_and_names_it(tmp_path):
    done = run_suite(tmp_path, "1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 passed, 2 skipped" in done.stdout
    assert "NOT ALLOWED: test_suite.py::test_tool_missing: kubectl missing" in done.stdout
    # the soak-like skip is not in tests/test_soak.py: not allowed either
    assert "NOT ALLOWED: test_suite.py::test_soak_like: soak test:" in done.stdout


def test_without_strict_the_skips_are_listed_but_the_run_passes(tmp_path):
    done = run_suite(tmp_path, "")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unexpected: test_suite.py::test_tool_missing: kubectl missing" in done.stdout


def test_strict_run_in_parallel_sees_every_workers_skips(tmp_path):
    """`make test-quick` runs under pytest-xdist: the skips happen in the workers
    and must still fail the run (the controller receives every worker's reports)."""
    (tmp_path / "test_more.py").write_text(
        "import pytest\n\ndef test_other_tool_missing():\n    pytest.skip('promtool missing')\n")
    done = run_suite(tmp_path, "1", "-n", "2", "--dist", "loadfile")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 passed, 3 skipped" in done.stdout
    assert "NOT ALLOWED: test_suite.py::test_tool_missing: kubectl missing" in done.stdout
    assert "NOT ALLOWED: test_more.py::test_other_tool_missing: promtool missing" in done.stdout
    assert "3 skip(s) outside the allow-list" in done.stdout
