"""`python -m lab up|down|run`: the lab on this machine, no cluster needed.

A development tool: it stands on the planewatch package (its `run` serves the
node collector on the lab) and is not part of the installed package or image."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from exporters.cli import add_serve_flags
from exporters.serve import build_server, serve_forever, setup_logging
from lab import topology
from lab.objects import NODE_NAME, write_pods_file


def parser() -> argparse.ArgumentParser:
    lab = argparse.ArgumentParser(prog="python -m lab",
                                  description="a lab of network namespaces shaped like Multus pods")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)

    def common(p):
        p.add_argument("--prefix", default="pwlab", help="name prefix of everything the lab makes")
        p.add_argument("--pods", type=int, default=0,
                       help="N scale pods with 4 interfaces each instead of the demo pods")
        p.add_argument("--ip-conflict", action="store_true",
                       help="give smf-d's net1 the same address as upf-a's (an IP conflict to find)")
        p.add_argument("--sriov-fixture", action="store_true",
                       help="add a DPDK pod whose SR-IOV VFs live in a fake sysfs tree (this kernel has no SR-IOV)")

    p_up = lab_sub.add_parser("up", help="create the lab and write its pods file")
    common(p_up)
    p_up.add_argument("--pods-file", default="", help="where to write the pods file")
    p_up.set_defaults(func=cmd_up)

    p_down = lab_sub.add_parser("down", help="remove everything the lab made")
    p_down.add_argument("--prefix", default="pwlab")
    p_down.set_defaults(func=cmd_down)

    p_run = lab_sub.add_parser("run", help="lab up, serve /metrics on it, lab down on Ctrl-C")
    common(p_run)
    add_serve_flags(p_run)
    p_run.set_defaults(func=cmd_run)
    return lab


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


def _pods(args):
    pods = topology.scale_pods(args.pods) if args.pods else topology.demo_pods()
    if args.ip_conflict:
        pods = topology.with_ip_conflict(pods)
    return pods + (topology.sriov_pods() if args.sriov_fixture else [])


def _sriov_sysfs(prefix: str) -> str:
    from lab.sriov_fixture import write_sriov_fixture
    root = os.path.join(topology.STATE_DIR, f"{prefix}-sysfs")
    write_sriov_fixture(root)
    return root


def _default_pods_file(prefix: str) -> str:
    return os.path.join(topology.STATE_DIR, f"{prefix}-pods.json")


def cmd_up(args) -> int:
    state = topology.up(args.prefix, _pods(args))
    path = args.pods_file or _default_pods_file(args.prefix)
    write_pods_file(state, path)
    topology.warm_up(state)
    print(f"lab {args.prefix}: {len(state.pod_ns)} pods; pods file {path}")
    if args.sriov_fixture:
        print(f"SR-IOV fixture sysfs: {_sriov_sysfs(args.prefix)} (serve with --path.sysfs pointing at it)")
    return 0


def cmd_down(args) -> int:
    removed = topology.down(args.prefix)
    print(f"lab {args.prefix}: removed {len(removed)} namespaces")
    return 0


def cmd_run(args) -> int:
    setup_logging(args.log_level)
    if os.geteuid() != 0:
        print("the lab needs root (network namespaces)", file=sys.stderr)
        return 2
    state = topology.up(args.prefix, _pods(args))
    try:
        args.pods_file = _default_pods_file(args.prefix)
        args.node_name = NODE_NAME
        if args.sriov_fixture:
            args.sysfs = _sriov_sysfs(args.prefix)
        write_pods_file(state, args.pods_file)
        topology.warm_up(state)
        server, feeds, ssl_context = build_server(args)
        scheme = "https" if ssl_context else "http"
        print(f"\nlab {args.prefix} is up: {len(state.pod_ns)} pods.\n"
              f"  curl -s {scheme}://{args.listen}/metrics | grep planewatch_interface_receive_packets\n"
              f"  curl -s {scheme}://{args.listen}/debug/attachments\n"
              f"  planewatch inspect --url {scheme}://{args.listen}\n"
              f"Whereabouts pool of the lab: planewatch cluster --pods-file {args.pods_file}\n"
              f"A few UDP datagrams per second flow between the lab's pods on every network.\n"
              f"Ctrl-C stops the collector and removes the lab.\n", flush=True)
        import threading
        stop_traffic = threading.Event()
        threading.Thread(target=topology.keep_traffic_flowing, args=(state, stop_traffic),
                         name="lab-traffic", daemon=True).start()
        try:
            asyncio.run(serve_forever(server, feeds, ssl_context, args.listen))
        finally:
            stop_traffic.set()
    finally:
        topology.down(args.prefix)
        print(f"lab {args.prefix}: removed", flush=True)
    return 0
