"""A skip is a test that did not run: in CI (.ci/run sets PLANEWATCH_STRICT_SKIPS=1)
any skip outside ALLOWED fails the run, and every skip is listed with its reason.

A missing tool, an unbuilt BPF object or an unreachable kube-apiserver used to turn
dozens of tests into skips while CI stayed green. Everything the tests use is
installed by `make test` itself (Makefile: apt + the test extras), so the only
skips left are the ones below, each with why it cannot run in CI.
Registered by tests/conftest.py (pytest_configure).
"""
from __future__ import annotations

import os
import re
from typing import Iterable, NamedTuple

import pytest

STRICT_ENV = "PLANEWATCH_STRICT_SKIPS"


class Allowed(NamedTuple):
    nodeid: str        # regex, searched in the test id
    reason: str        # regex, searched in the skip reason
    why: str


ALLOWED = (
    Allowed(r"^tests/test_soak\.py::", r"^soak test: ",
            "opt-in minutes-long load and churn runs (-m soak); CI runs their short "
            "versions in tests/test_faults.py"),
    Allowed(r"^tests/test_sriov\.py::test_real_rtnetlink_socket\[/proc/1/ns/net\]$",
            r"Permission denied|Operation not permitted",
            "container sandboxes deny pid 1's netns; the same transport is proven "
            "through /proc/self/ns/net"),
)


class Skip(NamedTuple):
    nodeid: str
    reason: str


def skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def allowed_by(skip: Skip, allowed: Iterable[Allowed] = ALLOWED) -> Allowed | None:
    for entry in allowed:
        if re.search(entry.nodeid, skip.nodeid) and re.search(entry.reason, skip.reason):
            return entry
    return None


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


class SkipGuard:
    def __init__(self) -> None:
        self.skips: list[Skip] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skips.append(Skip(report.nodeid, skip_reason(report)))

    @property
    def unexpected(self) -> list[Skip]:
        return [s for s in self.skips if allowed_by(s) is None]

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session) -> None:
        if strict() and self.unexpected and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.skips:
            return
        write = terminalreporter.write_line
        terminalreporter.section("skips")
        for skip in self.skips:
            entry = allowed_by(skip)
            tag = "allowed" if entry else ("NOT ALLOWED" if strict() else "unexpected")
            write(f"{tag}: {skip.nodeid}: {skip.reason}")
            if entry:
                write(f"    because {entry.why}")
        if self.unexpected:
            write(f"{len(self.unexpected)} skip(s) outside the allow-list (tests/skipguard.py)"
                  + (f": failing the run ({STRICT_ENV} is set)" if strict() else ""),
                  red=strict(), bold=True)

