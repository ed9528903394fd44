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
  pools live in whereabouts' own namespace, not the NAD's.
- Allocatable addresses (pkg/iphelpers GetIPRange, pkg/allocate IterateForAssignment):
  the range without its network and last ("broadcast") address, IPv6 included.
  A range with fewer than two usable addresses (/31, /32, /127, /128) is refused
  through v0.9.x (iphelpers: "net mask is too short"), after the IPPool object was
  created: such a pool exists with size 0. Forks that hand out both addresses of a
  /31 (RFC 3021) and the one of a /32 are read that way only with
  `small_ranges=True` (`planewatch cluster --whereabouts.small-ranges`). `range_start`/`range_end` are
  honoured only inside those bounds (range_end also not below the start); every
  address of an `exclude` CIDR (or bare IP) is skipped. The top-level `exclude`,
  `range_start`, `range_end` belong to the top-level `range` only; each `ipRanges[]`
  entry carries its own. `range: "A-B/len"` means start A, end B.
- Node-slice ("fast IPAM", `node_slice_size`) pools are named
  `<network_name>-<node>-<slice>` (`<node>-<slice>` without network_name) and span
  one node's slice of the NAD's range; every usable address of the slice is
  allocatable (exclude is not applied in that mode upstream).
- Allocations written before whereabouts recorded `podref` (before v0.5) have only
  an `id`: legitimate, never "leaked" (nothing says which pod), not invalid.
- Exclusions live in the NAD, not the pool: pools are matched to NADs by (range as a
  network, network_name). Several NADs on one pool (same range, different namespaces)
  share it: the pool's allocatable set is the union of theirs. A pool no NAD matches
  is sized by its own range alone (network label "").

Sizes are exact Python integers (an IPv6 /64 has 2**64 - 2); the exposition prints
them exactly and Prometheus stores float64, so pools above 2**53 addresses lose
precision there. Nothing is capped: a cap would make `size` and `free` lie.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Set

from collector.intervals import Interval, contains, count, merge, subtract  # noqa: F401 (re-exported)
from collector.family import GAUGE, Family

GROUP, VERSION = "whereabouts.cni.cncf.io", "v1alpha1"
IPPOOL_PLURAL = "ippools"
RESERVATION_PLURAL = "overlappingrangeipreservations"

POOL_LABELS = ("pool", "range", "network")

# invalid_entries reasons (bounded: they are label values).
INVALID_RANGE = "invalid_range"              # spec.range is not a CIDR
INVALID_OFFSET = "invalid_offset"            # an allocations key is not a non-negative decimal
OFFSET_OUT_OF_RANGE = "offset_out_of_range"  # the offset lands outside spec.range
INVALID_ALLOCATION = "invalid_allocation"    # an allocations value is not an object
INVALID_PODREF = "invalid_podref"            # podref is not "namespace/name"

# Go's strconv.ParseInt(s, 10, 64) syntax; Python's int() also takes "1_0", " 1", "١".
DECIMAL = re.compile(r"^[+-]?[0-9]+$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# ---------------------------------------------------------------- interval arithmetic

def usable_bounds(net: Network, small_ranges: bool = False) -> Interval | None:
    """First and last address whereabouts may hand out in `net` (before start/end/exclude);
    None when it hands out none (/31 /32 /127 /128 upstream, see above)."""
    first, last = int(net.network_address), int(net.broadcast_address)
    if net.max_prefixlen - net.prefixlen <= 1:
        return (first, last) if small_ranges else None
    return first + 1, last - 1


# ---------------------------------------------------------------- NAD ipam config

@dataclass(frozen=True)
class RangeConfig:
    """One whereabouts range of one NAD, as whereabouts would allocate from it."""
    network: Network
    start: int | None = None
    end: int | None = None
    excludes: tuple[Network, ...] = ()
    network_name: str = ""
    nad: str = ""                   # "namespace/name" of the NAD
    slice_prefix: int | None = None  # node_slice_size: pools are per-node slices of this length

    def allocatable(self, small_ranges: bool = False) -> list[Interval]:
        bounds = usable_bounds(self.network, small_ranges)
        if bounds is None:
            return []
        first, last = bounds
        if self.start is not None and first <= self.start <= last:
            first = self.start
        if self.end is not None and first <= self.end <= last:
            last = self.end
        intervals = [(first, last)]
        for ex in self.excludes:
            if ex.version == self.network.version:
                intervals = subtract(intervals, (int(ex.network_address), int(ex.broadcast_address)))
        return intervals


def _address(text: object, version: int) -> int | None | bool:
    """An IP as int; None when absent or of the other family (upstream finds it "not in
    range" and ignores it); False when malformed (upstream's config load fails)."""
    if text is None or text == "":
        return None
    try:
        ip = ipaddress.ip_address(str(text).strip())
    except ValueError:
        return False
    return int(ip) if ip.version == version else None


def _exclude(text: object) -> Network | None:
    try:                    # strict=False: Go's ParseCIDR masks the host bits too
        return ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        return None


def parse_range(ipam: Mapping, network_name: str = "", nad: str = "") -> RangeConfig | None:
    """One range entry ({range, range_start?, range_end?, exclude?}); None if whereabouts
    would refuse it (a malformed range, start, end or exclude fails the whole ADD)."""
    text = ipam.get("range")
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.strip()
    start_text, end_text = ipam.get("range_start"), ipam.get("range_end")
    if "-" in text:                              # "A-B/len": start A, end B
        start_text, _, cidr = text.partition("-")
        end_text = cidr.split("/", 1)[0]
        text = cidr
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    start, end = _address(start_text, net.version), _address(end_text, net.version)
    excludes_raw = ipam.get("exclude") or []
    if start is False or end is False or not isinstance(excludes_raw, list):
        return None
    excludes = tuple(_exclude(e) for e in excludes_raw)
    if any(e is None for e in excludes):
        return None
    return RangeConfig(net, start, end, excludes, network_name, nad, _slice_prefix(ipam, net))


def _slice_prefix(ipam: Mapping, net: Network) -> int | None:
    """node_slice_size ("/20" or "20") as a prefix length inside `net`; None when absent or unusable."""
    text = ipam.get("node_slice_size")
    if not isinstance(text, str) or not text.strip().lstrip("/").isdigit():
        return None
    prefix = int(text.strip().lstrip("/"))
    return prefix if net.prefixlen <= prefix <= net.max_prefixlen else None


def _plugins(config: object) -> list:
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except (ValueError, RecursionError):
            return []
    if not isinstance(config, dict):
        return []
    plugins = config.get("plugins", [config])
    return [p for p in plugins if isinstance(p, dict)] if isinstance(plugins, list) else []


def nad_ranges(obj: Mapping) -> list[RangeConfig]:
    """Every whereabouts range a NetworkAttachmentDefinition allocates from. Never raises."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        return []
    nad = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    out = []
    for plugin in _plugins(spec.get("config")):
        ipam = plugin.get("ipam")
        if not isinstance(ipam, dict) or ipam.get("type") != "whereabouts":
            continue
        network_name = ipam.get("network_name") if isinstance(ipam.get("network_name"), str) else ""
        entries = [ipam] if ipam.get("range") else []
        extra = ipam.get("ipRanges")
        entries += [e for e in extra if isinstance(e, dict)] if isinstance(extra, list) else []
        for entry in entries:
            if "node_slice_size" not in entry and "node_slice_size" in ipam:
                entry = {**entry, "node_slice_size": ipam["node_slice_size"]}
            rc = parse_range(entry, network_name, nad)
            if rc is not None:
                out.append(rc)
    return out


# ---------------------------------------------------------------- pools

def normalize_range(text: str) -> str:
    """Upstream's normalizeRange: the pool name of an unnamed network."""
    if text.endswith(":"):
        text += "0"
    return text.replace(":", "-").replace("/", "-")


def pool_network_name(pool_name: str, net: Network, range_text: str) -> str | None:
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
    network: Network | None
    network_name: str | None = None
    allocations: list[Allocation] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)


def _podref(value: object) -> str:
    if not isinstance(value, str):
        return ""
    ns, sep, name = value.strip().partition("/")
    return f"{ns}/{name}" if sep and ns and name and "/" not in name else ""


def parse_pool(obj: Mapping) -> Pool:
    """An IPPool object (JSON dict) → Pool. Malformed parts are counted, never raised."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    name = str(meta.get("name", ""))
    key = f"{meta.get('namespace', '')}/{name}"
    range_text = spec.get("range") if isinstance(spec.get("range"), str) else ""
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


def index_ranges(configs: Iterable[RangeConfig]) -> dict[tuple[Network, str], list[RangeConfig]]:
    index: dict[tuple[Network, str], list[RangeConfig]] = {}
    for rc in configs:
        index.setdefault((rc.network, rc.network_name), []).append(rc)
    return index


def matching_ranges(pool: Pool, index: Mapping[tuple[Network, str], list[RangeConfig]]) -> list[RangeConfig]:
    if pool.network_name is not None:
        found = list(index.get((pool.network, pool.network_name), ()))
        return found or slice_ranges(pool, index)
    return [rc for (net, _), rcs in index.items() if net == pool.network for rc in rcs]


def slice_ranges(pool: Pool, index: Mapping[tuple[Network, str], list[RangeConfig]]) -> list[RangeConfig]:
    """Node-slice configs a `<network_name>-<node>-<slice>` (or `<node>-<slice>`) pool belongs to."""
    prefix = pool.network_name or ""
    return [rc for (net, name), rcs in index.items() for rc in rcs
            if rc.slice_prefix == pool.network.prefixlen and net.version == pool.network.version
            and pool.network.subnet_of(net) and prefix and (not name or prefix.startswith(name + "-"))]


def pool_stats(pool: Pool, index: Mapping[tuple[Network, str], list[RangeConfig]],
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
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    return Reservation(f"{meta.get('namespace', '')}/{meta.get('name', '')}",
                       _podref(spec.get("podref")), bool(spec.get("ipamclaimref")))


# ---------------------------------------------------------------- metric families

def ippool_families(pools: Iterable[Pool], ranges: Iterable[RangeConfig], pods: Set[str],
                    reservations: Iterable[Reservation] | None = None,
                    small_ranges: bool = False) -> list[Family]:
    size = Family("planewatch_ippool_size", GAUGE,
                  "Addresses a Whereabouts pool can hand out: its range without network/broadcast, "
                  "outside range_start..range_end and exclude of the NADs using it.", POOL_LABELS)
    allocated = Family("planewatch_ippool_allocated", GAUGE,
                       "Allocations recorded in a Whereabouts pool (spec.allocations inside the range).",
                       POOL_LABELS)
    free = Family("planewatch_ippool_free", GAUGE,
                  "Allocatable addresses of a Whereabouts pool not allocated.", POOL_LABELS)
    leaked = Family("planewatch_ippool_leaked", GAUGE,
                    "Allocations of a Whereabouts pool whose podref names a pod that does not exist "
                    "(IPAMClaim-owned allocations excepted).", POOL_LABELS)
    invalid = Family("planewatch_ippool_invalid_entries", GAUGE,
                     "Parts of a Whereabouts pool that cannot be used: a bad range, bad allocation keys or values.",
                     ("pool", "reason"))
    index = index_ranges(ranges)
    for pool in sorted(pools, key=lambda p: p.key):
        for reason in sorted(pool.errors):
            invalid.add((pool.key, reason), pool.errors[reason])
        stats = pool_stats(pool, index, pods, small_ranges)
        if stats is None:
            continue
        size.add(stats.labels, stats.size)
        allocated.add(stats.labels, stats.allocated)
        free.add(stats.labels, stats.free)
        leaked.add(stats.labels, stats.leaked)
    families = [size, allocated, free, leaked, invalid]
    if reservations is not None:
        held = list(reservations)
        total = Family("planewatch_ippool_overlapping_reservations", GAUGE,
                       "Whereabouts OverlappingRangeIPReservations (one per IP held across overlapping ranges).")
        total.add((), len(held))
        gone = Family("planewatch_ippool_overlapping_reservations_leaked", GAUGE,
                      "OverlappingRangeIPReservations whose podref names a pod that does not exist.")
        gone.add((), sum(1 for r in held if r.podref and not r.claimed and r.podref not in pods))
        families += [total, gone]
    return families


# ---------------------------------------------------------------- examples (lab, docs)

def example_ippool(range_cidr: str, allocations: Mapping[str, str], namespace: str = "kube-system",
                   network_name: str = "") -> dict:
    """An IPPool as whereabouts would write it: `allocations` maps an IP of the range to
    the podref ("ns/name") holding it. Container IDs are made up (stable per IP+pod)."""
    net = ipaddress.ip_network(range_cidr, strict=False)
    spec_allocations = {}
    for ip, podref in allocations.items():
        address = ipaddress.ip_address(ip)
        if address not in net:
            raise ValueError(f"{ip} is not in {net}")
        container_id = hashlib.sha256(f"{podref}@{address}".encode()).hexdigest()
        spec_allocations[str(int(address) - int(net.network_address))] = {
            "id": container_id, "podref": podref, "ifname": "net1"}
    name = normalize_range(str(net))
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "IPPool",
            "metadata": {"name": f"{network_name}-{name}" if network_name else name, "namespace": namespace},
            "spec": {"range": str(net), "allocations": spec_allocations}}
