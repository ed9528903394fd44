"""Sources of numbers register here, node_exporter style.

A source is one module, collector/sources/<name>.py, holding one class decorated
with `@register("<name>", options=(...))`. Registration owns everything the
command line knows of the source: its `--collector.<name>` / `--no-collector.<name>`
switch and one `--collector.<name>.<option>` flag per `Option`, with its default
(node_exporter's `registerCollector` plus the collector's own kingpin flags). The
source reads its settings with `config.settings("<name>")`.

`load_sources()` imports every module of collector/sources/: a module that fails
to import fails the start, and one that registers no source of its own name is
an error too, so nothing is silently left out.

A source is built once with the run's `Config` and then asked, at every scrape,
for the metric families of the current `Snapshot`. It never reports its own
health: the scrape wrapper (exporters/metrics.py) times it and sets
`planewatch_scrape_collector_success{collector}`. A source raises `NoData` (or
returns nothing) for "not there" — that is not a failure. Any other exception is
a failure of that source only.
"""
from __future__ import annotations

import importlib
import operator
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol

from collector.budgets import Budgets
from collector.model import NetworkDefinition, PodView

if TYPE_CHECKING:
    from kernel.rtnl import LinkStats, RtnlSocket

SOURCES_PACKAGE = "collector.sources"


class NoData(Exception):
    """The source had nothing to report this time; not a failure."""


@dataclass(frozen=True)
class Paths:
    procfs: str = "/proc"
    sysfs: str = "/sys"
    netns: str = "/run/netns"


@dataclass(frozen=True)
class Option:
    """One setting of a source, and its `--collector.<source>.<flag>` flag.

    `type` parses the flag's text (and a text value given in a Config); `bool`
    makes a switch that is off by default. `default=None` means "decided by the
    source" (say so in `help`)."""

    key: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return self.key.replace("_", "-")

    def parse(self, value: Any) -> Any:
        if value is None or not isinstance(value, str) or self.type is str:
            return value
        if self.type is bool:
            return value.strip().lower() in ("1", "true", "yes", "on")
        return self.type(value)


@dataclass
class Config:
    paths: Paths = field(default_factory=Paths)
    node_name: str = ""
    # source name -> {option key: value}; keys left out take the Option's default
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def settings(self, source: str) -> dict[str, Any]:
        """Every option of `source`, as given or defaulted; a key the source did
        not register is an error (a typo must not pass as a default)."""
        spec = SOURCES[source]
        given = dict(self.options.get(source) or {})
        known = {o.key: o for o in spec.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"source {source}: unknown option(s) {unknown}; known: {sorted(known)}")
        return {key: o.parse(given[key]) if key in given else o.default for key, o in known.items()}


class PodNetns(Protocol):
    """What a source may use of a pod namespace kept open by the resolver
    (collector/netns_pool.py `Namespace`): its identity, a netlink socket bound in it,
    the link and address tables of the last refresh (within the netns budgets),
    and the counters of some links."""

    path: str
    inode: int
    fd: int
    rtnl: RtnlSocket
    by_index: dict[int, LinkStats]
    prefixes: list[tuple[int, str, int]]
    short: dict[str, int]
    read_cuts: dict[str, tuple[str, ...]]

    def reopen(self) -> None: ...

    def stats64(self, ifindexes: set[int]) -> dict[int, tuple[int, ...]]: ...

    def dump_cap(self, ifindexes: set[int]) -> int: ...

    def batch_socket(self) -> RtnlSocket: ...


class NetnsView(Protocol):
    def get(self, inode: int) -> PodNetns | None: ...


class NoNetns:
    """The view of pure tests and of a node with no kernel access: nothing open."""

    def get(self, inode: int) -> PodNetns | None:
        return None


@dataclass(frozen=True)
class Snapshot:
    """What one scrape sees: the resolved pods on this node and the known NADs.

    `netns` gives sources the kept-open pod namespaces (`netns_of`); pure tests
    leave it at `NoNetns()`.
    """

    pods: tuple[PodView, ...]
    networks: Mapping[str, NetworkDefinition] = field(default_factory=dict)
    netns: NetnsView = field(default_factory=NoNetns)
    annotation_errors: Mapping[str, int] = field(default_factory=dict)
    plane_for_network: Callable[[str], str] = lambda network: ""
    budget_cuts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)   # collector/budgets.py
    budgets: Budgets | None = None          # None: the defaults

    def netns_of(self, view: PodView) -> PodNetns | None:
        """The open namespace of a resolved pod; None when it has none (yet)."""
        return self.netns.get(view.netns_inode) if view.netns_inode else None


class Source(Protocol):
    def collect(self, snapshot: Snapshot) -> Iterable: ...


@dataclass(frozen=True)
class SourceSpec:
    name: str
    factory: Callable[[Config], Source]
    default_enabled: bool
    help: str
    options: tuple[Option, ...] = ()


SOURCES: dict[str, SourceSpec] = {}


def register(name: str, *, default_enabled: bool = True, help: str = "", options: Iterable[Option] = ()):
    """Class decorator: make `cls` the source `name`, with its flags."""
    def wrap(cls):
        known = SOURCES.get(name)
        if known is not None and known.factory.__qualname__ != cls.__qualname__:
            raise ValueError(f"source {name} registered twice: {known.factory.__module__} and {cls.__module__}")
        SOURCES[name] = SourceSpec(name, cls, default_enabled,
                                   help or (cls.__doc__ or "").strip().splitlines()[0], tuple(options))
        return cls
    return wrap


def source_modules() -> list[str]:
    """The module names under collector/sources/, sorted."""
    package = importlib.import_module(SOURCES_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def load_sources() -> Mapping[str, SourceSpec]:
    """Import every source module so their @register calls run. An import error
    propagates; a module that registers no source named after it is an error."""
    for name in source_modules():
        importlib.import_module(f"{SOURCES_PACKAGE}.{name}")
        if name not in SOURCES:
            raise RuntimeError(f"collector/sources/{name}.py registers no source {name!r}")
    return SOURCES


class SameObjects:
    """What a source works out from objects the collector hands out again while
    they are unchanged (the resolver's PodView while nothing in the pod changed,
    HopCache's next hops, an analysis until the next one): kept per key while
    `get` is given the very same objects (the value is `make(*objects)`),
    dropped for a key the last pass did not ask for (`sweep` ends a pass)."""

    def __init__(self) -> None:
        self._kept: dict[Any, tuple[tuple, Any]] = {}      # key -> (objects, value), of the last pass
        self._now: dict[Any, tuple[tuple, Any]] = {}       # what this pass asked for

    def get(self, key: Any, objects: tuple, make: Callable[..., Any]) -> Any:
        seen = self._now.get(key) or self._kept.get(key)
        if seen is None or len(seen[0]) != len(objects) or not all(map(operator.is_, seen[0], objects)):
            seen = (objects, make(*objects))
        self._now[key] = seen
        return seen[1]

    def sweep(self) -> None:
        self._kept, self._now = self._now, {}

    def clear(self) -> None:
        self._kept, self._now = {}, {}

    def __getitem__(self, key: Any) -> Any:
        """The value the last pass kept for `key`."""
        return self._kept[key][1]

    def __len__(self) -> int:
        return len(self._kept)
