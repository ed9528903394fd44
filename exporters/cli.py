"""The `planewatch` command: serve, cluster, inspect."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from collector import __version__
from collector.registry import SourceSpec, load_sources
from exporters.serve import build_server, log, raise_fd_limit, serve_forever, setup_logging, source_dest

DEFAULT_LISTEN = "127.0.0.1:9808"


def add_serve_flags(p: argparse.ArgumentParser) -> None:
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
    from collector.budgets import add_budget_flags
    add_budget_flags(p)
    p.add_argument("--log.level", dest="log_level", default="info",
                   choices=["debug", "info", "warn", "error"])
    for _name, spec in sorted(load_sources().items()):
        add_source_flags(p, spec)


def add_source_flags(p: argparse.ArgumentParser, spec: SourceSpec) -> None:
    """`--collector.<name>` / `--no-collector.<name>` and the source's own options."""
    name = spec.name
    group = p.add_mutually_exclusive_group()
    group.add_argument(f"--collector.{name}", dest=source_dest(name), action="store_true",
                       default=spec.default_enabled,
                       help=f"enable the {name} collector: {spec.help} (default: "
                            f"{'enabled' if spec.default_enabled else 'disabled'})")
    group.add_argument(f"--no-collector.{name}", dest=source_dest(name), action="store_false",
                       help=argparse.SUPPRESS)
    for o in spec.options:
        flag, dest = f"--collector.{name}.{o.flag}", source_dest(name, o.key)
        if o.type is bool:
            p.add_argument(flag, dest=dest, action="store_true", default=o.default, help=o.help)
            continue
        default = "" if o.default is None else f" (default {o.default:g})" if isinstance(o.default, float) \
            else f" (default {o.default})" if o.default != "" else ""
        p.add_argument(flag, dest=dest, type=o.type, default=o.default, choices=o.choices or None,
                       metavar=None if o.choices else "VALUE",
                       help=o.help + default)


def add_web_limit_flags(p: argparse.ArgumentParser) -> None:
    """Caps on what an HTTP client can hold (exporters/listener.py)."""
    from exporters.httpstats import Limits  # not listener: no aiohttp import for --help
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
    from exporters.cluster import add_cluster_command
    from exporters.inspect import add_inspect_command

    parser = argparse.ArgumentParser(prog="planewatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"planewatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the collector and serve /metrics")
    add_serve_flags(serve)
    serve.set_defaults(func=cmd_serve)
    add_cluster_command(sub)
    add_inspect_command(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
