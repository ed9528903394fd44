"""SR-IOV VF counters, read from the physical function and mapped to pods.

Which VF belongs to which pod comes from the network-status annotation's
`device-info` (type `pci`, or `vdpa` with a pci-address), so no kubelet
pod-resources join is needed. For each such attachment:

1. PF and VF index: `pf-pci-address` when the annotation gives it, else
   `<sysfs>/bus/pci/devices/<vf>/physfn`; N is the PF's `virtfnN` link that
   points at the VF. The PF netdev is the entry of `<pf>/net/` that is not a
   switchdev representor (phys_port_name `pfXvfY`).
2. Reader, chosen per PF, first available in `--collector.sriov.readers` order (default
   sysfs-intel, sysfs-mellanox, netlink):
   - `sysfs-intel` when `<pf>/sriov/<N>/stats` is a directory (one file per
     counter, Intel out-of-tree i40e/ice);
   - `sysfs-mellanox` when it is a file of `key : value` lines (Mellanox OFED);
   - `netlink` when the PF has a netdev: IFLA_VF_STATS on an RTM_GETLINK of
     the PF with RTEXT_FILTER_VF, in the host netns (`--collector.sriov.host-netns`,
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
   leaves the host netns; a scrape re-reads only the counters.

A counter the reader does not give has no series (netlink has no tx_errors /
tx_spoofed; Intel has no broadcast/multicast): never a made-up 0. Caveat:
the kernel zero-fills IFLA_VF_STATS for drivers without VF stats.

Free VFs (no pod): off by default, so a node without pci attachments costs
nothing. With `--collector.sriov.all-vfs`, every VF of every SR-IOV PF
(`<sysfs>/bus/pci/devices/*/sriov_numvfs` > 0, rescanned every
`--collector.sriov.rescan-seconds`, default 30) that no pod claims is exported with
namespace, pod, network and plane "" and interface = the VF's PCI address
(the only label left to keep free VFs' series apart). A VF used by a pod whose
annotation lacks device-info shows up as free: the annotation is our only map.

Configuration: one RTM_GETLINK per PF with a netdev per scrape also gives each
VF's IFLA_VFINFO_LIST configuration (sriov_metrics: `planewatch_vf_config_info`,
transmit rate limits), whatever reader its counters come from.

"Not there" is not "failed": a VF whose sysfs entries vanished mid-scrape, or a
PF missing from the host netns, is skipped with a debug log. A read that fails
(drivers' show() return EOPNOTSUPP, EINVAL while a VF resets, EIO ...) costs
that counter (Intel: one file each) or that VF's counters (Mellanox: one file),
counted on `planewatch_vf_read_errors_total{..., pf, vf, file, reason}`; the VF
keeps its info series and its neighbours lose nothing.

Hostile annotations: `pci-address` and `pf-pci-address` are tenant-written.
They are checked against the kernel's PCI address format before any path is
built, and every sysfs access goes through collector/sysfs_safe.py (inside the
device tree, regular files only, non-blocking, bounded). What is refused shows
as `planewatch_vf_attachment_refused{..., field, reason}` on that pod only.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

from collector import sriov_readers as readers
from collector.claims import contested_vfs
from collector.registry import Config, Option, Snapshot, register
from collector.sriov_metrics import INFO_LABELS, VfRow, build_families  # noqa: F401  (INFO_LABELS re-exported)
from collector.sriov_sysfs import (  # noqa: F401
    bound_driver,
    choose_reader,
    list_sriov_vfs,
    locate_vf,
    numa_node,
    pci_dir,
    pf_netdev,
    physfn,
    stats_path,
    vf_host_netdev,
    virtfn_map,
)
from collector.sysfs_safe import OUTSIDE, Sysfs, SysfsError, errno_name, pci_address

log = logging.getLogger(__name__)

VF_DEVICE_TYPES = ("pci", "vdpa")
INVALID = "invalid_format"


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
    carrier_path: str = ""              # carrier_changes of the VF's host netdev, if any
    real_dir: str = ""                  # resolved stats dir (intel) or its parent (mellanox)

    def info_values(self) -> tuple[str, ...]:
        return (self.pf_label, str(self.index), self.pci_address, self.driver, self.numa_node, self.reader)

    @property
    def pf_label(self) -> str:
        return self.pf or self.pf_pci_address


class _PfMemo:
    """PF facts looked up once per collect while resolving new VFs."""

    def __init__(self, fs: Sysfs):
        self.virtfns = lru_cache(maxsize=None)(lambda pf: virtfn_map(fs, pf))
        self.facts = lru_cache(maxsize=None)(lambda pf: (pf_netdev(fs, pf), numa_node(fs, pf)))


def _reader_order(value) -> tuple[str, ...]:
    if value is None:
        return readers.DEFAULT_READERS
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [n for n in names if n not in readers.DEFAULT_READERS]
    if unknown:
        raise ValueError(f"sriov_readers: unknown reader(s) {unknown}; known: {readers.DEFAULT_READERS}")
    return tuple(names)


def vf_attachments(snapshot: Snapshot, refused: list | None = None) -> list[tuple[tuple[str, ...], str, str]]:
    """(labels, VF PCI address, pf-pci-address hint) of every VF attachment.

    Addresses that are not PCI addresses are refused (appended to `refused` as
    (labels, field, reason)) before anything is joined into a path; a bad hint
    is dropped and the VF is still placed through its `physfn` link.
    """
    out, seen = [], set()
    contested = contested_vfs(snapshot.pods)     # claimed by two pods: nobody's (collector/claims.py)
    for view in snapshot.pods:
        for iv in view.devices:
            dev = iv.attachment.device
            if dev.type not in VF_DEVICE_TYPES or not dev.pci_address or dev.pci_address in contested:
                continue
            address = pci_address(dev.pci_address)
            if address is None:
                if refused is not None:
                    refused.append((iv.labels, "pci-address", INVALID))
                continue
            hint = pci_address(dev.pf_pci_address) or ""
            if dev.pf_pci_address and not hint and refused is not None:
                refused.append((iv.labels, "pf-pci-address", INVALID))
            key = (iv.labels, address)
            if key not in seen:         # duplicate network-status entries for one interface
                seen.add(key)
                out.append((iv.labels, address, hint))
    return out


@register("sriov", help="SR-IOV VF counters and configuration read from the PF (sysfs or netlink), mapped to pods.",
          options=(
              Option("all_vfs", False, "also export VFs no pod uses (pod=\"\", interface=<VF PCI address>)", bool),
              Option("host_netns", None, "netns of the PFs for the netlink VF reader (default <procfs>/1/ns/net; "
                     "\"\" = the collector's own, e.g. with hostNetwork)"),
              Option("readers", ",".join(readers.DEFAULT_READERS), "VF counter readers to try, in this order"),
              Option("rescan_seconds", 30.0, "seconds between two scans for VFs no pod uses (with all-vfs)",
                     float),
          ))
class SriovSource:
    def __init__(self, config: Config, netlink=None, sysfs: Sysfs | None = None):
        opts = config.settings("sriov")
        self.fs = sysfs or Sysfs(config.paths.sysfs)
        self.sysfs = config.paths.sysfs
        self.readers = _reader_order(opts["readers"])
        self.all_vfs = opts["all_vfs"]
        self.rescan_seconds = opts["rescan_seconds"]
        host_netns = opts["host_netns"]
        if host_netns is None:
            host_netns = f"{config.paths.procfs}/1/ns/net"
        self.netlink = netlink or readers.NetlinkVfStats(readers.RtnlGetlink(host_netns))
        self._vfs: dict[str, VfHandle] = {}
        self._errors: dict[tuple, int] = {}     # (labels, pf, vf, file, reason) -> failed reads
        self._free: tuple[float, list[tuple[str, str]]] = (float("-inf"), [])
        self._netlink_warned: set[str] = set()
        self._lock = threading.Lock()       # two scrapes at once share the caches

    def collect(self, snapshot: Snapshot):
        with self._lock:
            return self._collect(snapshot)

    def _collect(self, snapshot: Snapshot):
        refused: list = []
        wanted = vf_attachments(snapshot, refused)
        if self.all_vfs:
            claimed = {addr for _, addr, _ in wanted}
            wanted += [(("", "", "", vf, ""), vf, pf) for vf, pf in self._free_vfs() if vf not in claimed]
        if not wanted and not refused:
            self._vfs.clear()
            self._errors.clear()
            return []
        memo = _PfMemo(self.fs)
        located = []
        for labels, addr, hint in wanted:
            try:
                handle = self._handle(addr, hint, memo)
            except SysfsError as err:
                refused.append((labels, "pci-address", err.reason))
                continue
            if handle is not None:
                located.append((labels, handle))
        self._vfs = {h.pci_address: h for _, h in located}     # forget VFs no longer wanted
        live = {(labels, h.pf_label, str(h.index)) for labels, h in located}
        self._errors = {k: v for k, v in self._errors.items() if k[:3] in live}
        by_pf, pf_errors = self._netlink_info({h.pf for _, h in located if h.pf})
        rows = []
        for labels, handle in located:
            row = self._row(labels, handle, by_pf, pf_errors)
            if row is not None:
                rows.append(row)
        return build_families(rows, self._errors, refused)

    def _count(self, labels, handle: VfHandle, errors: dict[str, str]) -> None:
        for name, reason in errors.items():
            key = (labels, handle.pf_label, str(handle.index), name, reason)
            self._errors[key] = self._errors.get(key, 0) + 1

    def _row(self, labels, handle: VfHandle, by_pf, pf_errors) -> VfRow | None:
        """One VF's row; None when its sysfs entries vanished (resolved afresh next scrape)."""
        vfs = by_pf.get(handle.pf, {})
        info = vfs.get(handle.index)
        row = VfRow(labels, handle.info_values(), config=info.config if info else None)
        if handle.reader == readers.INTEL:
            reading = readers.read_intel_stats(handle.stats_path, handle.stats_files, self.fs, handle.real_dir)
        elif handle.reader == readers.MELLANOX:
            reading = readers.read_mellanox_stats(handle.stats_path, self.fs, handle.real_dir)
        elif handle.reader == readers.NETLINK:
            reading = readers.Reading(dict(info.stats) if info and info.stats else {})
        else:
            reading = readers.Reading()
        if reading is None:
            log.debug("sriov: VF %s: %s vanished, skipped", handle.pci_address, handle.stats_path)
            self._vfs.pop(handle.pci_address, None)
            return None
        # costs the counters of a netlink-read VF; a sysfs-read VF only loses its
        # configuration, which the once-per-PF warning already says
        if handle.pf in pf_errors and handle.reader == readers.NETLINK:
            reading.errors["netlink"] = pf_errors[handle.pf]
        row.counters = reading.values
        if handle.carrier_path:
            try:
                text = self.fs.read_text(handle.carrier_path)
                row.carrier_changes = int(text) if text and text.isdigit() else None
            except SysfsError as err:
                reading.errors["carrier_changes"] = err.reason
        self._count(labels, handle, reading.errors)
        return row

    def _handle(self, vf: str, hint: str, memo: "_PfMemo") -> VfHandle | None:
        handle = self._vfs.get(vf)
        if handle is None:
            handle = self._resolve(vf, hint, memo)
            if handle is not None:
                self._vfs[vf] = handle
        return handle

    def _resolve(self, vf: str, hint: str, memo: "_PfMemo") -> VfHandle | None:
        for address in (vf, hint):
            if address and os.path.lexists(pci_dir(self.fs, address)) and not self.fs.inside(pci_dir(self.fs, address)):
                raise SysfsError(OUTSIDE, address)
        where = locate_vf(self.fs, vf, hint, memo.virtfns)
        if where is None:
            log.debug("sriov: VF %s: no PF links to it under %s", vf, self.sysfs)
            return None
        pf, index = where
        netdev, numa = memo.facts(pf)
        stats = stats_path(self.fs, pf, index)
        reader = choose_reader(stats, netdev, self.readers, self.fs)
        files: tuple[str, ...] = ()
        if reader == readers.INTEL:
            files = readers.intel_stats_files(stats, fs=self.fs) or ()
        host_netdev = vf_host_netdev(self.fs, vf)
        carrier = self.fs.path("bus", "pci", "devices", vf, "net", host_netdev, "carrier_changes") \
            if host_netdev else ""
        real_dir = ""
        if reader in (readers.INTEL, readers.MELLANOX):
            try:        # resolved once; a refusal here is reported by the reader at every scrape
                real_dir = self.fs.resolve(stats if reader == readers.INTEL else os.path.dirname(stats))
            except SysfsError:
                real_dir = ""
        return VfHandle(vf, pf, netdev, index, bound_driver(self.fs, vf), numa, reader,
                        stats if reader in (readers.INTEL, readers.MELLANOX) else "", files, carrier, real_dir)

    def _netlink_info(self, pfs: set[str]):
        """PF netdev -> {VF index: VfInfo}, and PF -> errno name of a failed query."""
        out, errors = {}, {}
        for pf in sorted(pfs):
            try:
                out[pf] = self.netlink.vf_info(pf)
            except readers.PfNotFound:
                # renamed or moved away: resolve its VFs afresh next scrape
                log.debug("sriov: PF %s is not in the host netns", pf)
                for addr in [a for a, h in self._vfs.items() if h.pf == pf and h.reader == readers.NETLINK]:
                    del self._vfs[addr]
            except OSError as err:
                # e.g. no access to the host netns: the sysfs VFs still count.
                errors[pf] = errno_name(err.errno)
                level = logging.DEBUG if pf in self._netlink_warned else logging.WARNING
                self._netlink_warned.add(pf)
                log.log(level, "sriov: netlink VF info of PF %s: %s", pf, err)
        return out, errors

    def _free_vfs(self) -> list[tuple[str, str]]:
        stamp, vfs = self._free
        now = time.monotonic()
        if now - stamp >= self.rescan_seconds:
            vfs = list_sriov_vfs(self.fs)
            self._free = (now, vfs)
        return vfs

    def close(self) -> None:
        close = getattr(self.netlink, "close", None)
        if close:
            close()


