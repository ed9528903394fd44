"""Faults and abuse: the API server going away, a 410 on the watch, BPF refused,
50 concurrent scrapers, pod churn, SIGTERM and SIGKILL.

Short versions, for CI (the whole file stays under ~3 minutes); the long ones
are in tests/test_soak.py, with the probes and load drivers both use.
Covered elsewhere and not repeated here:
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

import pytest

from collector.discovery import Store
from collector.kube import ListWatch
from lab import topology
from lab.objects import NODE_NAME
from tests.conftest import REPO, Collector, free_port, parse_metrics, series, unique_prefix, wait_for
from tests.test_soak import (  # noqa: F401
    bpf_ids_held,
    bpftool_ids,
    check_churn,
    check_hammer,
    pods_file,
    pods_with,
    sample_keys,
    wait_bpf_settled,
)

# --- a collector with the BPF side tampered with, from outside the collector ----------

LAUNCHER = r"""
import ctypes, os, platform, struct, sys
objects = os.environ.get("PW_FAULT_EBPF_OBJECTS")
if objects:                      # collector/sources/ebpf.py reads ebpf.loader.OBJECTS_DIR at load time
    import ebpf.loader
    ebpf.loader.OBJECTS_DIR = objects
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
from exporters.cli import main
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
    # The deadline only keeps a broken relist from hanging the run: the watch backs
    # off (doubling, capped at 30 s with jitter, as client-go's reflectors do) through
    # the outage and again on the 410, so the pod set may take up to the cap plus a
    # relist; how long it took is printed (a figure, not a test).
    wait_for(lambda: fault_pods(c) == want, timeout=75, interval=0.1, what="pod set after the restart")
    recovered = time.monotonic() - t0
    print(f"pod set correct {recovered:.1f} s after the API server was ready again")
    assert "relisting" in c.logs(), "expected a 410 (too old resource version) and a relist"
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


@pytest.mark.lab
def test_50_concurrent_scrapers_10s(lab, pods_file, collector_factory):
    c = collector_factory("--pods-file", pods_file, "--node-name", NODE_NAME)
    c.wait_ready()
    # every scrape must show the same series: not while BPF is still attaching
    wait_bpf_settled(c, lab_interface_count(lab))
    check_hammer(c, 10)


@pytest.mark.lab
def test_pod_churn_60s_returns_to_baseline(lab, pods_file, collector_factory, tmp_path):
    path = str(tmp_path / "pods.json")
    shutil.copy(pods_file, path)
    c = collector_factory("--pods-file", path, "--node-name", NODE_NAME)
    c.wait_ready()
    check_churn(lab, path, c, 60)


# --- signals ------------------------------------------------------------------------------

def attached_collector(lab, pods_file: str, mode: str = "") -> Collector:
    mode_flag = ("--collector.ebpf.attach-mode", mode) if mode else ()
    c = TamperedCollector("--pods-file", pods_file, "--node-name", NODE_NAME, *mode_flag, env={})
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
