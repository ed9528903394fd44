"""The node collector's server, built from parsed flags (`build_server`), and
what both servers (node and cluster mode) run on: logging, the web config,
the guarded listener (`serve_forever`)."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys

from collector import __version__
from collector.registry import Config, Paths, load_sources

log = logging.getLogger("planewatch")


def setup_logging(level: str) -> None:
    logging.basicConfig(level={"warn": "WARNING"}.get(level, level.upper()), stream=sys.stderr,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r")


def source_dest(source: str, key: str = "") -> str:
    """The argparse dest of a source's switch (key "") or of one of its options."""
    return f"collector_{source}" + (f"__{key}" if key else "")


def config_from_args(args) -> Config:
    """Every registered source's settings from its `--collector.<name>.*` flags."""
    options = {name: {o.key: getattr(args, source_dest(name, o.key)) for o in spec.options}
               for name, spec in load_sources().items()}
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
    from collector.budgets import budgets_from_args
    from collector.discovery import Store
    from collector.netns import Resolver
    from collector.planes import PlaneMap
    from exporters.http import Server
    from exporters.httpstats import REFUSALS
    from exporters.metrics import Scraper

    plane_map = PlaneMap.load(args.plane_map) if args.plane_map else PlaneMap()
    budgets = budgets_from_args(args)
    store = Store(args.node_name, plane_map, budgets)
    feeds: list = []
    if args.pods_file:
        from collector.podsfile import PodsFile
        feeds.append(PodsFile(args.pods_file, store))
    else:
        from collector.kube import KubeFeed, api_client
        feeds.append(KubeFeed(store, api_client(args.kubeconfig or None), args.node_name))
    config = config_from_args(args)
    sources = {}
    for name, spec in sorted(load_sources().items()):
        if getattr(args, source_dest(name)):
            sources[name] = spec.factory(config)
    middlewares, ssl_context = web_security(args.web_config)
    ebpf = sources.get("ebpf")
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
    assert runner.server is not None        # set by setup()
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
