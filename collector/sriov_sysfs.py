"""Where an SR-IOV VF sits, from sysfs links and attributes (all through sysfs_safe).

`sysfs` is a `sysfs_safe.Sysfs` or a root path. Every PCI address here has
already passed `sysfs_safe.pci_address` or comes from a kernel-made link name,
and every read is bounded and kept inside the device tree.
"""
from __future__ import annotations

import re
from typing import Iterable

from collector import sriov_readers as readers
from collector.sysfs_safe import Sysfs, as_sysfs, pci_address

_REPRESENTOR = re.compile(r"^(c\d+)?pf\d+(vf|sf)\d+$")


def pci_dir(sysfs, address: str) -> str:
    return as_sysfs(sysfs).path("bus", "pci", "devices", address)


def _pci_link(fs: Sysfs, path: str) -> str:
    """A link to a PCI device, by the name it points at ("" unless a PCI address)."""
    return pci_address(fs.link_name(path)) or ""


def physfn(sysfs, vf: str) -> str:
    fs = as_sysfs(sysfs)
    return _pci_link(fs, fs.path("bus", "pci", "devices", vf, "physfn"))


def virtfn_map(sysfs, pf: str) -> dict[str, int]:
    """VF PCI address -> N, from the PF's `virtfnN` links ({} when not a PF)."""
    fs = as_sysfs(sysfs)
    base = fs.path("bus", "pci", "devices", pf)
    out = {}
    for name in fs.listdir(base) or ():
        if name.startswith("virtfn") and name[6:].isdigit():
            vf = _pci_link(fs, fs.path("bus", "pci", "devices", pf, name))
            if vf:
                out[vf] = int(name[6:])
    return out


def locate_vf(sysfs, vf: str, pf_hint: str = "", virtfns=None) -> tuple[str, int] | None:
    """(PF PCI address, VF index); the annotation's pf-pci-address wins.

    `virtfns(pf)` may be a memoised `virtfn_map` so resolving many VFs of one
    PF lists its links once.
    """
    fs = as_sysfs(sysfs)
    virtfns = virtfns or (lambda pf: virtfn_map(fs, pf))
    for pf in (pf_hint, physfn(fs, vf)):
        if pf:
            index = virtfns(pf).get(vf)
            if index is not None:
                return pf, index
    return None


def pf_netdev(sysfs, pf: str) -> str:
    """The PF's own netdev: switchdev representors share its net/ directory."""
    fs = as_sysfs(sysfs)
    for name in sorted(fs.listdir(fs.path("bus", "pci", "devices", pf, "net")) or ()):
        port = fs.read_text_or_empty(fs.path("bus", "pci", "devices", pf, "net", name, "phys_port_name"))
        if not _REPRESENTOR.match(port):
            return name
    return ""


def vf_host_netdev(sysfs, vf: str) -> str:
    """The VF's netdev when it sits in the host netns (a free kernel-bound VF)."""
    fs = as_sysfs(sysfs)
    names = sorted(fs.listdir(fs.path("bus", "pci", "devices", vf, "net")) or ())
    return names[0] if names else ""


def bound_driver(sysfs, address: str) -> str:
    fs = as_sysfs(sysfs)
    return fs.link_name(fs.path("bus", "pci", "devices", address, "driver"))


def numa_node(sysfs, pf: str) -> str:
    fs = as_sysfs(sysfs)
    text = fs.read_text_or_empty(fs.path("bus", "pci", "devices", pf, "numa_node"))
    return "" if text in ("", "-1") or not text.lstrip("-").isdigit() else text


def stats_path(sysfs, pf: str, index: int) -> str:
    return as_sysfs(sysfs).path("bus", "pci", "devices", pf, "sriov", str(index), "stats")


def choose_reader(stats: str, netdev: str, allowed: Iterable[str], sysfs=None) -> str:
    """The first reader in `allowed` whose layout is there for this PF."""
    fs = as_sysfs(sysfs) if sysfs is not None else _fs_for(stats)
    kind = fs.kind(stats)
    for reader in allowed:
        if reader == readers.INTEL and kind == "dir":
            return reader
        # "other": a stats entry we will not read; the file reader says why, per VF
        if reader == readers.MELLANOX and kind in ("file", "other"):
            return reader
        if reader == readers.NETLINK and netdev:
            return reader
    return readers.NONE


def _fs_for(path: str) -> Sysfs:
    """A Sysfs rooted where `path`'s device tree starts (for callers with a bare path)."""
    parts = path.split("/bus/pci/devices/", 1)
    return Sysfs(parts[0] if len(parts) == 2 else "/")


def list_sriov_vfs(sysfs) -> list[tuple[str, str]]:
    """(VF, PF) PCI addresses of every VF on the node."""
    fs = as_sysfs(sysfs)
    out = []
    for pf in sorted(fs.listdir(fs.path("bus", "pci", "devices")) or ()):
        if not pci_address(pf):
            continue
        if fs.read_text_or_empty(fs.path("bus", "pci", "devices", pf, "sriov_numvfs")) in ("", "0"):
            continue
        names = fs.listdir(fs.path("bus", "pci", "devices", pf)) or ()
        links = sorted((int(n[6:]), n) for n in names if n.startswith("virtfn") and n[6:].isdigit())
        for _, name in links:
            vf = _pci_link(fs, fs.path("bus", "pci", "devices", pf, name))
            if vf:
                out.append((vf, pf))
    return out
