"""The `planewatch` command: serve, lab, inspect."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from collector import __version__
from collector.registry import Config, Paths, load_builtin_sources

log = logging.getLogger("planewatch")

DEFAULT_LISTEN = "127.0.0.1:9808"


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    sources = load_builtin_sources()
    p.add_argument("--web.listen-address", dest="listen", default=DEFAULT_LISTEN,
                   help=f"address to serve on (default {DEFAULT_LISTEN}; in a DaemonSet use :9808 or the pod IP)")
    p.add_argument("--web.config.file", dest="web_config", default="",
                   help="exporter-toolkit web config: TLS, basic auth, bearer token")
    add_web_limit_flags(p)
    p.add_argument("--health.max-scrape-seconds", dest="max_scrape_seconds", type=float, default=120.0,
                   help="/healthz fails while a collection has run longer than this (a hung "
                        "kernel read): the liveness probe then restarts the collector (default 120)")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""),
                   help="this node's name (default: $NODE_NAME); pods are watched with spec.nodeName=<it>")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", ""),
                   help="kubeconfig file (default: $KUBECONFIG, else in-cluster config unless --pods-file)")
    p.add_argument("--pods-file", default="",
                   help="read pods and NetworkAttachmentDefinitions from this JSON/YAML file instead of the API")
    p.add_argument("--plane-map", default="", help="YAML file mapping networks (exact ns/name or glob) to planes")
    p.add_argument("--path.procfs", dest="procfs", default="/proc", help="procfs mount point")
    p.add_argument("--path.sysfs", dest="sysfs", default="/sys", help="sysfs mount point")
    p.add_argument("--path.netns", dest="netns", default="/run/netns",
                   help="directory where the runtime pins pod network namespaces")
    p.add_argument("--collector.sriov.all-vfs", dest="sriov_all_vfs", action="store_true",
                   help="also export VFs no pod uses (pod=\"\", interface=<VF PCI address>)")
    p.add_argument("--collector.sriov.host-netns", dest="sriov_host_netns", default=None,
                   help="netns of the PFs for the netlink VF reader (default <procfs>/1/ns/net; "
                        "\"\" = the collector's own, e.g. with hostNetwork)")
    p.add_argument("--collector.neighbours.probe-planes", dest="probe_planes", default="",
                   help="comma list of planes whose gateways are probed (ARP/NDP from the pod's netns); "
                        "none by default")
    p.add_argument("--collector.neighbours.probe-rate", dest="probe_rate", type=float, default=10.0,
                   help="most probe packets per second, for the whole node (default 10)")
    p.add_argument("--collector.neighbours.probe-interval", dest="probe_interval", type=float, default=10.0,
                   help="seconds between two probes of one gateway (default 10)")
    from collector.budgets import add_budget_flags
    add_budget_flags(p)
    p.add_argument("--log.level", dest="log_level", default="info",
                   choices=["debug", "info", "warn", "error"])
    for name, spec in sorted(sources.items()):
        group = p.add_mutually_exclusive_group()
        group.add_argument(f"--collector.{name}", dest=f"collector_{name}", action="store_true",
                           default=spec.default_enabled,
                           help=f"enable the {name} collector: {spec.help} (default: "
                                f"{'enabled' if spec.default_enabled else 'disabled'})")
        group.add_argument(f"--no-collector.{name}", dest=f"collector_{name}", action="store_false",
                           help=argparse.SUPPRESS)


def add_web_limit_flags(p: argparse.ArgumentParser) -> None:
    """Caps on what an HTTP client can hold (exporters/listener.py)."""
    from exporters.httpstats import Limits      # not listener: no aiohttp import for --help
    d = Limits()
    p.add_argument("--web.max-connections", dest="web_max_connections", type=int,
                   default=d.max_connections, help=f"open connections at most (default {d.max_connections})")
    p.add_argument("--web.max-connections-per-client", dest="web_max_per_client", type=int,
                   default=d.max_per_client,
                   help=f"open connections at most from one client address (default {d.max_per_client})")
    p.add_argument("--web.read-timeout", dest="web_read_timeout", type=float, default=d.read_timeout,
                   help="seconds a connection may take to send a complete request, counted from "
                        f"accept or from the previous response; also the idle keep-alive time "
                        f"(default {d.read_timeout:g})")
    p.add_argument("--web.write-timeout", dest="web_write_timeout", type=float, default=d.write_timeout,
                   help="seconds a client may take to read a response before the connection is "
                        f"aborted (default {d.write_timeout:g})")


def web_limits(args):
    from exporters.httpstats import Limits
    return Limits(max_connections=args.web_max_connections, max_per_client=args.web_max_per_client,
                  read_timeout=args.web_read_timeout, write_timeout=args.web_write_timeout)


def setup_logging(level: str) -> None:
    logging.basicConfig(level={"warn": "WARNING"}.get(level, level.upper()), stream=sys.stderr,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r")


def config_from_args(args) -> Config:
    options = {"sriov_all_vfs": args.sriov_all_vfs,
               "neighbours": {"probe_planes": args.probe_planes, "probe_rate": args.probe_rate,
                              "probe_interval": args.probe_interval}}
    if args.sriov_host_netns is not None:
        options["host_netns"] = args.sriov_host_netns
    return Config(paths=Paths(procfs=args.procfs, sysfs=args.sysfs, netns=args.netns),
                  node_name=args.node_name, options=options)


def web_security(path: str) -> tuple[list, object]:
    """(aiohttp middlewares, ssl context) from a --web.config.file; none for ""."""
    if not path:
        return [], None
    from exporters.webconfig import load_web_config
    web_config = load_web_config(path)
    return [web_config.middleware], web_config.ssl_context()


def build_server(args):
    """Store, feeds, sources and the HTTP server from parsed flags. Raises on bad config."""
    from collector.discovery import Store
    from collector.netns import Resolver
    from collector.planes import PlaneMap
    from exporters.http import Server
    from exporters.metrics import Scraper

    from collector.budgets import budgets_from_args
    plane_map = PlaneMap.load(args.plane_map) if args.plane_map else PlaneMap()
    budgets = budgets_from_args(args)
    store = Store(args.node_name, plane_map, budgets)
    feeds = []
    if args.pods_file:
        from collector.podsfile import PodsFile
        feeds.append(PodsFile(args.pods_file, store))
    else:
        from collector.kube import KubeSource, api_client
        feeds.append(KubeSource(store, api_client(args.kubeconfig or None), args.node_name))
    config = config_from_args(args)
    sources = {}
    for name, spec in sorted(load_builtin_sources().items()):
        if getattr(args, f"collector_{name}"):
            sources[name] = spec.factory(config)
    middlewares, ssl_context = web_security(args.web_config)
    ebpf = sources.get("ebpf")
    from exporters.httpstats import REFUSALS
    scraper = Scraper(store, Resolver(args.netns, args.procfs, budgets=budgets), sources, __version__)
    scraper.extra.append(REFUSALS.families)
    scraper.extra.extend(f.families for f in feeds if hasattr(f, "families"))
    server = Server(scraper, middlewares=middlewares,
                    asymmetric_flows=getattr(ebpf, "top_asymmetric_flows", None),
                    max_scrape_seconds=args.max_scrape_seconds)
    return server, feeds, ssl_context


def parse_listen(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


async def serve_forever(server, feeds, ssl_context, listen: str, stop: asyncio.Event | None = None,
                        limits=None) -> None:
    import gc
    from aiohttp import web
    from exporters.listener import GuardedListener, Limits, harden_app

    # Everything imported and built so far lives as long as the process: keep it out
    # of the collector's generations so full collections stay short (scrape p99).
    gc.collect()
    gc.freeze()

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    for feed in feeds:
        feed.start()
    harden_app(server.app)
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    host, port = parse_listen(listen)
    listener = GuardedListener(runner.server, host, port, ssl_context, limits or Limits())
    await listener.start()
    log.info("listening on %s://%s:%d", "https" if ssl_context else "http", host, listener.port)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        for feed in feeds:
            feed.stop()
        await listener.stop()
        await runner.cleanup()


def raise_fd_limit() -> None:
    """Each pod netns holds 3 fds and each BPF hook 2: 1000 interfaces need ~3000,
    above the common soft limit of 1024. Raise the soft limit to the hard one."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as err:
            log.debug("RLIMIT_NOFILE stays %d: %s", soft, err)


def cmd_serve(args) -> int:
    setup_logging(args.log_level)
    from collector.memory import tune_malloc
    tune_malloc()
    from collector.caps import raise_effective
    raise_effective()
    raise_fd_limit()
    try:
        server, feeds, ssl_context = build_server(args)
    except Exception as err:
        log.error("cannot start: %s", err)
        return 2
    asyncio.run(serve_forever(server, feeds, ssl_context, args.listen, limits=web_limits(args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="planewatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"planewatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the collector and serve /metrics")
    add_serve_flags(serve)
    serve.set_defaults(func=cmd_serve)
    try:
        from lab.cli import add_lab_commands
        add_lab_commands(sub)
    except ModuleNotFoundError as err:
        if err.name not in ("lab", "lab.cli"):
            raise
    from collector.cluster import add_cluster_command
    from collector.inspect import add_inspect_command
    add_cluster_command(sub)
    add_inspect_command(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
