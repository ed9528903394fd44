"""Which plane a network belongs to. First match wins:

1. the NAD's annotation `planewatch.io/plane`;
2. the plane map file (`--plane-map`): exact `ns/name` entries, then globs in
   file order;
3. the pod's default (cluster) network → `management` (the map's `default:`);
   every cluster-network entry counts, whether it carries `default: true` or not
   (KubeVirt's eth0 next to an override, OVN-K's eth0 next to a primary UDN:
   collector/netnames.py, docs/real-cnis.md);
4. otherwise `unclassified`.

Plane map file (YAML):

    default: management          # plane of each pod's cluster default network
    networks:
      telco/sig-macvlan: signaling
      "*/n3-*": data
      "storage/*": storage
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import yaml

from collector.model import UNCLASSIFIED

NAD_PLANE_ANNOTATION = "planewatch.io/plane"
DEFAULT_NETWORK_PLANE = "management"
_PLANE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class PlaneSelector:
    """The planes a flag names (`--collector.ebpf.flow-planes`,
    `--collector.neighbours.probe-planes`): comma-separated, each a whole plane
    name or a glob as in the plane map (`*`, `?`, `[...]`; plane names never hold
    those characters); case as written. Empty selects no plane (and is false)."""

    CACHED = 1024                       # planes come from NADs tenants write: bounded

    def __init__(self, names: str | Iterable[str] = ""):
        if isinstance(names, str):
            names = names.split(",")
        self.patterns = tuple(n.strip() for n in names if n.strip())
        self._regex = re.compile("|".join(map(fnmatch.translate, self.patterns))) if self.patterns else None
        self._seen: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return self._regex is not None

    def __call__(self, plane: str) -> bool:
        got = self._seen.get(plane)
        if got is None:
            got = self._regex is not None and self._regex.match(plane) is not None
            if len(self._seen) < self.CACHED:
                self._seen[plane] = got
        return got

    def __repr__(self) -> str:
        return f"PlaneSelector({','.join(self.patterns)!r})"


class PlaneMapError(ValueError):
    pass


@dataclass(frozen=True)
class PlaneMap:
    exact: Mapping[str, str] = field(default_factory=dict)
    globs: tuple[tuple[re.Pattern, str], ...] = ()
    default_network: str = DEFAULT_NETWORK_PLANE

    @classmethod
    def from_dict(cls, data) -> "PlaneMap":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise PlaneMapError("plane map must be a mapping with `networks:` (and optional `default:`)")
        unknown = set(data) - {"default", "networks"}
        if unknown:
            raise PlaneMapError(f"unknown keys in plane map: {sorted(unknown)}")
        default = data.get("default", DEFAULT_NETWORK_PLANE)
        networks = data.get("networks")
        networks = {} if networks is None else networks
        if not isinstance(networks, dict):
            raise PlaneMapError("`networks:` must map a network name or glob to a plane")
        exact, globs = {}, []
        for pattern, plane in [("default", default)] + list(networks.items()):
            if not isinstance(plane, str) or not _PLANE_NAME.match(plane):
                raise PlaneMapError(f"bad plane name {plane!r} for {pattern!r}")
        for pattern, plane in networks.items():
            pattern = str(pattern)
            if any(c in pattern for c in "*?["):
                globs.append((re.compile(fnmatch.translate(pattern)), plane))
            else:
                exact[pattern] = plane
        return cls(exact, tuple(globs), default)

    @classmethod
    def load(cls, path: str) -> "PlaneMap":
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(yaml.safe_load(f))
        except (OSError, yaml.YAMLError) as err:
            raise PlaneMapError(f"{path}: {err}") from err

    def plane_for(self, network: str, *, default: bool, nad_plane: str = "") -> str:
        if nad_plane:
            return nad_plane
        plane = self.exact.get(network)
        if plane:
            return plane
        for pattern, plane in self.globs:
            if pattern.match(network):
                return plane
        if default:
            return self.default_network
        return UNCLASSIFIED
