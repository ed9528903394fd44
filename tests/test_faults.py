"""Faults and abuse: the API server going away, a 410 on the watch, BPF refused,
50 concurrent scrapers, pod churn, SIGTERM and SIGKILL.

Short versions, for CI (the whole file stays under ~3 minutes); the long ones
are in tests/test_soak.py. Covered elsewhere and not repeated here:
- a pod netns deleted between discovery and scrape:
  tests/test_lab_e2e.py::test_pod_namespace_vanishing_between_scrapes
- a VF's sysfs stats vanishing: tests/test_sriov.py::test_vf_whose_stats_vanish_is_skipped
"""
from __future__ import annotations

import collections
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from collector.discovery import Store
from collector.kube import ListWatch
from lab import topology
from lab.objects import NODE_NAME, lab_objects, pod_object
from tests.conftest import REPO, Collector, free_port, parse_metrics, series, unique_prefix, wait_for

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


# --- a collector with the BPF side tampered with, from outside the collector ----------

LAUNCHER = r"""
import ctypes, os, platform, struct, sys
objects = os.environ.get("PW_FAULT_EBPF_OBJECTS")
if objects:                      # collector/ebpf.py reads ebpf.loader.OBJECTS_DIR at load time
    import ebpf.loader
    ebpf.loader.OBJECTS_DIR = objects
mode = os.environ.get("PW_FAULT_ATTACH_MODE")
if mode:
    import collector.cli as cli
    _config = cli.config_from_args
    def config_from_args(args):
        config = _config(args)
        config.options["ebpf"] = {"attach_mode": mode}
        return config
    cli.config_from_args = config_from_args
if os.environ.get("PW_FAULT_DENY_BPF"):
    # seccomp: bpf(2) fails with EPERM, as under a container runtime's default profile
    nr = {"x86_64": 321, "aarch64": 280}[platform.machine()]
    insns = [(0x20, 0, 0, 0), (0x15, 0, 1, nr), (0x06, 0, 0, 0x00050001), (0x06, 0, 0, 0x7FFF0000)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in insns))
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    prog = Fprog(len(insns), ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp")
from collector.cli import main
sys.exit(main(sys.argv[1:]))
"""


class TamperedCollector(Collector):
    """`planewatch serve` started through LAUNCHER; the rest as conftest's Collector."""

    def __init__(self, *args: str, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = f"/tmp/planewatch-test-{self.port}.log"
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-c", LAUNCHER, "serve", "--web.listen-address", f"127.0.0.1:{self.port}", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env})


@pytest.fixture(scope="module")
def pods_file(lab, tmp_path_factory):
    from lab.objects import write_pods_file
    path = str(tmp_path_factory.mktemp("faults") / "pods.json")
    write_pods_file(lab, path)
    return path


@pytest.fixture(scope="module")
def ebpf_works():
    from ebpf.loader import Loader, LoadError
    try:
        Loader().close()
    except (LoadError, OSError) as err:
        pytest.skip(f"BPF unusable here: {err}")


def lab_interface_count(lab) -> int:
    return sum(len(ifaces) for ifaces in lab.addresses.values())


# --- the Kubernetes API: outage, restart, 410 ----------------------------------------

def status_pod(name: str, interfaces: list[str]) -> dict:
    status = [{"name": "k8s-pod-network", "interface": "eth0", "ips": ["10.99.0.1"], "default": True}]
    status += [{"name": "telco/signaling", "interface": i, "ips": [f"10.99.1.{n}"]}
               for n, i in enumerate(interfaces, 1)]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "faults",
                         "annotations": {"k8s.v1.cni.cncf.io/network-status": json.dumps(status)}},
            "spec": {"nodeName": NODE_NAME, "containers": [{"name": "app", "image": "registry.invalid/app"}]}}


def fault_pods(c: Collector) -> dict[str, set[str]]:
    """pod -> interfaces of the `faults` namespace, from pod_interface_info (no kernel needed)."""
    text = c.metrics()
    dupes = [k for k, n in collections.Counter(sample_keys(text)).items() if n > 1]
    assert not dupes, dupes
    out: dict[str, set[str]] = {}
    for labels in series(parse_metrics(text), "planewatch_pod_interface_info", namespace="faults"):
        out.setdefault(dict(labels)["pod"], set()).add(dict(labels)["interface"])
    return out


@pytest.mark.kube
def test_api_down_10s_then_back_relists_after_410(kube, collector_factory):
    ok = {200, 201}
    assert kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": "faults"}})[0] in ok | {409}
    for name, ifs in (("fa", ["net1"]), ("fb", ["net1"]), ("fc", [])):
        assert kube.request("POST", "/api/v1/namespaces/faults/pods", status_pod(name, ifs))[0] in ok
    c = collector_factory("--kubeconfig", kube.kubeconfig(), "--node-name", NODE_NAME, "--no-collector.ebpf")
    c.wait_ready()
    wait_for(lambda: fault_pods(c) == {"fa": {"eth0", "net1"}, "fb": {"eth0", "net1"}, "fc": {"eth0"}},
             what="the three pods")
    # A write the pod watch does not see: the restarted API server's watch cache
    # starts past the collector's resourceVersion, so its watch gets a 410.
    assert kube.request("POST", "/api/v1/namespaces/faults/configmaps",
                        {"metadata": {"name": f"bump-{time.time_ns()}"}})[0] in ok
    kube.stop_apiserver()
    try:
        down_until = time.monotonic() + 10
        while time.monotonic() < down_until:      # the node keeps serving what it knows
            assert set(fault_pods(c)) == {"fa", "fb", "fc"}
            time.sleep(1)
    finally:
        kube.start_apiserver()
    t0 = time.monotonic()
    assert kube.request("DELETE", "/api/v1/namespaces/faults/pods/fc?gracePeriodSeconds=0")[0] == 200
    assert kube.request("POST", "/api/v1/namespaces/faults/pods", status_pod("fd", ["net1", "net2"]))[0] in ok
    assert kube.request("DELETE", "/api/v1/namespaces/faults/pods/fa?gracePeriodSeconds=0")[0] == 200
    want = {"fb": {"eth0", "net1"}, "fd": {"eth0", "net1", "net2"}}
    wait_for(lambda: fault_pods(c) == want, timeout=30, interval=0.1, what="pod set after the restart")
    recovered = time.monotonic() - t0
    print(f"pod set correct {recovered:.1f} s after the API server was ready again")
    assert "relisting" in c.logs(), "expected a 410 (too old resource version) and a relist"
    assert recovered < 10, recovered
    for name in ("fb", "fd"):
        kube.request("DELETE", f"/api/v1/namespaces/faults/pods/{name}?gracePeriodSeconds=0")


class ScriptedResponse:
    """What the kubernetes client returns with _preload_content=False."""

    def __init__(self, data: bytes = b"", events: tuple = ()):
        self.data, self.events = data, events

    def stream(self, amt=None, decode_content=False):
        for event in self.events:
            yield json.dumps(event).encode() + b"\n"

    def release_conn(self):
        pass


def scripted_pod(name: str, rv: str) -> dict:
    return {**status_pod(name, ["net1"]), "metadata": {
        **status_pod(name, ["net1"])["metadata"], "uid": f"uid-{name}", "resourceVersion": rv}}


def test_watch_410_relists_and_drops_pods_deleted_meanwhile():
    """ERROR 410 mid-watch: relist, and pods deleted while the watch was away
    (no DELETED event ever seen) leave the store."""
    store = Store(NODE_NAME)
    lists = [{"metadata": {"resourceVersion": "10"}, "items": [scripted_pod("a", "5"), scripted_pod("b", "6")]},
             {"metadata": {"resourceVersion": "20"}, "items": [scripted_pod("a", "5"), scripted_pod("c", "11")]}]
    watches = [(
        {"type": "ADDED", "object": scripted_pod("c", "11")},
        {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                     "message": "too old resource version: 11 (15)"}},
    )]
    asked: list[str] = []
    stop = threading.Event()

    def call(**kwargs):
        if not kwargs.get("watch"):
            return ScriptedResponse(json.dumps(lists.pop(0)).encode())
        asked.append(kwargs["resource_version"])
        if not watches:
            stop.set()
            return ScriptedResponse()
        return ScriptedResponse(events=watches.pop(0))

    lw = ListWatch("pods", call, store.replace_pods, store.upsert_pod, store.delete_pod, stop=stop)
    worker = threading.Thread(target=lw.run, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert asked == ["10", "20"] and lw.relists == 2
    assert {p.name for p in store.view().pods} == {"a", "c"}


# --- a vanished pod netns and a stranger with the same IP ------------------------------

@pytest.mark.lab
def test_vanished_pod_is_not_reattributed_by_ip(root, collector_factory, tmp_path):
    """IPAM hands a freed IP to the next pod at once. A pod whose sandbox is gone
    (still in the API while terminating) must not be matched to a namespace that
    only shares its IP: its series would carry another pod's counters."""
    from lab.objects import write_pods_file
    own, stranger = unique_prefix("pwv"), unique_prefix("pwx")
    one = [topology.PodSpec("faults", "leaving", (("eth0", "default"), ("net1", "signaling")))]
    topology.down(own), topology.down(stranger)
    try:
        state = topology.up(own, one)
        topology.up(stranger, [topology.PodSpec("other", "newcomer", one[0].interfaces)])  # same IPs, other MACs
        path = str(tmp_path / "pods.json")
        write_pods_file(state, path)
        c = collector_factory("--pods-file", path, "--node-name", NODE_NAME, "--no-collector.ebpf")
        c.wait_ready()
        assert pods_with(parse_metrics(c.metrics()), "planewatch_interface_up") == {"leaving"}
        subprocess.run(["ip", "netns", "del", state.pod_ns["faults/leaving"]], check=True)
        parsed = parse_metrics(c.metrics())
        assert not pods_with(parsed, "planewatch_interface_up")
        assert list(series(parsed, "planewatch_pod_netns_resolved", pod="leaving").values()) == [0]
    finally:
        topology.down(own), topology.down(stranger)


# --- BPF refused ------------------------------------------------------------------------

def corrupt_objects(tmp_path) -> str:
    from ebpf.loader import OBJECTS_DIR, TRAFFIC_OBJECT
    out = tmp_path / "objects"
    shutil.copytree(OBJECTS_DIR, out)
    (out / TRAFFIC_OBJECT).write_bytes(b"\x7fELF" + b"\0" * 60 + b"not a BPF object")
    return str(out)


@pytest.mark.lab
@pytest.mark.parametrize("how, reason", [
    ("missing", "objects_missing"), ("corrupt", "load_failed"), ("seccomp", "permission_denied")])
def test_bpf_refused_scrape_still_serves_the_rest(how, reason, lab, pods_file, tmp_path, ebpf_works):
    if how == "seccomp" and platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("bpf(2) syscall number unknown here")
    env = {"missing": {"PW_FAULT_EBPF_OBJECTS": str(tmp_path / "nowhere")},
           "corrupt": {"PW_FAULT_EBPF_OBJECTS": corrupt_objects(tmp_path)},
           "seccomp": {"PW_FAULT_DENY_BPF": "1"}}[how]
    c = TamperedCollector("--pods-file", pods_file, "--node-name", NODE_NAME, env=env)
    try:
        c.wait_ready()
        for _ in range(2):            # the second scrape must not retry and fail differently
            parsed = parse_metrics(c.metrics())
        assert list(series(parsed, "planewatch_ebpf_up").values()) == [0]
        assert {dict(l)["reason"] for l in series(parsed, "planewatch_ebpf_info")} == {reason}
        assert not series(parsed, "planewatch_ebpf_interface_receive_packets_total")
        success = {dict(l)["collector"]: v for l, v in series(parsed, "planewatch_scrape_collector_success").items()}
        assert success["netlink"] == 1 and "ebpf" in success
        assert len(pods_with(parsed, "planewatch_interface_up")) == len(lab.pod_ns)
        assert not bpf_ids_held(c.proc.pid)["link_id"]
    finally:
        c.stop()


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


def check_hammer(c: Collector, seconds: float, p99_bound: float) -> dict:
    c.metrics()
    rss0 = rss_bytes(c.proc.pid)
    got = hammer(c.url, 50, seconds)
    print(f"50 scrapers x {seconds:.0f} s: {got['scrapes']} scrapes, p50 {got['p50'] * 1000:.0f} ms, "
          f"p99 {got['p99'] * 1000:.0f} ms, max {got['max'] * 1000:.0f} ms, "
          f"RSS {rss0 / MIB:.1f} -> {rss_bytes(c.proc.pid) / MIB:.1f} MiB")
    assert not got["errors"], got["errors"][:5]
    assert len(got["series_counts"]) == 1, got["series_counts"]   # the same pods all along
    assert got["p99"] < p99_bound, got
    assert c.get("/healthz")[0] == 200
    return got


@pytest.mark.lab
def test_50_concurrent_scrapers_10s(lab, pods_file, collector_factory):
    c = collector_factory("--pods-file", pods_file, "--node-name", NODE_NAME)
    c.wait_ready()
    check_hammer(c, 10, p99_bound=2.0)


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
            wait_for(lambda: pods_with(parse_metrics(c.metrics()), "planewatch_interface_up",
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


def check_churn(lab, pods_file: str, c: Collector, seconds: float, rss_tolerance: int) -> dict:
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
    assert after["rss"] <= before["rss"] + rss_tolerance, (before, after)
    assert not got["leftover_netns"], f"namespaces re-created: {got['leftover_netns']}"
    home = os.stat("/proc/self/ns/net").st_ino
    assert thread_netns_inodes(c.proc.pid) == {home}, "a thread stayed in a pod netns"
    return got


@pytest.mark.lab
def test_pod_churn_60s_returns_to_baseline(lab, pods_file, collector_factory, tmp_path):
    path = str(tmp_path / "pods.json")
    shutil.copy(pods_file, path)
    c = collector_factory("--pods-file", path, "--node-name", NODE_NAME)
    c.wait_ready()
    check_churn(lab, path, c, 60, rss_tolerance=8 * MIB)


# --- signals ------------------------------------------------------------------------------

def attached_collector(lab, pods_file: str, mode: str = "") -> Collector:
    env = {"PW_FAULT_ATTACH_MODE": mode} if mode else {}
    c = TamperedCollector("--pods-file", pods_file, "--node-name", NODE_NAME, env=env)
    c.wait_ready()
    wanted = lab_interface_count(lab)
    wait_for(lambda: list(series(parse_metrics(c.metrics()), "planewatch_ebpf_attached_interfaces").values())
             == [wanted], what=f"BPF on {wanted} interfaces")
    return c


def clsact_leftovers(lab) -> list[str]:
    found = []
    for netns in lab.pod_ns.values():
        qdiscs = subprocess.run(["tc", "-n", netns, "qdisc", "show"], capture_output=True, text=True).stdout
        if "clsact" in qdiscs:
            found.append(f"{netns}: {qdiscs.strip()}")
        for ifname in lab.addresses[next(k for k, v in lab.pod_ns.items() if v == netns)]:
            for hook in ("ingress", "egress"):
                out = subprocess.run(["tc", "-n", netns, "filter", "show", "dev", ifname, hook],
                                     capture_output=True, text=True).stdout.strip()
                if out:
                    found.append(f"{netns}/{ifname} {hook}: {out}")
    return found


def our_netns(lab) -> set[str]:
    return {n for n in os.listdir("/run/netns") if n.startswith(lab.prefix)}


@pytest.mark.lab
@pytest.mark.ebpf
@pytest.mark.parametrize("signal_name, mode", [("SIGTERM", ""), ("SIGKILL", ""), ("SIGTERM", "clsact")])
def test_signal_leaves_nothing_attached(signal_name, mode, lab, pods_file, ebpf_works):
    netns_before = our_netns(lab)
    c = attached_collector(lab, pods_file, mode)
    try:
        held = bpf_ids_held(c.proc.pid)
        assert len(held["link_id"]) >= (1 if mode else 1 + 2 * lab_interface_count(lab))
        if mode == "clsact":
            assert clsact_leftovers(lab), "clsact mode should show filters while running"
        t0 = time.monotonic()
        c.proc.send_signal(getattr(signal, signal_name))
        c.proc.wait(timeout=60)
        print(f"{signal_name} ({mode or 'auto'}): exited in {time.monotonic() - t0:.2f} s, "
              f"held {len(held['link_id'])} links / {len(held['prog_id'])} programs")
    finally:
        c.stop()
    wait_for(lambda: not (held["link_id"] & bpftool_ids("link")), timeout=30, what="our BPF links to go")
    wait_for(lambda: not (held["prog_id"] & bpftool_ids("prog")), timeout=30, what="our BPF programs to go")
    assert not clsact_leftovers(lab)
    assert our_netns(lab) == netns_before
