#!/usr/bin/env python3
"""From a pod's annotation written in the API to its series in /metrics.

A real kube-apiserver + etcd (tests/kubeapi.py), a lab of N pods whose
namespaces exist from the start, `planewatch serve --kubeconfig ...` watching
the node. Pods are then created one at a time; for each, /metrics is polled
every 20 ms until the pod's `planewatch_pod_interface_info` (discovery only)
and `planewatch_interface_up` (discovery + netns resolution + netlink) series
are there. Then each pod's network-status is patched to drop net3, and the
time until net3's series leave is taken the same way.

    sudo python3 bench/discovery_latency.py [--pods 20] [--no-ebpf]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scrape import free_port, patch_lab_addresses, percentile  # noqa: E402

POLL = 0.02
STATUS_KEY = "k8s.v1.cni.cncf.io/network-status"


def present(body: str, metric: str, pod: str, interface: str = "") -> bool:
    want = f'pod="{pod}"'
    iface = f'interface="{interface}"'
    for line in body.splitlines():
        if line.startswith(metric + "{") and want in line and (not interface or iface in line):
            return True
    return False


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def seen_at(url: str, predicate, timeout: float = 30.0) -> float:
    """perf_counter() when predicate(/metrics text) first held, polling every POLL."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if predicate(scrape(url)):
            return time.perf_counter()
        time.sleep(POLL)
    raise TimeoutError("series did not change in time")


def api_object(obj: dict) -> dict:
    obj = copy.deepcopy(obj)
    obj["metadata"].pop("uid", None)
    obj.pop("status", None)
    return obj


def post(kube, obj: dict) -> None:
    ns = obj["metadata"]["namespace"]
    if obj["kind"] == "Pod":
        path = f"/api/v1/namespaces/{ns}/pods"
    else:
        path = f"/apis/k8s.cni.cncf.io/v1/namespaces/{ns}/network-attachment-definitions"
    status, body = kube.request("POST", path, api_object(obj))
    if status not in (201, 409):
        raise RuntimeError(f"POST {path}: {status} {body}")


def measure(kube, state, url: str, core) -> dict[str, list[float]]:
    from lab.objects import lab_objects
    objs = lab_objects(state)
    for ns in {o["metadata"]["namespace"] for o in objs}:
        kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    pods = [o for o in objs if o["kind"] == "Pod" and not o["spec"].get("hostNetwork")]
    for nad in (o for o in objs if o["kind"] == "NetworkAttachmentDefinition"):
        post(kube, nad)
    times: dict[str, list[float]] = {"info": [], "interface_up": [], "patch": []}
    for obj in pods:
        name = obj["metadata"]["name"]
        t0 = time.perf_counter()
        post(kube, obj)
        info_at = seen_at(url, lambda b, name=name: present(b, "planewatch_pod_interface_info", name))
        up_at = seen_at(url, lambda b, name=name: present(b, "planewatch_interface_up", name, "eth0"))
        times["info"].append(info_at - t0)
        times["interface_up"].append(up_at - t0)
    for obj in pods:
        name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
        status = [e for e in json.loads(obj["metadata"]["annotations"][STATUS_KEY]) if e.get("interface") != "net3"]
        t0 = time.perf_counter()
        core.patch_namespaced_pod(name, ns, {"metadata": {"annotations": {STATUS_KEY: json.dumps(status)}}})
        gone_at = seen_at(url, lambda b, name=name: not present(b, "planewatch_interface_up", name, "net3"))
        times["patch"].append(gone_at - t0)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pods", type=int, default=20)
    p.add_argument("--no-ebpf", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    from kubernetes import client

    from lab import topology
    from lab.objects import NODE_NAME
    from tests.kubeapi import KubeAPIServer, kube_available

    reason = kube_available()
    if reason:
        print(f"no kube-apiserver: {reason}", file=sys.stderr)
        return 2
    patch_lab_addresses()
    prefix = f"pwk{os.getpid() % 10000:04d}"[:8]
    topology.down(prefix)
    state = topology.up(prefix, topology.scale_pods(args.pods))
    collector = None
    try:
        with KubeAPIServer() as kube:
            kube.create_nad_crd()
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "exporters", "serve", "--web.listen-address", f"127.0.0.1:{port}",
                   "--kubeconfig", kube.kubeconfig(), "--node-name", NODE_NAME, "--log.level", "warn"]
            collector = subprocess.Popen(cmd + (["--no-collector.ebpf"] if args.no_ebpf else []), cwd=REPO)
            wait_ready(url)
            times = measure(kube, state, url, client.CoreV1Api(kube.api_client()))
            print_times(times, args)
            collector.terminate()
            collector.wait(timeout=30)
    finally:
        if collector is not None and collector.poll() is None:
            collector.kill()
            collector.wait()
        topology.down(prefix)
    return 0


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("collector not ready")


def print_times(times: dict[str, list[float]], args) -> None:
    print(f"\n{args.pods} pods, 4 interfaces each, BPF {'off' if args.no_ebpf else 'on'}, /metrics polled every "
          f"{POLL * 1000:.0f} ms (latency includes up to one poll and one scrape)")
    labels = {"info": "create -> pod_interface_info", "interface_up": "create -> interface_up (netns resolved)",
              "patch": "patch (drop net3) -> net3 series gone"}
    for key, values in times.items():
        print(f"  {labels[key]:<42} p50 {percentile(values, 50) * 1000:6.0f} ms  p99 "
              f"{percentile(values, 99) * 1000:6.0f} ms  max {max(values) * 1000:6.0f} ms  "
              f"mean {statistics.fmean(values) * 1000:6.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
