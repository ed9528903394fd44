"""Sources of numbers register here, node_exporter style.

Each source is a class registered with `@register("name")`; registration also
creates its `--collector.name` / `--no-collector.name` flag. A source is built
once with the run's `Config` and then asked, at every scrape, for the metric
families of the current `Snapshot`. It never reports its own health: the
scrape wrapper (exporters/metrics.py) times it and sets
`planewatch_scrape_collector_success{collector}`.

A source raises `NoData` (or returns nothing) for "not there" — that is not a
failure. Any other exception is a failure of that source only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol

from collector.model import Network, PodView


class NoData(Exception):
    """The source had nothing to report this time; not a failure."""


@dataclass(frozen=True)
class Paths:
    procfs: str = "/proc"
    sysfs: str = "/sys"
    netns: str = "/run/netns"


@dataclass
class Config:
    paths: Paths = field(default_factory=Paths)
    node_name: str = ""
    options: dict = field(default_factory=dict)     # source-specific settings


@dataclass(frozen=True)
class Snapshot:
    """What one scrape sees: the resolved pods on this node and the known NADs.

    `netns` gives sources access to kept-open namespaces (collector/netns.py
    `NetnsPool`); it is None in pure tests that need no kernel.
    """

    pods: tuple[PodView, ...]
    networks: Mapping[str, Network] = field(default_factory=dict)
    netns: object | None = None
    annotation_errors: Mapping[str, int] = field(default_factory=dict)
    plane_for_network: Callable[[str], str] = lambda network: ""
    budget_cuts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)   # collector/budgets.py
    budgets: object | None = None           # collector.budgets.Budgets; None: the defaults


class Source(Protocol):
    def collect(self, snapshot: Snapshot) -> Iterable: ...


@dataclass(frozen=True)
class SourceSpec:
    name: str
    factory: Callable[[Config], Source]
    default_enabled: bool
    help: str


SOURCES: dict[str, SourceSpec] = {}


def register(name: str, *, default_enabled: bool = True, help: str = ""):
    def wrap(cls):
        SOURCES[name] = SourceSpec(name, cls, default_enabled, help or (cls.__doc__ or "").strip().splitlines()[0])
        return cls
    return wrap


def load_builtin_sources() -> Mapping[str, SourceSpec]:
    """Import every source module so their @register calls run."""
    import collector.attachments  # noqa: F401
    import collector.netlink  # noqa: F401
    for optional in ("collector.sriov", "collector.rdma", "collector.ebpf", "collector.routes", "collector.health",
                     "collector.neighbours"):
        try:
            __import__(optional)
        except ModuleNotFoundError as err:
            if err.name != optional:
                raise
    return SOURCES
