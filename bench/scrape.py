#!/usr/bin/env python3
"""Scrape cost of `planewatch serve` at scale, side by side with node_exporter.

For each pod count N: a lab of N pods with 4 interfaces each (eth0 veth to a
bridge, net1 macvlan, net2/net3 bridge ports), its pods file, and three targets
scraped in interleaved rounds (so machine load hits all of them alike):

  planewatch            `planewatch serve --pods-file ...` (BPF programs attached)
  planewatch-noebpf     the same with --no-collector.ebpf
  node_exporter         Debian's prometheus-node-exporter, netdev collector only,
                        run inside a namespace of ours holding N*4 veth ends

Printed per target: /metrics latency p50/p99 (ms), CPU ms per scrape (utime +
stime deltas of the process over the measured rounds), RSS and peak RSS (VmRSS,
VmHWM), series and bytes per response; then planewatch / node_exporter ratios.
`--profile S` records the planewatch collector with py-spy for S seconds of
back-to-back scrapes at the largest N and prints the top functions.

    sudo python3 bench/scrape.py [--pods 50 250] [--rounds 50] [--gzip] [--profile 20]

Everything made (lab namespaces, the node_exporter namespace, processes) is
removed on exit, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from kernel.nsenter import in_netns  # noqa: E402
from tests.ports import free_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20
NODE_EXPORTER = "prometheus-node-exporter"


# --- process and sample arithmetic (pure) ----------------------------------------------

def parse_proc_stat_cpu(text: str) -> float:
    """utime + stime in seconds from the text of /proc/<pid>/stat."""
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def parse_proc_status_memory(text: str) -> dict[str, int]:
    """VmRSS and VmHWM in bytes from the text of /proc/<pid>/status."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1]


def count_series(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def collector_durations(body: bytes) -> dict[str, float]:
    """planewatch_scrape_collector_duration_seconds by collector, from one response."""
    prefix = b'planewatch_scrape_collector_duration_seconds{collector="'
    out = {}
    for line in body.splitlines():
        if line.startswith(prefix):
            name, _, rest = line[len(prefix):].partition(b'"')
            out[name.decode()] = float(rest.split()[-1])
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return parse_proc_stat_cpu(f.read())


def memory(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return parse_proc_status_memory(f.read())


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- targets ---------------------------------------------------------------------------

@dataclass
class Target:
    """One /metrics endpoint scraped over a kept-alive connection, like Prometheus."""

    name: str
    pid: int
    port: int
    netns: str = ""                # connect from inside this netns (path), if set
    gzip: bool = False
    latencies: list[float] = field(default_factory=list)
    durations: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    body: bytes = b""
    wire_bytes: int = 0
    _conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        if self.netns:
            with in_netns(self.netns):          # the socket stays in that netns
                conn.connect()
        else:
            conn.connect()
        return conn

    def scrape(self) -> float:
        """One GET /metrics; returns the seconds it took (connection reused)."""
        if self._conn is None:
            self._conn = self._connect()
        headers = {"Accept-Encoding": "gzip"} if self.gzip else {}
        t0 = time.perf_counter()
        try:
            self._conn.request("GET", "/metrics", headers=headers)
            resp = self._conn.getresponse()
            raw = resp.read()
        except (http.client.HTTPException, OSError):
            self._conn.close()
            self._conn = None
            raise
        elapsed = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}: {raw[:200]!r}")
        self.wire_bytes = len(raw)
        if resp.getheader("Content-Encoding") == "gzip":
            import gzip
            raw = gzip.decompress(raw)
        self.body = raw
        return elapsed

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def wait_http(target: Target, timeout: float = 120.0) -> float:
    """Seconds until the first successful scrape (the cold one, BPF attach included)."""
    deadline = time.monotonic() + timeout
    t0 = time.perf_counter()
    last = None
    while time.monotonic() < deadline:
        try:
            target.scrape()
            return time.perf_counter() - t0
        except (OSError, http.client.HTTPException, RuntimeError) as err:
            last = err
            time.sleep(0.1)
    raise RuntimeError(f"{target.name} not answering after {timeout}s: {last}")


def start_planewatch(pods_file: str, port: int, log_path: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "exporters", "serve", "--web.listen-address", f"127.0.0.1:{port}",
           "--pods-file", pods_file, "--node-name", "lab-node", "--log.level", "warn", *extra]
    with open(log_path, "wb") as log:       # a file, not a pipe: a full pipe would block the collector
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def make_reference_netns(name: str, interfaces: int) -> None:
    """A namespace of ours with `interfaces` veth ends (pairs inside it), all up."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    pairs = (interfaces + 1) // 2
    batch = [f"link add nxa{i} type veth peer name nxb{i}" for i in range(pairs)]
    batch += ["link set lo up"] + [f"link set nxa{i} up\nlink set nxb{i} up" for i in range(pairs)]
    subprocess.run(["ip", "-n", name, "-batch", "-"], input="\n".join(batch) + "\n", text=True,
                   check=True, capture_output=True)


def start_node_exporter(netns: str, port: int) -> subprocess.Popen:
    # `ip netns exec` setns()es then execs, so the pid is node_exporter's own.
    return subprocess.Popen(["ip", "netns", "exec", netns, NODE_EXPORTER, "--collector.disable-defaults",
                             "--collector.netdev", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def print_log_tail(path: str, lines: int = 5) -> None:
    try:
        with open(path, errors="replace") as f:
            tail = f.read().splitlines()[-lines:]
    except OSError:
        return
    if tail:
        print(f"-- last lines of {os.path.basename(path)}:\n  " + "\n  ".join(tail))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- measuring -------------------------------------------------------------------------

def measure(targets: list[Target], rounds: int, warmup: int) -> dict[str, dict]:
    """Interleaved rounds over all targets; per-target numbers."""
    for _ in range(warmup):
        for t in targets:
            t.scrape()
    cpu0 = {t.name: cpu_seconds(t.pid) for t in targets}
    for _ in range(rounds):
        for t in targets:
            t.latencies.append(t.scrape())
            for name, secs in collector_durations(t.body).items():
                t.durations[name].append(secs)
    out = {}
    for t in targets:
        mem = memory(t.pid)
        lat = t.latencies
        out[t.name] = {
            "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
            "mean_ms": statistics.fmean(lat) * 1000,
            "cpu_ms_per_scrape": (cpu_seconds(t.pid) - cpu0[t.name]) / rounds * 1000,
            "rss_mib": mem["VmRSS"] / MIB, "hwm_mib": mem["VmHWM"] / MIB,
            "series": count_series(t.body), "bytes": len(t.body), "wire_bytes": t.wire_bytes,
            "fds": open_fds(t.pid),
            "collector_ms": {k: statistics.fmean(v) * 1000 for k, v in sorted(t.durations.items())},
        }
    return out


def print_results(n_pods: int, results: dict[str, dict], cold: dict[str, float]) -> None:
    print(f"\n== {n_pods} pods, {n_pods * 4} pod interfaces ==")
    cols = ("p50_ms", "p99_ms", "mean_ms", "cpu_ms_per_scrape", "rss_mib", "hwm_mib", "series", "bytes", "fds")
    print(f"{'target':<20}" + "".join(f"{c:>18}" for c in cols) + f"{'first_scrape_s':>16}")
    for name, r in results.items():
        cells = "".join(f"{r[c]:>18.1f}" if isinstance(r[c], float) else f"{r[c]:>18}" for c in cols)
        print(f"{name:<20}{cells}{cold.get(name, 0):>16.2f}")
    ref = results.get("node_exporter")
    for name, r in results.items():
        if r.get("collector_ms"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r["collector_ms"].items())
            print(f"  {name} per-collector ms (mean): {parts}")
        if ref and name != "node_exporter":
            ratios = {c: r[c] / ref[c] for c in ("p50_ms", "p99_ms", "cpu_ms_per_scrape", "rss_mib") if ref[c]}
            print(f"  {name} / node_exporter: " + ", ".join(f"{c} {v:.2f}" for c, v in ratios.items()))


# --- profiling -------------------------------------------------------------------------

def profile(target: Target, seconds: float, out_dir: str) -> str:
    """py-spy (raw collapsed stacks) on the target while it is scraped back to back."""
    raw = os.path.join(out_dir, f"pyspy-{target.name}.txt")
    spy = subprocess.Popen(["py-spy", "record", "-p", str(target.pid), "-d", str(int(seconds)), "-r", "250",
                            "--nonblocking", "--format", "raw", "-o", raw],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    scrapes = 0
    while spy.poll() is None:
        target.scrape()
        scrapes += 1
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {spy.stderr.read().decode()[-500:]}")
    print(f"\n== py-spy on {target.name}: {scrapes} scrapes in {seconds:.0f} s; raw stacks in {raw} ==")
    return raw


def summarise_stacks(lines: list[str], top: int = 18) -> tuple[list, list, int]:
    """(self-time top, inclusive top, total samples) from py-spy raw collapsed stacks."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return own.most_common(top), incl.most_common(top * 2), total


def _short_frame(frame: str) -> str:
    """`fn (path/to/file.py:123)` -> `fn (file.py)`: lines merged per function."""
    fn, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if parts[-2:-1] in (["collector"], ["exporters"], ["ebpf"]) else parts[-1]
    return f"{fn} ({short})"


def print_profile(raw: str) -> None:
    with open(raw) as f:
        own, incl, total = summarise_stacks(f.readlines())
    if not total:
        print("no samples")
        return
    print(f"{total} samples (threads not idle). Self time:")
    for frame, n in own:
        print(f"  {100 * n / total:5.1f}%  {frame}")
    print("Inclusive (project code and the big library calls):")
    for frame, n in incl:
        if any(k in frame for k in ("collector/", "exporters/", "ebpf/", "aiohttp", "zlib", "json")):
            print(f"  {100 * n / total:5.1f}%  {frame}")


# --- one pod count ---------------------------------------------------------------------

def patch_lab_addresses() -> None:
    """lab.topology.address gives 10.x.y.256..259 for pods 246..249 of every 250
    (10 + i % 250 overflows an octet). Until that is fixed there, use 240 hosts a /24."""
    from lab import topology
    if not topology.address(topology.NETWORKS["default"], 246).endswith(".256"):
        return
    original = topology.address

    def address(net, host: int, v6: bool = False) -> str:
        return original(net, host, v6) if v6 else f"10.{net.octet}.{host // 240}.{10 + host % 240}"
    topology.address = address


def run_size(n_pods: int, args, workdir: str) -> dict:
    from lab import topology
    from lab.objects import write_pods_file

    patch_lab_addresses()
    prefix = f"pwb{os.getpid() % 10000:04d}"[:8]
    ref_ns = f"{prefix}-nx"
    procs: list[subprocess.Popen] = []
    targets: list[Target] = []
    modes = [("planewatch", ()), ("planewatch-noebpf", ("--no-collector.ebpf",))]
    if args.no_ebpf:
        modes = modes[1:]
    topology.down(prefix)
    try:
        t0 = time.monotonic()
        state = topology.up(prefix, topology.scale_pods(n_pods))
        pods_file = os.path.join(workdir, f"pods-{n_pods}.json")
        write_pods_file(state, pods_file)
        make_reference_netns(ref_ns, n_pods * 4)
        print(f"\nlab of {n_pods} pods + reference netns built in {time.monotonic() - t0:.0f} s")

        for name, extra in modes:
            port = free_port()
            proc = start_planewatch(pods_file, port, os.path.join(workdir, f"{name}-{n_pods}.log"), *extra)
            procs.append(proc)
            targets.append(Target(name, proc.pid, port, gzip=args.gzip))
        if not args.no_node_exporter:
            port = free_port()
            proc = start_node_exporter(ref_ns, port)
            procs.append(proc)
            targets.append(Target("node_exporter", proc.pid, port, netns=f"/run/netns/{ref_ns}", gzip=args.gzip))
        cold = {t.name: wait_http(t) for t in targets}
        results = measure(targets, args.rounds, args.warmup)
        print_results(n_pods, results, cold)
        if args.profile and n_pods == max(args.pods):
            raw = profile(targets[0], args.profile, workdir)
            print_profile(raw)
            if args.keep_profile:
                shutil.copy(raw, args.keep_profile)
        return {"pods": n_pods, "interfaces": n_pods * 4, "results": results, "first_scrape_s": cold}
    finally:
        for t in targets:
            t.close()
        for proc in procs:
            stop(proc)
        for name, _ in modes:
            print_log_tail(os.path.join(workdir, f"{name}-{n_pods}.log"))
        subprocess.run(["ip", "netns", "del", ref_ns], capture_output=True)
        topology.down(prefix)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pods", type=int, nargs="+", default=[50, 250], help="pod counts (4 interfaces each)")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--gzip", action="store_true", help="ask for gzip, as Prometheus does")
    p.add_argument("--no-ebpf", action="store_true", help="skip the planewatch run with BPF")
    p.add_argument("--no-node-exporter", action="store_true")
    p.add_argument("--profile", type=float, default=0, help="py-spy seconds at the largest pod count")
    p.add_argument("--keep-profile", default="", help="copy the py-spy raw stacks here")
    p.add_argument("--json", default="", help="write all numbers to this file")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    if not args.no_node_exporter and not shutil.which(NODE_EXPORTER):
        print(f"{NODE_EXPORTER} missing (apt-get install {NODE_EXPORTER}) or pass --no-node-exporter")
        return 2
    if args.profile and not shutil.which("py-spy"):
        print("py-spy missing: pip install py-spy")
        return 2
    print(f"nproc {os.cpu_count()}, loadavg {open('/proc/loadavg').read().split()[:3]}, "
          f"rounds {args.rounds} (+{args.warmup} warm-up), gzip {args.gzip}")
    everything = []
    with tempfile.TemporaryDirectory(prefix="pw-bench-") as workdir:
        for n in args.pods:
            everything.append(run_size(n, args, workdir))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
