#!/usr/bin/env python3
"""What planewatch's BPF programs cost the datapath.

iperf3 between two lab pods (pod 0 -> pod 1 over eth0: veth, bridge, veth),
with and without the programs attached to every interface of both pods (the
kfree_skb program loaded too), in interleaved runs so machine load hits both
alike. Two loads: TCP (GSO-sized segments: throughput) and UDP with 64-byte
datagrams (per-packet cost shows). Then, if bench/ebpf_prog_test_run.py is
there, the per-packet cost measured in the kernel by BPF_PROG_TEST_RUN.

    sudo python3 bench/datapath.py [--rounds 12] [--seconds 4] [--no-udp] [--objects DIR ...]
                                   [--noop] [--drops-only] [--variants] [--no-profile] [--pin]

`--objects` compares several builds of the programs (ebpf/build directories of
two checkouts, say): each round runs "without" and every build, in an order
rotated round by round. Many short rounds rather than a few long ones: on a
shared machine the load drifts over minutes, and the figure that survives it
is the paired one, each build against the "without" run next to it in the same
round, as the median of those per-round ratios with its IQR.

Then, for each build, one run per load with the kernel's BPF run-time stats
on (bpf_enable_stats: what sysctl kernel.bpf_stats_enabled=1 does, held by
an fd and refcounted by the kernel, so the sysctl is never written and the
previous state is back when the fd closes, even if this script dies): the
programs' real ns per run, runs per packet (kfree_skb included: UDP at -b 0
overflows the receiver's socket buffer, and each dropped datagram runs it)
and their share of the CPU time.

With `--pin`, the sending CPU's busy time (/proc/stat ticks, steal excluded)
around each run is printed per datagram sent (per KB for TCP): that CPU runs
the whole path, so the without/with ratio of that cost is what the programs
take from a saturated sender, next to the throughput ratio.

`--noop` adds a mode with bench_noop on every hook: what the hooks and the
kfree_skb program cost with no work in the tc programs, i.e. the noise floor
of the ratios. `--drops-only` adds a mode with no tc program at all, the
interfaces only watched by the kfree_skb program: what an interface on a plane
outside `--collector.ebpf.flow-planes` costs. `--variants` adds bpf_stats runs with each bench variant
attached in place of the real programs, step by step as
bench/ebpf_prog_test_run.py measures them.

Needs root, iperf3 and `make -C ebpf`. Everything made is removed on exit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PORT = 5201


def iperf3(client_ns: str, server_ns: str, server_ip: str, seconds: int, udp: bool,
           pin: tuple[int, int] | None = None) -> dict:
    """One run; returns throughput and CPU numbers from iperf3's JSON. `pin`:
    (client CPU, server CPU) for iperf3 -A."""
    server_pin = ["-A", str(pin[1])] if pin else []
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_ip,
                               "-p", str(PORT), *server_pin], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        cmd = ["ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-p", str(PORT), "-t", str(seconds), "-J",
               *(["-A", str(pin[0])] if pin else [])]
        if udp:
            cmd += ["-u", "-b", "0", "-l", "64"]
        busy0 = cpu_busy_ticks(pin[0]) if pin else 0
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=seconds + 30).stdout
        busy = cpu_busy_ticks(pin[0]) - busy0 if pin else 0
    finally:
        try:
            server.wait(timeout=5)          # -1: the server leaves after one client
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    got = summarise(json.loads(out), udp)
    if pin:
        # the sending CPU's busy time per unit sent: it runs the whole path (both
        # tc programs, veth, bridge, the receive softirq), so this is the path's
        # cost, whatever the receiver or the scheduler did meanwhile
        busy_ns = busy * 1e9 / os.sysconf("SC_CLK_TCK")
        got["client_cpu_ns"] = busy_ns / (got["sent_packets"] if udp else got["bytes"] / 1000)
    return got


def cpu_busy_ticks(cpu: int) -> int:
    """Busy clock ticks of one CPU since boot: user, nice, system, irq, softirq
    (not idle, iowait, or steal: time the hypervisor gave someone else)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in line.split()[1:8])
                return user + nice + system + irq + softirq
    raise RuntimeError(f"cpu{cpu} not in /proc/stat")


def summarise(report: dict, udp: bool) -> dict:
    """Receiver-side numbers (what got through), from an iperf3 -J report."""
    end = report["end"]
    cpu = end.get("cpu_utilization_percent", {})
    if udp:
        s = end["sum"]
        received = s["packets"] - s.get("lost_packets", 0)
        sent = end.get("sum_sent", s)
        # received: what the server's socket took (at -b 0 the receiver, not
        # the path, is the bottleneck: most of the rest is dropped at its
        # socket); sent: what the sender's CPU pushed through the whole path
        # (veth, bridge, the ingress softirq all run on the sending CPU)
        return {"gbps": s["bits_per_second"] / 1e9, "mpps": received / s["seconds"] / 1e6,
                "sent_mpps": sent["packets"] / sent["seconds"] / 1e6, "packets": s["packets"],
                "sent_packets": sent["packets"],
                "lost_percent": s.get("lost_percent", 0.0), "cpu_sender": cpu.get("host_total", 0.0),
                "cpu_receiver": cpu.get("remote_total", 0.0)}
    s = end["sum_received"]
    return {"gbps": s["bits_per_second"] / 1e9, "bytes": s["bytes"], "cpu_sender": cpu.get("host_total", 0.0),
            "cpu_receiver": cpu.get("remote_total", 0.0)}


def pod_interfaces(netns: str) -> list[int]:
    from kernel.rtnl import RtnlSocket
    sock = RtnlSocket.open(f"/run/netns/{netns}")
    try:
        return [l.ifindex for l in sock.links() if l.name != "lo"]
    finally:
        sock.close()


def attach_all(loader, namespaces: list[str], programs: bool = True) -> int:
    """The programs on every pod interface; `programs=False`: watched for drops
    only, as an interface outside --collector.ebpf.flow-planes is."""
    count = 0
    for ns in namespaces:
        for ifindex in pod_interfaces(ns):
            (loader.attach if programs else loader.watch)(f"/run/netns/{ns}", ifindex)
            count += 1
    return count


def pinned_cpus() -> tuple[int, int]:
    """Two CPUs this process may run on, for the client and the server: pinned,
    the scheduler can neither put both on one CPU nor move the sender (whose CPU
    runs the whole path, softirqs included) in the middle of a run."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs two CPUs")
    return cpus[0], cpus[1]


def cpu_busy_ns() -> int:
    """Busy time of all CPUs since boot (everything but idle and iowait), ns."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def run(args) -> None:
    from ebpf.loader import Loader
    from lab import topology

    prefix = f"pwd{os.getpid() % 10000:04d}"[:8]
    topology.down(prefix)
    state = topology.up(prefix, topology.scale_pods(2))
    loader = None
    pin = pinned_cpus() if args.pin else None
    try:
        (k0, ns0), (k1, ns1) = list(state.pod_ns.items())
        server_ip = state.addresses[k1]["eth0"][0]
        loads = [("tcp", False)] + ([] if args.no_udp else [("udp64", True)])
        builds = {"with" if len(args.objects) < 2 else f"with {d}": d for d in args.objects or [""]}
        modes = ["without", *(["noop"] if args.noop else []), *(["drops"] if args.drops_only else []), *builds]
        results = {(load, mode): [] for load, _ in loads for mode in modes}
        last = (args.objects or [""])[-1]       # the build noop and drops load
        for r in range(args.rounds):
            # rotate which goes first, so none always runs on a warmer machine
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                if mode == "noop":
                    # the hooks and kfree_skb as in "with", the tc programs doing nothing
                    loader = Loader(last, bench=True) if last else Loader(bench=True)
                    loader.ingress_fd = loader.egress_fd = loader.program_fd("bench_noop")
                    attached = attach_all(loader, [ns0, ns1])
                elif mode == "drops":
                    loader = Loader(last) if last else Loader()
                    attached = attach_all(loader, [ns0, ns1], programs=False)
                elif mode != "without":
                    loader = Loader(builds[mode]) if builds[mode] else Loader()
                    attached = attach_all(loader, [ns0, ns1])
                note = ("" if mode == "without" else f" ({attached} interfaces watched, no tc program)"
                        if mode == "drops" else f" (BPF on {attached} interfaces)")
                for load, udp in loads:
                    got = iperf3(ns0, ns1, server_ip, args.seconds, udp, pin)
                    results[(load, mode)].append(got)
                    extra = f", {got['mpps']:.3f} Mpps received, {got['sent_mpps']:.3f} sent" if udp else ""
                    print(f"round {r + 1} {load:<6} {mode:<8} {got['gbps']:7.2f} Gbit/s{extra}"
                          f"{note}  loadavg {loadavg()}", flush=True)
                if loader is not None:
                    loader.close()
                    loader = None
        if args.rounds:
            print_summary(results, loads, modes[1:])
        if args.variants:
            for mode, objects in builds.items():
                profile_variants(mode, objects, [ns0, ns1], loads,
                                 lambda u: iperf3(ns0, ns1, server_ip, args.profile_seconds, u, pin))
        if not args.no_profile:
            for mode, objects in builds.items():
                loader = Loader(objects) if objects else Loader()
                attach_all(loader, [ns0, ns1])
                for load, udp in loads:
                    profile(loader, mode, load, udp, lambda u=udp: iperf3(ns0, ns1, server_ip,
                                                                           args.profile_seconds, u, pin))
                loader.close()
                loader = None
    finally:
        if loader is not None:
            loader.close()
        topology.down(prefix)


def print_summary(results: dict, loads: list, builds: list[str]) -> None:
    """Two views of the same runs. The paired one (each "with" against the
    "without" of its own round, which ran next to it) cancels load that
    drifts over minutes; its IQR says how far one round can be trusted."""
    print("\nmedians (gbps: TCP received; mpps: UDP datagrams received; sent_mpps: sent), "
          "min-max of the rounds in brackets:")
    for load, key in [(load, k) for load, udp in loads for k in (("mpps", "sent_mpps") if udp else ("gbps",))]:
        without = [g[key] for g in results[(load, "without")]]
        cpu_wo = statistics.median(g["cpu_receiver"] for g in results[(load, "without")])
        print(f"  {load:<6} without {statistics.median(without):.3f} {key} "
              f"[{min(without):.3f}-{max(without):.3f}], receiver CPU {cpu_wo:.0f}%")
        for mode in builds:
            with_ = [g[key] for g in results[(load, mode)]]
            cpu_w = statistics.median(g["cpu_receiver"] for g in results[(load, mode)])
            per_round = [w / wo for w, wo in zip(with_, without)]
            q1, q2, q3 = quartiles(per_round)
            below = sum(1 for x in per_round if x < 1)
            print(f"  {load:<6} {mode} {statistics.median(with_):.3f} {key} [{min(with_):.3f}-{max(with_):.3f}], "
                  f"receiver CPU {cpu_w:.0f}%\n"
                  f"         ratio of medians {statistics.median(with_) / statistics.median(without):.3f}; "
                  f"paired median of per-round ratios {q2:.3f} IQR [{q1:.3f}-{q3:.3f}] "
                  f"min-max [{min(per_round):.3f}-{max(per_round):.3f}], {below}/{len(per_round)} rounds < 1")
    for load, udp in loads:
        if "client_cpu_ns" not in results[(load, "without")][0]:
            continue            # not pinned: no one CPU runs the whole path
        unit = "datagram sent" if udp else "KB received"
        without = [g["client_cpu_ns"] for g in results[(load, "without")]]
        print(f"  {load:<6} without: sending CPU busy {statistics.median(without):.0f} ns per {unit}")
        for mode in builds:
            with_ = [g["client_cpu_ns"] for g in results[(load, mode)]]
            # as a throughput ratio: what the path's cost allows, the sending CPU saturated
            per_round = [wo / w for w, wo in zip(with_, without)]
            q1, q2, q3 = quartiles(per_round)
            print(f"  {load:<6} {mode}: {statistics.median(with_):.0f} ns per {unit}; "
                  f"without/with, paired median {q2:.3f} IQR [{q1:.3f}-{q3:.3f}], "
                  f"ratio of medians {statistics.median(without) / statistics.median(with_):.3f}")


def profile_variants(mode: str, objects: str, namespaces: list[str], loads, one_run) -> None:
    """The bench variants of interface_traffic (no-op, counters, + parse, +
    lookup; see bench/ebpf_prog_test_run.py) attached in place of the real
    programs, so each step's cost is seen on the real path (cold caches,
    real skbs) rather than on BPF_PROG_TEST_RUN's one hot packet."""
    from ebpf.loader import Loader

    steps = [(p, p) for p in ("bench_noop", "bench_counters", "bench_parse", "bench_lookup")]
    steps.append(("bench_uncached_ingress", "bench_uncached_egress"))
    for ingress, egress in steps:
        loader = Loader(objects, bench=True) if objects else Loader(bench=True)
        try:
            try:
                loader.ingress_fd, loader.egress_fd = loader.program_fd(ingress), loader.program_fd(egress)
            except OSError:             # an older build without this variant
                continue
            attach_all(loader, namespaces)
            label = ingress if ingress == egress else f"{ingress} / {egress}"
            for load, udp in loads:
                profile(loader, f"{mode} [{label}]", load, udp, lambda u=udp: one_run(u))
        finally:
            loader.close()


def profile(loader, mode: str, load: str, udp: bool, one_run) -> None:
    """One iperf3 run with the kernel's BPF run-time stats on: real ns per run
    of each program, runs per packet, and the programs' share of the CPU time
    the machine spent meanwhile (a lower bound on a shared machine: other
    work counts in the busy time). Stats cost two clock reads per run, so
    these runs are not used for the ratios."""
    from ebpf import libbpf

    programs = {"tc ingress": loader.ingress_fd, "tc egress": loader.egress_fd, "kfree_skb": loader.drop_fd}
    stats_fd = libbpf.enable_stats()
    try:
        before = {name: libbpf.run_stats(fd) for name, fd in programs.items()}
        traffic_before = sum(p for p, _ in loader.interface_traffic().values())
        drops_before = sum(loader.packet_drops().values())
        busy_before, wall_before = cpu_busy_ns(), time.monotonic_ns()
        got = one_run()
        busy, wall = cpu_busy_ns() - busy_before, time.monotonic_ns() - wall_before
        after = {name: libbpf.run_stats(fd) for name, fd in programs.items()}
        skbs = sum(p for p, _ in loader.interface_traffic().values()) - traffic_before
        watched_drops = sum(loader.packet_drops().values()) - drops_before
    finally:
        os.close(stats_fd)
    # what one unit of the load is: a datagram sent, or (TCP) a byte received
    units = got["packets"] if udp else got["bytes"]
    total_ns = 0
    print(f"\nbpf_stats, {mode}, {load} ({got['gbps']:.2f} Gbit/s with stats on; "
          f"{skbs} skbs through the tc programs, {watched_drops} drops on them; "
          f"CPU busy {busy / wall:.2f} of {os.cpu_count()} CPUs; "
          f"loadavg {loadavg()}):")
    for name, fd in programs.items():
        runs = after[name][0] - before[name][0]
        ns = after[name][1] - before[name][1]
        if name != "tc egress" or fd != programs["tc ingress"]:     # one program on both hooks: once
            total_ns += ns
        per = f"{runs / units:.3f} runs per datagram" if udp else f"{units / runs if runs else 0:,.0f} bytes per run"
        print(f"  {name:<10} {runs:>10} runs  {ns / runs if runs else 0:6.1f} ns/run  {per}")
    # of one CPU too: the sending CPU runs the whole path (both tc programs
    # and the drops), so when it is the bottleneck this is the most the
    # programs can take off the throughput
    print(f"  programs: {total_ns / 1e6:.1f} ms of {busy / 1e6:.0f} ms CPU busy = {100 * total_ns / busy:.2f} %, "
          f"{100 * total_ns / wall:.2f} % of one CPU"
          + (f"; {total_ns / units:.1f} ns per datagram sent, {busy / units:.0f} ns busy per datagram"
             if udp else f"; {total_ns / units * 1e3:.2f} ns per KB"))


def prog_test_run(objects: list[str]) -> None:
    script = os.path.join(REPO, "bench", "ebpf_prog_test_run.py")
    if not os.path.exists(script):
        print("\nbench/ebpf_prog_test_run.py not there: no in-kernel ns/packet numbers")
        return
    print("\nBPF_PROG_TEST_RUN (bench/ebpf_prog_test_run.py):", flush=True)
    subprocess.run([sys.executable, script] + (["--objects", *objects] if objects else []), check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--no-udp", action="store_true", help="TCP only")
    p.add_argument("--objects", nargs="+", default=[], help="BPF object directories to compare (default ebpf/build)")
    p.add_argument("--no-prog-test-run", action="store_true")
    p.add_argument("--no-profile", action="store_true", help="skip the bpf_stats runs")
    p.add_argument("--noop", action="store_true",
                   help="also a mode with bench_noop on every hook (and kfree_skb): what the hooks cost")
    p.add_argument("--drops-only", action="store_true",
                   help="also a mode with no tc program, the interfaces watched by kfree_skb only: "
                        "an interface outside --collector.ebpf.flow-planes")
    p.add_argument("--variants", action="store_true",
                   help="bpf_stats runs of each bench variant attached in place of the real programs")
    p.add_argument("--pin", action="store_true",
                   help="iperf3 client and server each on its own CPU (iperf3 -A): less spread between rounds")
    p.add_argument("--profile-seconds", type=int, default=5, help="length of each bpf_stats run")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    print(f"nproc {os.cpu_count()}, loadavg {loadavg()}, "
          f"{args.rounds} rounds x {args.seconds} s per load and mode")
    run(args)
    if not args.no_prog_test_run:
        prog_test_run(args.objects)
    return 0


if __name__ == "__main__":
    sys.exit(main())
