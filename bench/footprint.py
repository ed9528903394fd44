#!/usr/bin/env python3
"""Every footprint figure of issue 16 in one run, side by side, in API mode.

A lab of N pods × 4 interfaces (default 250: 1 000 pod interfaces), a real
kube-apiserver + etcd (tests/kubeapi.py) holding the lab's pods and NADs, and:

  planewatch          `planewatch serve --kubeconfig ...` from this tree, BPF on
  planewatch-base     the same from another checkout (`--base DIR`, e.g. the
                      commit before a change: `git archive <rev> | tar -x -C DIR`
                      then `make -C DIR/ebpf`), if given
  node_exporter       Debian's, netdev only, in a namespace of ours with as
                      many veth ends as the lab has pod interfaces

Figures, per planewatch build:
  first complete scrape  seconds from exec until /metrics first holds
                         planewatch_interface_up for every lab interface, until
                         BPF is attached to all of them, and until /readyz first
                         answers 200 (cold starts, ABBA order)
  scrape ratio           each round's planewatch latency / node_exporter's, the
                         targets scraped in turn round by round; median and spread
                         (the builds measured are fresh processes started together
                         after the cold starts, BPF attached, then settled)
  RSS                    VmRSS (and VmHWM) after the rounds
  datapath               bench/datapath.py with --objects of both builds
                         (`--datapath`; iperf3 TCP and UDP 64 B, interleaved),
                         the no-op hooks and the drops-only watch beside them

The machine's loadavg is printed at the start and the end: on a shared
machine read the spreads, not one number.

    sudo python3 bench/footprint.py [--pods 250] [--rounds 30] [--base DIR] [--datapath] [--gzip] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)
sys.path.insert(0, BENCH)

from scrape import (  # noqa: E402
    MIB,
    Target,
    cpu_seconds,
    free_port,
    make_reference_netns,
    memory,
    patch_lab_addresses,
    percentile,
    start_node_exporter,
    stop,
)

INTERFACES_PER_POD = 4
TARGETS = {"rss_mib": 60.0, "scrape_ratio": 0.5, "first_complete_s": 1.0, "tcp": 0.97, "udp64": 0.95}


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def interfaces_up(body: bytes) -> int:
    """Lab pod interfaces with a planewatch_interface_up series."""
    return sum(1 for line in body.splitlines() if line.startswith(b"planewatch_interface_up{"))


def attached(body: bytes) -> int:
    for line in body.splitlines():
        if line.startswith(b"planewatch_ebpf_attached_interfaces "):
            return int(float(line.split()[-1]))
    return 0


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_collector(tree: str, kubeconfig: str, port: int, log_path: str) -> subprocess.Popen:
    # the command moved from a `planewatch` package to `exporters` (issue 14); a
    # --base checkout from before that still has the old one
    module = "exporters" if os.path.exists(os.path.join(tree, "exporters", "__main__.py")) else "planewatch"
    cmd = [sys.executable, "-m", module, "serve", "--web.listen-address", f"127.0.0.1:{port}",
           "--kubeconfig", kubeconfig, "--node-name", "lab-node", "--log.level", "warn"]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, cwd=tree, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": tree})


def cold_start(name: str, tree: str, kubeconfig: str, want: int, workdir: str,
               timeout: float = 180.0) -> tuple[subprocess.Popen, Target, dict]:
    """Start a collector; seconds until its first complete /metrics and first /readyz 200.
    /metrics is polled back to back (each poll is a scrape), /readyz between polls."""
    port = free_port()
    t0 = time.perf_counter()
    proc = start_collector(tree, kubeconfig, port, os.path.join(workdir, f"{name}.log"))
    target = Target(name, proc.pid, port)
    out = {"complete_s": None, "ready_s": None, "first_answer_s": None, "partial_answers": 0, "bpf_complete_s": None}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and None in (out["complete_s"], out["ready_s"], out["bpf_complete_s"]):
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        if out["ready_s"] is None and ready(port):
            out["ready_s"] = time.perf_counter() - t0
        if out["complete_s"] is None or out["bpf_complete_s"] is None:
            try:
                target.scrape()
            except Exception:       # not listening yet, or 503 while not ready
                time.sleep(0.02)
                continue
            now = time.perf_counter() - t0
            if out["first_answer_s"] is None:
                out["first_answer_s"] = now
            if out["bpf_complete_s"] is None and attached(target.body) >= want:
                out["bpf_complete_s"] = now
            if out["complete_s"] is not None:
                time.sleep(0.2)
                continue
            if interfaces_up(target.body) >= want:
                out["complete_s"] = now
            else:
                out["partial_answers"] += 1
                if out["ready_s"] is not None and out["ready_s"] <= now:
                    out["ready_before_complete"] = True
        else:
            time.sleep(0.02)
    return proc, target, out


def wait_attached(targets: list[Target], procs: list[subprocess.Popen], want: int,
                  timeout: float = 180.0) -> None:
    """Until every collector (`targets`, run by `procs`) answers with BPF on
    `want` interfaces; a collector that exits fails it at once."""
    deadline = time.monotonic() + timeout
    waiting = list(targets)
    while waiting:
        if time.monotonic() > deadline:
            raise RuntimeError(f"BPF not on {want} interfaces within {timeout:.0f} s: {[t.name for t in waiting]}")
        for t, proc in zip(targets, procs):
            if proc.poll() is not None:
                raise RuntimeError(f"{t.name} exited with {proc.returncode} before BPF was on every interface")
        for t in list(waiting):
            try:
                t.scrape()
            except Exception:       # not listening yet, or 503 while not ready
                continue
            if attached(t.body) >= want:
                waiting.remove(t)
        time.sleep(0.5)


def scrape_rounds(targets: list[Target], ref: Target, rounds: int, warmup: int = 3) -> dict[str, dict]:
    for t in targets + [ref]:
        # the collectors close connections idle for long (the settle time): start afresh
        t.close()
        t._conn = None
    for _ in range(warmup):
        for t in targets + [ref]:
            t.scrape()
    cpu0 = {t.name: cpu_seconds(t.pid) for t in targets + [ref]}
    lat: dict[str, list[float]] = {t.name: [] for t in targets + [ref]}
    # RSS read after every round: one reading after the last round moved by
    # ±2 MiB between processes (the heap kept between trims, collector/memory.py)
    rss: dict[str, list[float]] = {t.name: [] for t in targets + [ref]}
    for r in range(rounds):
        order = targets + [ref]
        order = order[r % len(order):] + order[:r % len(order)]       # rotate who goes first
        for t in order:
            lat[t.name].append(t.scrape())
        for t in order:
            rss[t.name].append(memory(t.pid)["VmRSS"] / MIB)
    out = {}
    for t in targets + [ref]:
        mem = memory(t.pid)
        out[t.name] = {"p50_ms": percentile(lat[t.name], 50) * 1000, "p99_ms": percentile(lat[t.name], 99) * 1000,
                       "cpu_ms": (cpu_seconds(t.pid) - cpu0[t.name]) / rounds * 1000,
                       "rss_mib": mem["VmRSS"] / MIB, "hwm_mib": mem["VmHWM"] / MIB,
                       "rss_rounds_median_mib": statistics.median(rss[t.name]),
                       "rss_rounds_max_mib": max(rss[t.name]),
                       "series": sum(1 for line in t.body.splitlines() if line and not line.startswith(b"#")),
                       "wire_bytes": t.wire_bytes}
        if t is not ref:
            ratios = sorted(a / b for a, b in zip(lat[t.name], lat[ref.name]))
            out[t.name].update(ratio_median=statistics.median(ratios), ratio_p25=percentile(ratios, 25),
                               ratio_p75=percentile(ratios, 75),
                               ratio_of_medians=percentile(lat[t.name], 50) / percentile(lat[ref.name], 50))
    return out


def populate(kube, state) -> None:
    from discovery_latency import post

    from lab.objects import lab_objects
    objs = lab_objects(state)
    for ns in {o["metadata"]["namespace"] for o in objs}:
        kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    for obj in objs:
        if obj["kind"] == "NetworkAttachmentDefinition":
            post(kube, obj)
    for obj in objs:
        if obj["kind"] == "Pod" and not obj["spec"].get("hostNetwork"):
            post(kube, obj)


def datapath(trees: dict[str, str], rounds: int, seconds: int) -> str:
    objects = [os.path.join(tree, "ebpf", "build") for tree in trees.values()]
    cmd = [sys.executable, os.path.join(BENCH, "datapath.py"), "--rounds", str(rounds), "--seconds", str(seconds),
           "--noop", "--drops-only", "--objects", *objects]
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


def run(args) -> dict:
    from lab import topology
    from tests.kubeapi import KubeAPIServer, kube_available

    reason = kube_available()
    if reason:
        raise SystemExit(f"no kube-apiserver: {reason}")
    trees = {"planewatch": REPO}
    if args.base:
        trees = {"planewatch-base": os.path.abspath(args.base), **trees}
    patch_lab_addresses()
    prefix = f"pwf{os.getpid() % 10000:04d}"[:8]
    ref_ns = f"{prefix}-nx"
    want = args.pods * INTERFACES_PER_POD
    result: dict = {"pods": args.pods, "interfaces": want, "loadavg_start": loadavg(), "nproc": os.cpu_count(),
                    "gzip": args.gzip}
    print(f"nproc {os.cpu_count()}, loadavg {result['loadavg_start']}, {args.pods} pods x {INTERFACES_PER_POD}")
    procs: list[subprocess.Popen] = []
    live: dict[str, tuple] = {}         # name -> (process, target) of the cold starts
    targets: list[Target] = []
    workdir = tempfile.mkdtemp(prefix="pw-footprint-")
    topology.down(prefix)
    try:
        t0 = time.monotonic()
        state = topology.up(prefix, topology.scale_pods(args.pods))
        make_reference_netns(ref_ns, want)
        with KubeAPIServer() as kube:
            kube.create_nad_crd()
            populate(kube, state)
            print(f"lab, reference netns and API objects ready in {time.monotonic() - t0:.0f} s", flush=True)
            kubeconfig = kube.kubeconfig()
            cold: dict[str, list[dict]] = {name: [] for name in trees}
            names = list(trees)
            order = (names + names[::-1]) * ((args.cold_starts + 1) // 2)
            for i, name in enumerate(order[:args.cold_starts * len(names)]):
                if name in live:
                    live[name][1].close()
                    stop(live.pop(name)[0])
                proc, target, got = cold_start(name, trees[name], kubeconfig, want, workdir)
                live[name] = (proc, target)
                cold[name].append(got)
                print(f"cold start {i + 1} {name}: {got}", flush=True)
            # The measured rounds use fresh processes, started together: the cold
            # starts' survivors have different pasts (the earlier one lived through
            # the other's cold start, 1 000 attaches, and read ~3 MiB more RSS
            # whichever build it was: bench/RESULTS.md, session 5).
            for name in names:
                live[name][1].close()
                stop(live.pop(name)[0])
            fresh = []
            for name in names:
                port = free_port()
                proc = start_collector(trees[name], kubeconfig, port, os.path.join(workdir, f"{name}.log"))
                procs.append(proc)
                fresh.append(proc)
                targets.append(Target(name, proc.pid, port, gzip=args.gzip))
            wait_attached(targets, fresh, want)
            port = free_port()
            ne = start_node_exporter(ref_ns, port)
            procs.append(ne)
            ref = Target("node_exporter", ne.pid, port, netns=f"/run/netns/{ref_ns}", gzip=args.gzip)
            deadline = time.monotonic() + 30
            while True:
                try:
                    ref.scrape()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            # let BPF attach to every interface before the measured rounds (it runs
            # behind the scrapes and would otherwise be measured as scrape CPU)
            settle_until = time.monotonic() + args.settle
            while time.monotonic() < settle_until:
                time.sleep(1)
            result["scrape"] = scrape_rounds(targets, ref, args.rounds)
            result["cold"] = cold
            ref.close()
        if args.datapath:
            print("datapath (bench/datapath.py) ...", flush=True)
            result["datapath"] = datapath(trees, args.datapath_rounds, args.datapath_seconds)
    finally:
        for t in targets:
            t.close()
        for proc in procs + [p for p, _ in live.values()]:
            stop(proc)
        subprocess.run(["ip", "netns", "del", ref_ns], capture_output=True)
        topology.down(prefix)
    result["loadavg_end"] = loadavg()
    return result


def print_table(result: dict) -> None:
    scrape, cold = result["scrape"], result["cold"]
    names = [n for n in scrape if n != "node_exporter"]
    print(f"\n== {result['interfaces']} interfaces, API mode, BPF on; loadavg {result['loadavg_start']} -> "
          f"{result['loadavg_end']} on {result['nproc']} CPUs ==")
    print(f"{'figure':<44}" + "".join(f"{n:>26}" for n in names) + f"{'target':>12}")

    def row(label, cells, target=""):
        print(f"{label:<44}" + "".join(f"{c:>26}" for c in cells) + f"{target:>12}")
    row("RSS MiB after the rounds (peak)", [f"{scrape[n]['rss_mib']:.1f} ({scrape[n]['hwm_mib']:.1f})"
                                           for n in names], "<= 60")
    row("  after each round: median, max", [f"{scrape[n]['rss_rounds_median_mib']:.1f}, "
                                            f"{scrape[n]['rss_rounds_max_mib']:.1f}" for n in names])
    row("scrape / node_exporter, per round: median", [f"{scrape[n]['ratio_median']:.2f} "
                                                      f"[{scrape[n]['ratio_p25']:.2f}-{scrape[n]['ratio_p75']:.2f}]"
                                                      for n in names], "<= 0.5")
    row("  ratio of p50s", [f"{scrape[n]['ratio_of_medians']:.2f}" for n in names])
    row("  p50 / p99 ms", [f"{scrape[n]['p50_ms']:.1f} / {scrape[n]['p99_ms']:.1f}" for n in names])
    row("  CPU ms per scrape", [f"{scrape[n]['cpu_ms']:.1f}" for n in names])
    row("  series", [str(scrape[n]["series"]) for n in names])
    row("  bytes on the wire" + (" (gzip)" if result.get("gzip") else ""),
        [f"{scrape[n]['wire_bytes']:,}" for n in names])

    def cells(key):
        return [" / ".join("-" if c.get(key) is None else f"{c[key]:.2f}" for c in cold[n]) for n in names]
    row("first complete /metrics, s (each start)", cells("complete_s"), "<= 1")
    row("BPF on every interface, s", cells("bpf_complete_s"))
    row("first /readyz 200, s", cells("ready_s"))
    row("ready before complete?", [" / ".join("yes" if c.get("ready_before_complete") else "no"
                                               for c in cold[n]) for n in names], "no")
    ne = scrape["node_exporter"]
    print(f"node_exporter: p50 {ne['p50_ms']:.1f} ms, p99 {ne['p99_ms']:.1f} ms, CPU {ne['cpu_ms']:.1f} ms/scrape, "
          f"RSS {ne['rss_mib']:.1f} MiB, {ne['series']} series, {ne['wire_bytes']:,} bytes on the wire")
    if result.get("datapath"):
        print("\ndatapath:\n" + result["datapath"].split("medians", 1)[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pods", type=int, default=250)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--cold-starts", type=int, default=2, help="cold starts per build (ABBA order)")
    p.add_argument("--settle", type=float, default=40.0, help="seconds for BPF attach before the rounds")
    p.add_argument("--base", default="", help="another checkout to compare against (its ebpf/ built)")
    p.add_argument("--datapath", action="store_true", help="also run bench/datapath.py on both builds")
    p.add_argument("--datapath-rounds", type=int, default=4)
    p.add_argument("--datapath-seconds", type=int, default=5)
    p.add_argument("--gzip", action="store_true",
                   help="scrape with Accept-Encoding: gzip, as Prometheus does (both collectors compress)")
    p.add_argument("--json", default="", help="write every number here")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
