"""What a NAD's Whereabouts IPAM config lets a pool hand out (pure, never raises on input).

Upstream facts this follows (k8snetworkplumbingwg/whereabouts):
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
- Node-slice ("fast IPAM", `node_slice_size`) pools span one node's slice of the
  NAD's range; every usable address of the slice is allocatable (exclude is not
  applied in that mode upstream).

The pools themselves: collector/whereabouts.py.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Mapping

from collector.intervals import Interval, subtract

Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network


# ---------------------------------------------------------------- interval arithmetic

def usable_bounds(net: Subnet, small_ranges: bool = False) -> Interval | None:
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
    network: Subnet
    start: int | None = None
    end: int | None = None
    excludes: tuple[Subnet, ...] = ()
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


def _exclude(text: object) -> Subnet | None:
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
    found = [_exclude(e) for e in excludes_raw]
    excludes = tuple(e for e in found if e is not None)
    if len(excludes) != len(found):
        return None
    return RangeConfig(net, start, end, excludes, network_name, nad, _slice_prefix(ipam, net))


def _slice_prefix(ipam: Mapping, net: Subnet) -> int | None:
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
        network_name = ipam.get("network_name")
        if not isinstance(network_name, str):
            network_name = ""
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
