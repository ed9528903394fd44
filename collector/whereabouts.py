"""Whereabouts IP pools: parsing and pool arithmetic (pure, never raises on input).

Upstream facts this follows (k8snetworkplumbingwg/whereabouts):
- IPPool `spec.range` is a CIDR and `spec.allocations` maps a decimal offset to
  {id, podref "ns/name", ifname?, ipamclaimref?}
  (pkg/api/whereabouts.cni.cncf.io/v1alpha1/ippool_types.go). Offsets count from
  the address written in `spec.range` (`pool.ParseCIDR()`'s IP); whereabouts always
  writes the network address there. Keys that are not integers are skipped
  upstream (pkg/storage/kubernetes/ipam.go, toIPReservationList): here they are
  counted as invalid entries.
- A pool is named `normalizeRange(range)` (":" and "/" become "-"), prefixed with
  `<network_name>-` when the IPAM config names its network (ipam.go, IPPoolName);
  pools live in whereabouts' own namespace, not the NAD's. Node-slice pools are
  named `<network_name>-<node>-<slice>` (`<node>-<slice>` without network_name).
- Allocations written before whereabouts recorded `podref` (before v0.5) have only
  an `id`: legitimate, never "leaked" (nothing says which pod), not invalid.
- Exclusions live in the NAD, not the pool: pools are matched to NADs by (range as a
  network, network_name). Several NADs on one pool (same range, different namespaces)
  share it: the pool's allocatable set is the union of theirs. A pool no NAD matches
  is sized by its own range alone (network label "").

What a NAD's config allows: collector/whereabouts_ranges.py; the families:
collector/whereabouts_metrics.py.

Sizes are exact Python integers (an IPv6 /64 has 2**64 - 2); the exposition prints
them exactly and Prometheus stores float64, so pools above 2**53 addresses lose
precision there. Nothing is capped: a cap would make `size` and `free` lie.
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Set

from collector.intervals import contains, count, merge
from collector.whereabouts_ranges import RangeConfig, Subnet, usable_bounds

GROUP, VERSION = "whereabouts.cni.cncf.io", "v1alpha1"
IPPOOL_PLURAL = "ippools"
RESERVATION_PLURAL = "overlappingrangeipreservations"

# invalid_entries reasons (bounded: they are label values).
INVALID_RANGE = "invalid_range"              # spec.range is not a CIDR
INVALID_OFFSET = "invalid_offset"            # an allocations key is not a non-negative decimal
OFFSET_OUT_OF_RANGE = "offset_out_of_range"  # the offset lands outside spec.range
INVALID_ALLOCATION = "invalid_allocation"    # an allocations value is not an object
INVALID_PODREF = "invalid_podref"            # podref is not "namespace/name"

# Go's strconv.ParseInt(s, 10, 64) syntax; Python's int() also takes "1_0", " 1", "١".
DECIMAL = re.compile(r"^[+-]?[0-9]+$")


# ---------------------------------------------------------------- pools

def normalize_range(text: str) -> str:
    """Upstream's normalizeRange: the pool name of an unnamed network."""
    if text.endswith(":"):
        text += "0"
    return text.replace(":", "-").replace("/", "-")


def pool_network_name(pool_name: str, net: Subnet, range_text: str) -> str | None:
    """The IPAM network_name a pool's name encodes; None when the name encodes no range."""
    for norm in {normalize_range(str(net)), normalize_range(range_text)}:
        if pool_name == norm:
            return ""
        if pool_name.endswith("-" + norm):
            return pool_name[: -len(norm) - 1]
    return None


@dataclass(frozen=True)
class Allocation:
    address: int
    podref: str                 # "namespace/name", "" when malformed
    claimed: bool = False       # owned by an IPAMClaim: the pod may come and go


@dataclass
class Pool:
    key: str                    # "namespace/name" of the IPPool
    range_text: str
    network: Subnet | None
    network_name: str | None = None
    allocations: list[Allocation] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)


def _podref(value: object) -> str:
    if not isinstance(value, str):
        return ""
    ns, sep, name = value.strip().partition("/")
    return f"{ns}/{name}" if sep and ns and name and "/" not in name else ""


def _mapping(obj: Mapping, key: str) -> Mapping:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def parse_pool(obj: Mapping) -> Pool:
    """An IPPool object (JSON dict) → Pool. Malformed parts are counted, never raised."""
    meta, spec = _mapping(obj, "metadata"), _mapping(obj, "spec")
    name = str(meta.get("name", ""))
    key = f"{meta.get('namespace', '')}/{name}"
    range_text = spec.get("range")
    if not isinstance(range_text, str):
        range_text = ""
    try:
        iface = ipaddress.ip_interface(range_text.strip())
    except ValueError:
        return Pool(key, range_text, None, errors=Counter({INVALID_RANGE: 1}))
    net = iface.network
    pool = Pool(key, range_text, net, pool_network_name(name, net, range_text.strip()))
    allocations = spec.get("allocations")
    for offset, owner in (allocations.items() if isinstance(allocations, dict) else ()):
        if not DECIMAL.match(str(offset)) or int(offset) < 0:
            pool.errors[INVALID_OFFSET] += 1
            continue
        address = int(iface.ip) + int(offset)
        if address > int(net.broadcast_address):
            pool.errors[OFFSET_OUT_OF_RANGE] += 1
            continue
        if not isinstance(owner, dict):
            pool.errors[INVALID_ALLOCATION] += 1
            continue
        podref = _podref(owner.get("podref"))
        if not podref and owner.get("podref") not in (None, ""):   # absent: written before podref existed
            pool.errors[INVALID_PODREF] += 1
        pool.allocations.append(Allocation(address, podref, bool(owner.get("ipamclaimref"))))
    return pool


@dataclass(frozen=True)
class PoolStats:
    pool: str
    range: str
    network: str                # the matching NADs, "ns/name" sorted and comma-joined
    size: int                   # allocatable addresses
    allocated: int              # allocations inside the range
    free: int                   # allocatable addresses not allocated
    leaked: int                 # allocations whose podref pod does not exist

    @property
    def labels(self) -> tuple[str, str, str]:
        return self.pool, self.range, self.network


def index_ranges(configs: Iterable[RangeConfig]) -> dict[tuple[Subnet, str], list[RangeConfig]]:
    index: dict[tuple[Subnet, str], list[RangeConfig]] = {}
    for rc in configs:
        index.setdefault((rc.network, rc.network_name), []).append(rc)
    return index


def matching_ranges(pool: Pool, index: Mapping[tuple[Subnet, str], list[RangeConfig]]) -> list[RangeConfig]:
    if pool.network is None:
        return []
    if pool.network_name is not None:
        found = list(index.get((pool.network, pool.network_name), ()))
        return found or slice_ranges(pool, index)
    return [rc for (net, _), rcs in index.items() if net == pool.network for rc in rcs]


def slice_ranges(pool: Pool, index: Mapping[tuple[Subnet, str], list[RangeConfig]]) -> list[RangeConfig]:
    """Node-slice configs a `<network_name>-<node>-<slice>` (or `<node>-<slice>`) pool belongs to."""
    prefix, own = pool.network_name or "", pool.network
    if own is None:
        return []
    return [rc for (net, name), rcs in index.items() for rc in rcs
            if rc.slice_prefix == own.prefixlen and net.version == own.version
            and own.subnet_of(net)  # type: ignore[arg-type]  # same version, checked first
            and prefix and (not name or prefix.startswith(name + "-"))]


def pool_stats(pool: Pool, index: Mapping[tuple[Subnet, str], list[RangeConfig]],
               pods: Set[str], small_ranges: bool = False) -> PoolStats | None:
    """Numbers for one pool; None when its range is unusable."""
    if pool.network is None:
        return None
    configs = matching_ranges(pool, index)
    own = usable_bounds(pool.network, small_ranges)
    if configs and all(rc.slice_prefix is not None and rc.network != pool.network for rc in configs):
        allocatable = [own] if own else []          # a node's slice: all of it
    elif configs:
        allocatable = merge(iv for rc in configs for iv in rc.allocatable(small_ranges))
    else:
        allocatable = [own] if own else []
    size = count(allocatable)
    taken = {a.address for a in pool.allocations if contains(allocatable, a.address)}
    leaked = sum(1 for a in pool.allocations if a.podref and not a.claimed and a.podref not in pods)
    return PoolStats(pool.key, pool.range_text, ",".join(sorted({rc.nad for rc in configs})),
                     size, len(pool.allocations), max(0, size - len(taken)), leaked)


@dataclass(frozen=True)
class Reservation:
    """An OverlappingRangeIPReservation: one IP held across overlapping ranges."""
    key: str
    podref: str
    claimed: bool = False


def parse_reservation(obj: Mapping) -> Reservation:
    meta, spec = _mapping(obj, "metadata"), _mapping(obj, "spec")
    return Reservation(f"{meta.get('namespace', '')}/{meta.get('name', '')}",
                       _podref(spec.get("podref")), bool(spec.get("ipamclaimref")))
