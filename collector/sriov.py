"""SR-IOV VF counters, read from the physical function and mapped to pods.

Which VF belongs to which pod comes from the network-status annotation's
`device-info` (type `pci`, or `vdpa` with a pci-address), so no kubelet
pod-resources join is needed. For each such attachment:

1. PF and VF index: `pf-pci-address` when the annotation gives it, else
   `<sysfs>/bus/pci/devices/<vf>/physfn`; N is the PF's `virtfnN` link that
   points at the VF. The PF netdev is the entry of `<pf>/net/` that is not a
   switchdev representor (phys_port_name `pfXvfY`).
2. Reader, chosen per PF, first available in `sriov_readers` order (default
   sysfs-intel, sysfs-mellanox, netlink):
   - `sysfs-intel` when `<pf>/sriov/<N>/stats` is a directory (one file per
     counter, Intel out-of-tree i40e/ice);
   - `sysfs-mellanox` when it is a file of `key : value` lines (Mellanox OFED);
   - `netlink` when the PF has a netdev: IFLA_VF_STATS on an RTM_GETLINK of
     the PF with RTEXT_FILTER_VF, in the host netns (option `host_netns`,
     default `<procfs>/1/ns/net`; "" = the collector's own netns), one request
     per PF per scrape;
   - `none` otherwise (the info series still says where the VF is).
   `<pf>/sriov/<N>` is the directory users know as
   `/sys/class/net/<pf>/device/sriov/<N>`; it is reached through the PCI
   address so a PF whose netdev sits in another netns still works.
   The `reader` label of `planewatch_vf_info` says which one each VF uses.
3. The resolution (PF, index, netdev, reader, driver, NUMA node, and for
   sysfs-intel which counter files exist) is cached per VF PCI address and
   dropped when the address leaves the snapshot, its stats vanish or its PF
   leaves the host netns; a scrape re-reads only the counters (64 VFs on the
   fixture tree: ~1 ms warm, ~3 ms cold).

A counter the reader does not give has no series (netlink has no tx_errors /
tx_spoofed; Intel has no broadcast/multicast): never a made-up 0. Caveat:
the kernel zero-fills IFLA_VF_STATS for drivers without VF stats.

Free VFs (no pod): off by default, so a node without pci attachments costs
nothing. With `options["sriov_all_vfs"]` true, every VF of every SR-IOV PF
(`<sysfs>/bus/pci/devices/*/sriov_numvfs` > 0, rescanned every
`sriov_rescan_seconds`, default 30) that no pod claims is exported with
namespace, pod, network and plane "" and interface = the VF's PCI address
(the only label left to keep free VFs' series apart). A VF used by a pod whose
annotation lacks device-info shows up as free: the annotation is our only map.

"Not there" is not "failed": a VF whose sysfs entries vanished mid-scrape, or a
PF missing from the host netns, is skipped with a debug log.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from collector import sriov_readers as readers
from collector.claims import contested_vfs
from collector.model import ATTACHMENT_LABELS
from collector.registry import Config, Snapshot, register
from exporters.exposition import COUNTER, GAUGE, Family, render_labels

log = logging.getLogger(__name__)

INFO_LABELS = ATTACHMENT_LABELS + ("pf", "vf", "pci_address", "driver", "numa_node", "reader")
VF_DEVICE_TYPES = ("pci", "vdpa")
_REPRESENTOR = re.compile(r"^(c\d+)?pf\d+(vf|sf)\d+$")


@dataclass(frozen=True)
class VfHandle:
    """Everything about one VF that does not change between scrapes."""

    pci_address: str
    pf_pci_address: str
    pf: str               # PF netdev, "" when it has none
    index: int
    driver: str           # the VF's bound driver, "" when unbound
    numa_node: str        # "" when unknown (-1 or absent)
    reader: str
    stats_path: str = ""  # sysfs readers only
    stats_files: tuple[str, ...] = ()   # sysfs-intel: the counter files this driver has

    def info_values(self) -> tuple[str, ...]:
        return (self.pf or self.pf_pci_address, str(self.index), self.pci_address,
                self.driver, self.numa_node, self.reader)

# ---------------------------------------------------------------- sysfs facts


def pci_dir(sysfs: str, address: str) -> str:
    return os.path.join(sysfs, "bus", "pci", "devices", address)


def _link_basename(path: str) -> str:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return ""


def physfn(sysfs: str, vf: str) -> str:
    return _link_basename(os.path.join(pci_dir(sysfs, vf), "physfn"))


def virtfn_map(sysfs: str, pf: str) -> dict[str, int]:
    """VF PCI address -> N, from the PF's `virtfnN` links ({} when not a PF)."""
    base = pci_dir(sysfs, pf)
    try:
        names = os.listdir(base)
    except OSError:
        return {}
    out = {}
    for name in names:
        if name.startswith("virtfn") and name[6:].isdigit():
            vf = _link_basename(os.path.join(base, name))
            if vf:
                out[vf] = int(name[6:])
    return out


def locate_vf(sysfs: str, vf: str, pf_hint: str = "", virtfns=None) -> tuple[str, int] | None:
    """(PF PCI address, VF index); the annotation's pf-pci-address wins.

    `virtfns(pf)` may be a memoised `virtfn_map` so resolving many VFs of one
    PF lists its links once.
    """
    virtfns = virtfns or (lambda pf: virtfn_map(sysfs, pf))
    for pf in (pf_hint, physfn(sysfs, vf)):
        if pf:
            index = virtfns(pf).get(vf)
            if index is not None:
                return pf, index
    return None


def pf_netdev(sysfs: str, pf: str) -> str:
    """The PF's own netdev: switchdev representors share its net/ directory."""
    base = os.path.join(pci_dir(sysfs, pf), "net")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return ""
    for name in names:
        if not _REPRESENTOR.match(_read_text(os.path.join(base, name, "phys_port_name"))):
            return name
    return ""


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip()
    except OSError:         # absent, or EOPNOTSUPP from drivers without it
        return ""


def bound_driver(sysfs: str, address: str) -> str:
    return _link_basename(os.path.join(pci_dir(sysfs, address), "driver"))


def numa_node(sysfs: str, pf: str) -> str:
    text = _read_text(os.path.join(pci_dir(sysfs, pf), "numa_node"))
    return "" if text in ("", "-1") else text


def stats_path(sysfs: str, pf: str, index: int) -> str:
    return os.path.join(pci_dir(sysfs, pf), "sriov", str(index), "stats")


def choose_reader(stats: str, netdev: str, allowed: Iterable[str]) -> str:
    """The first reader in `allowed` whose layout is there for this PF."""
    for reader in allowed:
        if reader == readers.INTEL and os.path.isdir(stats):
            return reader
        if reader == readers.MELLANOX and os.path.isfile(stats):
            return reader
        if reader == readers.NETLINK and netdev:
            return reader
    return readers.NONE


def list_sriov_vfs(sysfs: str) -> list[tuple[str, str]]:
    """(VF, PF) PCI addresses of every VF on the node."""
    root = os.path.join(sysfs, "bus", "pci", "devices")
    try:
        devices = sorted(os.listdir(root))
    except OSError:
        return []
    out = []
    for pf in devices:
        if _read_text(os.path.join(root, pf, "sriov_numvfs")) in ("", "0"):
            continue
        try:
            names = os.listdir(os.path.join(root, pf))
        except OSError:
            continue
        links = sorted((int(n[6:]), n) for n in names if n.startswith("virtfn") and n[6:].isdigit())
        for _, name in links:
            vf = _link_basename(os.path.join(root, pf, name))
            if vf:
                out.append((vf, pf))
    return out

# ---------------------------------------------------------------- metrics


def build_families(rows: Iterable[tuple[tuple[str, ...], VfHandle, dict | None]]) -> list[Family]:
    """Families from (attachment labels, VF, counters or None) rows; empty ones dropped."""
    counters = {name: Family(metric, COUNTER, text, ATTACHMENT_LABELS)
                for name, (metric, text) in readers.COUNTERS.items()}
    info = Family("planewatch_vf_info", GAUGE,
                  "SR-IOV VF behind a pod attachment: its PF, index, PCI address, driver, "
                  "NUMA node and the reader of its counters.", INFO_LABELS)
    for labels, handle, values in rows:
        info.add(labels + handle.info_values(), 1)
        if not values:
            continue
        rendered = render_labels(ATTACHMENT_LABELS, labels)
        for name, value in values.items():
            fam = counters.get(name)
            if fam is not None:
                fam.add_rendered(rendered, value)
    return [fam for fam in (info, *counters.values()) if fam.samples]

# ---------------------------------------------------------------- the source


class _PfMemo:
    """PF facts looked up once per collect while resolving new VFs."""

    def __init__(self, sysfs: str):
        self.virtfns = lru_cache(maxsize=None)(lambda pf: virtfn_map(sysfs, pf))
        self.facts = lru_cache(maxsize=None)(lambda pf: (pf_netdev(sysfs, pf), numa_node(sysfs, pf)))


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _reader_order(value) -> tuple[str, ...]:
    if value is None:
        return readers.DEFAULT_READERS
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [n for n in names if n not in readers.DEFAULT_READERS]
    if unknown:
        raise ValueError(f"sriov_readers: unknown reader(s) {unknown}; known: {readers.DEFAULT_READERS}")
    return tuple(names)


def vf_attachments(snapshot: Snapshot) -> list[tuple[tuple[str, ...], str, str]]:
    """(labels, VF PCI address, pf-pci-address hint) of every VF attachment."""
    out, seen = [], set()
    contested = contested_vfs(snapshot.pods)     # claimed by two pods: nobody's (collector/claims.py)
    for view in snapshot.pods:
        for iv in view.interfaces:
            dev = iv.attachment.device
            if dev.type not in VF_DEVICE_TYPES or not dev.pci_address or dev.pci_address in contested:
                continue
            key = (iv.labels, dev.pci_address)
            if key not in seen:         # duplicate network-status entries for one interface
                seen.add(key)
                out.append((iv.labels, dev.pci_address, dev.pf_pci_address))
    return out


@register("sriov", help="SR-IOV VF counters read from the PF (sysfs or netlink), mapped to pods.")
class SriovSource:
    def __init__(self, config: Config, netlink=None):
        opts = config.options
        self.sysfs = config.paths.sysfs
        self.readers = _reader_order(opts.get("sriov_readers"))
        self.all_vfs = _truthy(opts.get("sriov_all_vfs", False))
        self.rescan_seconds = float(opts.get("sriov_rescan_seconds", 30))
        host_netns = opts.get("host_netns", f"{config.paths.procfs}/1/ns/net")
        self.netlink = netlink or readers.NetlinkVfStats(readers.RtnlGetlink(host_netns))
        self._vfs: dict[str, VfHandle] = {}
        self._free: tuple[float, list[tuple[str, str]]] = (float("-inf"), [])
        self._netlink_warned: set[str] = set()
        self._lock = threading.Lock()       # two scrapes at once share the caches

    def collect(self, snapshot: Snapshot) -> list[Family]:
        with self._lock:
            return self._collect(snapshot)

    def _collect(self, snapshot: Snapshot) -> list[Family]:
        wanted = vf_attachments(snapshot)
        if self.all_vfs:
            claimed = {addr for _, addr, _ in wanted}
            wanted += [(("", "", "", vf, ""), vf, pf) for vf, pf in self._free_vfs() if vf not in claimed]
        if not wanted:
            self._vfs.clear()
            return []
        memo = _PfMemo(self.sysfs)
        located = [(labels, self._handle(addr, hint, memo)) for labels, addr, hint in wanted]
        located = [(labels, h) for labels, h in located if h is not None]
        self._vfs = {h.pci_address: h for _, h in located}     # forget VFs no longer wanted
        by_pf = self._netlink_stats({h.pf for _, h in located if h.reader == readers.NETLINK})
        rows = []
        for labels, handle in located:
            values = self._counters(handle, by_pf)
            if values is None:
                continue
            rows.append((labels, handle, values))
        return build_families(rows)

    def _handle(self, vf: str, hint: str, memo: "_PfMemo") -> VfHandle | None:
        handle = self._vfs.get(vf)
        if handle is None:
            handle = self._resolve(vf, hint, memo)
            if handle is not None:
                self._vfs[vf] = handle
        return handle

    def _resolve(self, vf: str, hint: str, memo: "_PfMemo") -> VfHandle | None:
        where = locate_vf(self.sysfs, vf, hint, memo.virtfns)
        if where is None:
            log.debug("sriov: VF %s: no PF links to it under %s", vf, self.sysfs)
            return None
        pf, index = where
        netdev, numa = memo.facts(pf)
        stats = stats_path(self.sysfs, pf, index)
        reader = choose_reader(stats, netdev, self.readers)
        files: tuple[str, ...] = ()
        if reader == readers.INTEL:
            files = readers.intel_stats_files(stats) or ()
        return VfHandle(vf, pf, netdev, index, bound_driver(self.sysfs, vf), numa, reader,
                        stats if reader in (readers.INTEL, readers.MELLANOX) else "", files)

    def _counters(self, handle: VfHandle, by_pf: dict[str, dict[int, dict[str, int]]]) -> dict | None:
        """Counters of one VF ({} when its reader has none); None when it vanished."""
        if handle.reader == readers.INTEL:
            values = readers.read_intel_stats(handle.stats_path, handle.stats_files)
        elif handle.reader == readers.MELLANOX:
            values = readers.read_mellanox_stats(handle.stats_path)
        elif handle.reader == readers.NETLINK:
            return by_pf.get(handle.pf, {}).get(handle.index, {})
        else:
            return {}
        if values is None:
            log.debug("sriov: VF %s: %s vanished, skipped", handle.pci_address, handle.stats_path)
            self._vfs.pop(handle.pci_address, None)     # resolve afresh next scrape
        return values

    def _netlink_stats(self, pfs: set[str]) -> dict[str, dict[int, dict[str, int]]]:
        out = {}
        for pf in sorted(pfs):
            try:
                out[pf] = self.netlink.vf_stats(pf)
            except readers.PfNotFound:
                # renamed or moved away: resolve its VFs afresh next scrape
                log.debug("sriov: PF %s is not in the host netns", pf)
                for addr in [a for a, h in self._vfs.items() if h.pf == pf]:
                    del self._vfs[addr]
            except OSError as err:
                # e.g. no access to the host netns: the sysfs VFs still count.
                level = logging.DEBUG if pf in self._netlink_warned else logging.WARNING
                self._netlink_warned.add(pf)
                log.log(level, "sriov: netlink VF stats of PF %s: %s", pf, err)
        return out

    def _free_vfs(self) -> list[tuple[str, str]]:
        stamp, vfs = self._free
        now = time.monotonic()
        if now - stamp >= self.rescan_seconds:
            vfs = list_sriov_vfs(self.sysfs)
            self._free = (now, vfs)
        return vfs

    def close(self) -> None:
        close = getattr(self.netlink, "close", None)
        if close:
            close()
