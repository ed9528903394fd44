#!/usr/bin/env python3
"""ns/packet of the interface_traffic programs, measured in the kernel with
BPF_PROG_TEST_RUN (no traffic, no interfaces): the no-op program, counters
only, counters + header parse, + one flow-table lookup, and counters + flow
table on ingress and on egress: without the per-CPU flow cache (every packet
looks the table up: what a cache miss costs) and as attached (the repeated
packet hits the cache after its first run). The test packets come from
loopback, whose (netns, ifindex) gets a counter slot as an attached interface
does (ebpf/traffic_slots.py); "counters, no slot" is the same program with the
slot released: what an interface counted in the iface_traffic hash costs.
Also prints the load time and the RSS after load.

    sudo python3 bench/ebpf_prog_test_run.py [--repeat N] [--rounds R] [--objects DIR ...]

Needs root and `make -C ebpf`. The packet is a 98-byte Ethernet/IPv4/UDP frame.
With several `--objects` directories (e.g. ebpf/build of two checkouts), every
round runs every variant of every object set in turn, so load on a shared
machine hits all alike; the median and the spread (min-max) of the rounds are
printed per set.
"""
from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebpf import libbpf  # noqa: E402
from ebpf.loader import Loader  # noqa: E402
from kernel.nsenter import netns_inode  # noqa: E402

# (label, program, prime): `prime` first runs tcx_ingress once on the reversed
# frame, so the egress run finds its request in the flow table. Rows marked
# NO_SLOT run while loopback has no counter slot.
NO_SLOT = "counters, no slot (iface_traffic hash)"
VARIANTS = (
    ("no-op", "bench_noop", False),
    (NO_SLOT, "bench_counters", False),
    ("counters", "bench_counters", False),
    ("counters+parse", "bench_parse", False),
    ("counters+parse+lookup", "bench_lookup", False),
    ("counters+flows ingress, uncached", "bench_uncached_ingress", False),
    ("counters+flows egress, uncached", "bench_uncached_egress", False),
    ("counters+flows ingress", "tcx_ingress", False),
    ("counters+flows egress", "tcx_egress", False),
    ("counters+flows egress, reply", "tcx_egress", True),
)


def udp_frame(size: int = 98, reverse: bool = False) -> bytes:
    payload = b"\xab" * (size - 14 - 20 - 8)
    eth = bytes.fromhex("020000000001" "020000000002" "0800")
    ports, addrs = (40000, 5201), (bytes([10, 250, 0, 1]), bytes([10, 250, 0, 2]))
    if reverse:
        ports, addrs = ports[::-1], addrs[::-1]
    udp = struct.pack("!HHHH", *ports, 8 + len(payload), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(payload), 0, 0x4000, 64, 17, 0, *addrs)
    return eth + ip + udp + payload


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1_000_000, help="runs per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per variant (median kept)")
    parser.add_argument("--objects", nargs="+", default=[], help="object directories to compare (default ebpf/build)")
    args = parser.parse_args()

    rss_before = rss_mib()
    loaders = {}
    try:
        for objects in args.objects or [None]:
            started = time.perf_counter()
            loaders[objects or "ebpf/build"] = Loader(objects, bench=True) if objects else Loader(bench=True)
            load_ms = (time.perf_counter() - started) * 1000
            print(f"{objects or 'ebpf/build'}: load (both objects + BTF reasons) {load_ms:.0f} ms; "
                  f"RSS {rss_before:.1f} -> {rss_mib():.1f} MiB")
        frame = udp_frame()
        loopback = (netns_inode("/proc/self/ns/net"), 1)      # the test run's skb->dev
        runs: dict[tuple[str, str], list[int]] = {}
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                for label, program, prime in VARIANTS:
                    slots = getattr(loader, "slots", None)      # older builds have none
                    if slots is not None and label == NO_SLOT:
                        slots.release(loopback)
                    elif slots is not None:
                        slots.claim(loopback)
                    try:
                        fd = loader.program_fd(program)
                    except OSError:         # a variant this object does not have
                        continue
                    if prime:
                        libbpf.test_run(loader.program_fd("tcx_ingress"), udp_frame(reverse=True), 1)
                    retval, ns = libbpf.test_run(fd, frame, args.repeat)
                    assert retval in (0xFFFFFFFF, -1), retval     # TCX_NEXT: never a verdict of ours
                    runs.setdefault((name, label), []).append(ns)
        for name in loaders:
            print(f"== {name}")
            for label, _, _ in VARIANTS:
                ns = runs.get((name, label))
                if not ns:
                    continue
                print(f"{label:<40} {statistics.median(ns):>6.0f} ns/packet  (min {min(ns)}, max {max(ns)}; "
                      f"{args.rounds} x {args.repeat})")
    finally:
        for loader in loaders.values():
            loader.close()


if __name__ == "__main__":
    main()
