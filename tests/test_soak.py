"""The long versions of tests/test_faults.py: 50 scrapers for 60 s, 5 minutes of
pod churn.

Marked `soak` and skipped unless asked for, with `-m soak` or PLANEWATCH_SOAK=1
(about 7 minutes together; numbers in bench/RESULTS.md):

    python3 -m pytest tests/test_soak.py -m soak -q -s
"""
from __future__ import annotations

import os
import shutil

import pytest

from lab.objects import NODE_NAME
from tests.test_faults import MIB, check_churn, check_hammer, pods_file  # noqa: F401  (fixture)

pytestmark = [pytest.mark.soak, pytest.mark.lab]


@pytest.fixture(autouse=True)
def only_when_asked(request):
    if "soak" not in (request.config.getoption("markexpr") or "") and not os.environ.get("PLANEWATCH_SOAK"):
        pytest.skip("soak test: run with -m soak or PLANEWATCH_SOAK=1")


def test_50_concurrent_scrapers_60s(lab, pods_file, collector_factory):  # noqa: F811
    c = collector_factory("--pods-file", pods_file, "--node-name", NODE_NAME)
    c.wait_ready()
    got = check_hammer(c, 60, p99_bound=2.0)
    assert got["scrapes"] > 50 * 60          # shared in-flight scrapes: far more than one a second each


def test_pod_churn_5min_returns_to_baseline(lab, pods_file, collector_factory, tmp_path):  # noqa: F811
    path = str(tmp_path / "pods.json")
    shutil.copy(pods_file, path)
    c = collector_factory("--pods-file", path, "--node-name", NODE_NAME)
    c.wait_ready()
    got = check_churn(lab, path, c, 300, rss_tolerance=10 * MIB)
    assert got["cycles"] >= 30
