"""Soak: 50 scrapers for 60 s and 5 minutes of pod churn, plus the probes of a
running collector and the load drivers that tests/test_faults.py runs for
shorter in CI.

The tests here are marked `soak` and skipped unless asked for, with `-m soak`
or PLANEWATCH_SOAK=1 (about 6.5 minutes together; numbers in bench/RESULTS.md):

    python3 -m pytest tests/test_soak.py -m soak -q -s
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest

from lab import topology
from lab.objects import NODE_NAME, lab_objects, pod_object
from tests.conftest import Collector, parse_metrics, series, unique_prefix, wait_for

MIB = 1 << 20


# --- probes of a running collector ------------------------------------------------------

def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def parse_fdinfo_ids(text: str) -> dict[str, int]:
    """prog_id / link_id of a BPF fd from the text of /proc/<pid>/fdinfo/<fd>."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("prog_id", "link_id"):
            out[key] = int(value)
    return out


def bpf_ids_held(pid: int) -> dict[str, set[int]]:
    """The BPF programs and links a process holds fds to (bpftool 7.1 shows no pids)."""
    held: dict[str, set[int]] = {"prog_id": set(), "link_id": set()}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                ids = parse_fdinfo_ids(f.read())
        except OSError:
            continue
        for key, value in ids.items():
            held[key].add(value)
    return held


def bpftool_ids(kind: str) -> set[int]:
    out = subprocess.run(["bpftool", kind, "show", "-j"], check=True, capture_output=True, text=True).stdout
    return {item["id"] for item in json.loads(out or "[]")}


def thread_netns_inodes(pid: int) -> set[int]:
    inodes = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            inodes.add(os.stat(f"/proc/{pid}/task/{tid}/ns/net").st_ino)
        except OSError:
            continue
    return inodes


def sample_keys(text: str) -> list[str]:
    """`name{labels}` of every sample line, duplicates kept."""
    return [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]


def stable_series(keys: list[str]) -> int:
    """Series that depend only on the pod set (a drop reason can appear any time)."""
    return sum(1 for k in keys if not k.startswith("planewatch_packet_drops_total"))


def pods_with(parsed: dict, metric: str, **labels) -> set[str]:
    return {dict(l)["pod"] for l in series(parsed, metric, **labels)}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * p // 100) - 1))]


def scrape_text(url: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=timeout) as resp:
        assert resp.status == 200
        return resp.read().decode()


@pytest.fixture(scope="module")
def pods_file(lab, tmp_path_factory):
    from lab.objects import write_pods_file
    path = str(tmp_path_factory.mktemp("faults") / "pods.json")
    write_pods_file(lab, path)
    return path


# --- many scrapers at once ----------------------------------------------------------------

def hammer(url: str, scrapers: int, seconds: float) -> dict:
    """`scrapers` threads GET /metrics back to back for `seconds`; latencies and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    sizes: set[int] = set()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def scraper():
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                body = scrape_text(url)
                ok = body.endswith("\n") and "planewatch_build_info{" in body
                took = time.perf_counter() - t0
                with lock:
                    latencies.append(took)
                    sizes.add(stable_series(sample_keys(body)))
                    if not ok:
                        errors.append("truncated body")
            except Exception as err:        # every failure is counted, none may happen
                with lock:
                    errors.append(repr(err))
    threads = [threading.Thread(target=scraper) for _ in range(scrapers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"scrapes": len(latencies), "errors": errors, "series_counts": sizes,
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "max": max(latencies)}


def wait_bpf_settled(c: Collector, interfaces: int) -> None:
    """Wait until BPF is attached to all `interfaces` pod interfaces, so the series set
    is final: ebpf_up turns 1 at load, then each attach (in the background, slower on
    a busy machine) adds that interface's eBPF series. Nothing to wait for when eBPF
    is not up here: its series then never change."""
    def settled() -> bool:
        parsed = parse_metrics(c.metrics())
        if list(series(parsed, "planewatch_ebpf_up").values()) != [1]:
            return True
        return list(series(parsed, "planewatch_ebpf_attached_interfaces").values()) == [interfaces]
    wait_for(settled, timeout=60, what=f"BPF on {interfaces} interfaces")


def check_hammer(c: Collector, seconds: float) -> dict:
    """Every scrape answered, the same series all along. Latency is printed: its
    figures are bench/scrape.py's."""
    c.metrics()
    rss0 = rss_bytes(c.proc.pid)
    got = hammer(c.url, 50, seconds)
    print(f"50 scrapers x {seconds:.0f} s: {got['scrapes']} scrapes, p50 {got['p50'] * 1000:.0f} ms, "
          f"p99 {got['p99'] * 1000:.0f} ms, max {got['max'] * 1000:.0f} ms, "
          f"RSS {rss0 / MIB:.1f} -> {rss_bytes(c.proc.pid) / MIB:.1f} MiB")
    assert not got["errors"], got["errors"][:5]
    assert len(got["series_counts"]) == 1, got["series_counts"]   # the same pods all along
    assert c.get("/healthz")[0] == 200
    return got


# --- pod churn ----------------------------------------------------------------------------

def write_atomically(path: str, objects: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": objects}, f)
    os.replace(tmp, path)


def churn_specs(cycle: int) -> list:
    three = (("eth0", "default"), ("net1", "signaling"), ("net2", "data"))
    return [topology.PodSpec("churn", f"churn-{cycle}-{i}", three) for i in range(3)]


def collector_state(c: Collector) -> dict:
    text = c.metrics()
    keys = sample_keys(text)
    return {"series": len(keys), "stable_series": stable_series(keys),
            "churn_series": sum(1 for k in keys if 'namespace="churn"' in k),
            "duplicates": len(keys) - len(set(keys)), "fds": fd_count(c.proc.pid),
            "rss": rss_bytes(c.proc.pid), "links": len(bpf_ids_held(c.proc.pid)["link_id"])}


def churn(lab, pods_file: str, c: Collector, seconds: float) -> dict:
    """Pods come and go for `seconds`: a lab of 3 pods up, into the pods file,
    seen, then removed (netns first on odd cycles, file first on even ones)."""
    base = lab_objects(lab)
    prefix = unique_prefix("pwc")
    cycles, worst = 0, 0.0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            state = topology.up(prefix, churn_specs(cycles))
            names = {s["name"] for s in state.specs}
            write_atomically(pods_file, base + [pod_object(state, s) for s in state.specs])
            wait_for(lambda names=names: pods_with(parse_metrics(c.metrics()), "planewatch_interface_up",
                                                   namespace="churn") == names, what="churn pods in /metrics")
            t0 = time.perf_counter()
            assert collector_state(c)["duplicates"] == 0
            worst = max(worst, time.perf_counter() - t0)
            if cycles % 2:
                topology.down(prefix)
                write_atomically(pods_file, base)
            else:
                write_atomically(pods_file, base)
                topology.down(prefix)
            cycles += 1
    finally:
        write_atomically(pods_file, base)
        topology.down(prefix)
    wait_for(lambda: collector_state(c)["churn_series"] == 0, what="churn series to leave")
    leftovers = [n for n in os.listdir("/run/netns") if n.startswith(prefix)]
    return {"cycles": cycles, "worst_scrape": worst, "leftover_netns": leftovers, "prefix": prefix}


def check_churn(lab, pods_file: str, c: Collector, seconds: float) -> dict:
    """Series, fds, BPF links and thread namespaces back to baseline. RSS is printed
    (bench/scrape.py measures it)."""
    churn(lab, pods_file, c, 8)                     # one warm-up round: caches, first allocations
    time.sleep(2)
    before = collector_state(c)
    got = churn(lab, pods_file, c, seconds)
    after = wait_for(lambda: (s := collector_state(c)) and s["links"] <= before["links"] and s, timeout=20,
                     what="BPF links back to baseline")
    print(f"churn {seconds:.0f} s: {got['cycles']} cycles (3 pods each); series {before['series']} -> "
          f"{after['series']}, fds {before['fds']} -> {after['fds']}, BPF links {before['links']} -> "
          f"{after['links']}, RSS {before['rss'] / MIB:.1f} -> {after['rss'] / MIB:.1f} MiB")
    assert got["cycles"] >= 3
    assert after["stable_series"] == before["stable_series"] and after["duplicates"] == 0
    assert after["fds"] <= before["fds"] + 2, (before, after)      # +2: a keep-alive socket or two
    assert after["links"] == before["links"]
    assert not got["leftover_netns"], f"namespaces re-created: {got['leftover_netns']}"
    home = os.stat("/proc/self/ns/net").st_ino
    assert thread_netns_inodes(c.proc.pid) == {home}, "a thread stayed in a pod netns"
    return got


# --- the long runs ------------------------------------------------------------------------

@pytest.fixture
def only_when_asked(request):
    if "soak" not in (request.config.getoption("markexpr") or "") and not os.environ.get("PLANEWATCH_SOAK"):
        pytest.skip("soak test: run with -m soak or PLANEWATCH_SOAK=1")


@pytest.mark.soak
@pytest.mark.lab
def test_50_concurrent_scrapers_60s(only_when_asked, lab, pods_file, collector_factory):
    c = collector_factory("--pods-file", pods_file, "--node-name", NODE_NAME)
    c.wait_ready()
    wait_bpf_settled(c, sum(len(ifaces) for ifaces in lab.addresses.values()))
    got = check_hammer(c, 60)
    assert got["scrapes"] > 50 * 60          # shared in-flight scrapes: far more than one a second each


@pytest.mark.soak
@pytest.mark.lab
def test_pod_churn_5min_returns_to_baseline(only_when_asked, lab, pods_file, collector_factory, tmp_path):
    path = str(tmp_path / "pods.json")
    shutil.copy(pods_file, path)
    c = collector_factory("--pods-file", path, "--node-name", NODE_NAME)
    c.wait_ready()
    got = check_churn(lab, path, c, 300)
    assert got["cycles"] >= 30
