"""Cost of a pod netns whose owner wrote thousands of routes and rules.

Creates one netns with eth0 and net1 (veths), `--routes` routes via net1
through `--gateways` distinct gateways, a policy rule sending net1's own
address out by eth0 (so every route via net1 is a route mismatch) and
`--rules` more source rules, then times, with budgets too large to cut and
with the default ones:
- the next-hop dump behind the gateways (collector/sources/neighbours.py
  HopCache) and the gateways kept for net1;
- one routing analysis of the pod (collector/sources/routes.py read_pod +
  analyse): lookups asked, mismatch and policy-rule series, cut reasons.
Run as root: `.venv/bin/python bench/crowded_routes.py`. The netns is deleted
at the end, even on failure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crowded_netns import scratch_netns  # noqa: E402  (bench/, the script's own directory)

from collector.budgets import Budgets  # noqa: E402
from collector.model import Attachment, InterfaceView, Link, Pod, PodView  # noqa: E402
from collector.routes_analysis import Attached, analyse  # noqa: E402
from collector.sources.neighbours import GatewayPlan  # noqa: E402
from collector.sources.routes import read_pod  # noqa: E402
from kernel.rtnl import RtnlSocket  # noqa: E402
from kernel.rtnl_neighbours import next_hops_bounded  # noqa: E402


def misrouted(routes: int, gateways: int, rules: int) -> list[str]:
    """`ip -batch` lines: eth0 and net1, `routes` routes via net1 through
    `gateways` gateways, a rule sending net1's address out by eth0, `rules` more."""
    lines = ["link add eth0 type veth peer name peer0", "link add net1 type veth peer name peer1"]
    lines += [f"link set {link} up" for link in ("eth0", "peer0", "net1", "peer1")]
    lines += ["addr add 10.77.0.2/16 dev eth0", "addr add 10.78.0.2/16 dev net1",
              "route add default via 10.77.0.1 dev eth0 table 100", "rule add from 10.78.0.2 lookup 100"]
    for n in range(routes):
        g = n % gateways + 10
        prefix = f"{16 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}.0/24"
        lines.append(f"route add {prefix} via 10.78.{g >> 8}.{g & 255} dev net1")
    lines += [f"rule add from 10.99.{n >> 8 & 255}.{n & 255} lookup {1000 + n}" for n in range(rules)]
    return lines


def timed(fn, rounds: int):
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(label: str, budgets: Budgets, fd: int, view: PodView, atts, links: dict, rounds: int) -> None:
    def hops():
        with RtnlSocket.open(fd) as sock:       # a cut dump leaves its socket busy
            return next_hops_bounded(sock, budgets.netns_routes)

    def analysis():
        facts, probes, answers = read_pod(fd, "/proc", "evil", "p", atts, links, budgets)
        return facts, analyse(facts, answers, probes, budgets.pod_route_checks)

    t_hops, (got, more) = timed(hops, rounds)
    t_plan, plan = timed(lambda: GatewayPlan(view, got, budgets.attachment_gateways), rounds)
    kept = sum(len(found) for _, _, found, _ in plan.addresses)
    left = sum(n for _, n in plan.left_out)
    t_an, (facts, a) = timed(analysis, rounds)
    print(f"{label}:\n"
          f"  next hops: {t_hops * 1e3:.1f} ms for {len(got)} hops{' (cut)' if more else ''}; "
          f"gateway plan {t_plan * 1e3:.1f} ms: {kept} gateways kept, {left} left out\n"
          f"  routing analysis: {t_an * 1e3:.1f} ms, {a.probes} lookups, {len(a.mismatches)} mismatches, "
          f"{len(a.policy_rules)} policy rules shown, cut: {', '.join(facts.cut) or '-'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--routes", type=int, default=20000)
    ap.add_argument("--gateways", type=int, default=2000)
    ap.add_argument("--rules", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with scratch_netns(f"pwbenchr{os.getpid() % 10000}", misrouted(args.routes, args.gateways, args.rules)) \
            as (path, took):
        print(f"built {args.routes} routes via {args.gateways} gateways, {args.rules} rules "
              f"in {took:.1f} s; loadavg {os.getloadavg()[0]:.2f}")
        fd = os.open(path, os.O_RDONLY)
        try:
            with RtnlSocket.open(fd) as sock:
                links = {l.ifindex: l.name for l in sock.links()}
            index = {v: k for k, v in links.items()}
            eth0 = Attachment("evil", "p", "uid", "k8s-pod-network", "eth0", ips=("10.77.0.2/16",), plane="mgmt")
            net1 = Attachment("evil", "p", "uid", "evil/signaling", "net1", ips=("10.78.0.2/16",), plane="sig")
            interfaces = (InterfaceView(eth0, Link(index["eth0"], "eth0")),
                          InterfaceView(net1, Link(index["net1"], "net1")))
            view = PodView(Pod("evil", "p", "uid", attachments=(eth0, net1)), path, 0, "", interfaces)
            atts = (Attached(("evil", "p", "k8s-pod-network", "eth0", "mgmt"), "eth0", index["eth0"],
                             "k8s-pod-network", ("10.77.0.2/16",), (), True),
                    Attached(("evil", "p", "evil/signaling", "net1", "sig"), "net1", index["net1"],
                             "evil/signaling", ("10.78.0.2/16",)))
            unbounded = Budgets(netns_routes=1 << 30, pod_route_checks=1 << 30, attachment_gateways=1 << 30)
            for label, budgets in (("unbounded budgets", unbounded), ("default budgets", Budgets())):
                measure(label, budgets, fd, view, atts, links, args.rounds)
        finally:
            os.close(fd)

if __name__ == "__main__":
    main()
