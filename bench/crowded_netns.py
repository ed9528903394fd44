"""Cost of a pod netns crowded with links and addresses (issue 13.9).

Creates one netns holding `--pairs` veth pairs (2 links each) and
`--addresses` IPv4 addresses spread over them, then times:
- a refresh of the namespace (links + addresses) within the default budgets
  and with unbounded budgets (what main did);
- the per-scrape counter read for two attached interfaces: one RTM_GETSTATS
  dump of the whole namespace against one request per attached interface.
Run as root: `.venv/bin/python bench/crowded_netns.py`. The netns is deleted
at the end, even on failure.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import tempfile
import time

from collector.budgets import Budgets
from collector.netns_pool import NetnsPool


def crowd(pairs: int, addresses: int) -> list[str]:
    """`ip -batch` lines: `pairs` veth pairs, `addresses` /32s spread over them."""
    lines = [f"link add a{i} type veth peer name b{i}" for i in range(pairs)]
    lines += [f"link set a{i} up" for i in range(min(pairs, 2))]
    links = [f"a{i}" for i in range(pairs)] + [f"b{i}" for i in range(pairs)]
    for n in range(addresses):
        lines.append(f"addr add 10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}/32 dev {links[n % len(links)]}")
    return lines


@contextlib.contextmanager
def scratch_netns(name: str, lines: list[str]):
    """A netns `name` made by `ip -batch` `lines`; its path, and the seconds that
    took. Deleted on the way out, whatever happened."""
    t0 = time.perf_counter()
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        with tempfile.NamedTemporaryFile("w", suffix=".batch") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            subprocess.run(["ip", "-n", name, "-batch", f.name], check=True)
        yield f"/run/netns/{name}", time.perf_counter() - t0
    finally:
        t1 = time.perf_counter()
        subprocess.run(["ip", "netns", "del", name], check=False)
        print(f"netns deleted in {time.perf_counter() - t1:.2f} s")


def time_refresh(path: str, budgets: Budgets, rounds: int) -> tuple[float, int, int, dict]:
    pool = NetnsPool(budgets)
    try:
        ns = pool.open(path)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            ns.refresh(time.monotonic())
            times.append(time.perf_counter() - t0)
        return statistics.median(times), len(ns.links), len(ns.addresses), dict(ns.short)
    finally:
        pool.close()


def time_stats(path: str, rounds: int) -> tuple[float, float]:
    pool = NetnsPool()
    try:
        ns = pool.open(path)
        ns.refresh(time.monotonic())
        wanted = sorted(l.ifindex for l in ns.links if l.name in ("a0", "a1"))
        dump, targeted = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            ns.rtnl.stats64()
            dump.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = ns.rtnl.stats64_of(wanted)
            targeted.append(time.perf_counter() - t0)
            assert sorted(got) == wanted
        return statistics.median(dump), statistics.median(targeted)
    finally:
        pool.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--addresses", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with scratch_netns(f"pwbench{os.getpid() % 10000}", crowd(args.pairs, args.addresses)) as (path, took):
        print(f"built {2 * args.pairs} links, {args.addresses} addresses in {took:.1f} s")
        unbounded = Budgets(netns_links=1 << 30, netns_addresses=1 << 30, netns_refresh_seconds=3600)
        for label, budgets in (("unbounded (main)", unbounded), ("default budgets", Budgets())):
            median, links, addrs, short = time_refresh(path, budgets, args.rounds)
            print(f"refresh {label}: median {median * 1000:.1f} ms, {links} links, {addrs} addresses read, "
                  f"cut short: {short or '-'}")
        dump, targeted = time_stats(path, args.rounds)
        print(f"counters of 2 attached interfaces: dump {dump * 1000:.2f} ms, per interface {targeted * 1000:.3f} ms")


if __name__ == "__main__":
    main()
