"""Fake sysfs trees with SR-IOV PFs and VFs, laid out as the kernel makes them.

One source of truth for the layout: the lab writes `LAB_LAYOUT` with
`write_sriov_fixture(root)` and starts the collector with `--path.sysfs=<root>`;
tests/fixtures/sysfs/ is `TEST_LAYOUT` written by `python3 -m lab.sriov_fixture
tests/fixtures/sysfs --layout test --replace`, and tests/test_sriov.py checks
the committed tree still equals what this module writes.

What it writes, per PF (all links RELATIVE, as sysfs_create_link makes them):
  devices/<parent>/<pf>/{vendor,device,class,numa_node,sriov_numvfs,sriov_totalvfs}
  devices/<parent>/<pf>/driver -> ../../../../bus/pci/drivers/<driver>
  devices/<parent>/<pf>/virtfnN -> ../<vf>
  devices/<parent>/<pf>/net/<netdev>/{address,ifindex,phys_port_name?,device -> ../../../<pf>}
  devices/<parent>/<pf>/sriov/<N>/stats/<counter>   (intel: one value a file)
  devices/<parent>/<pf>/sriov/<N>/stats             (mellanox: `key : value` lines)
  devices/<parent>/<vf>/{physfn -> ../<pf>, driver -> ..., numa_node, net/<netdev>?}
  bus/pci/devices/<addr> -> ../../../devices/<parent>/<addr>
  bus/pci/drivers/<driver>/<addr> -> ../../../../devices/<parent>/<addr>
  class/net/<netdev> -> ../../devices/<parent>/<addr>/net/<netdev>
"""
from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass, field

from collector.sriov_readers import COUNTERS, INTEL, MELLANOX, NETLINK
from lab.rdma_fixture import IbPort, write_ib_device

INTEL_FILES = ("rx_bytes", "rx_dropped", "rx_packets", "tx_bytes", "tx_dropped",
               "tx_packets", "tx_spoofed", "tx_errors")
# mlx5 sriov_sysfs.c stats_show order: all 10 lines, each a planewatch metric.
MELLANOX_KEYS = ("tx_packets", "tx_bytes", "tx_dropped", "rx_packets", "rx_bytes", "rx_broadcast",
                 "rx_multicast", "tx_broadcast", "tx_multicast", "rx_dropped")
NETLINK_KEYS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_broadcast", "rx_multicast",
                "rx_dropped", "tx_dropped")
LAYOUT_KEYS = {"intel": INTEL_FILES, "mellanox": MELLANOX_KEYS, "netlink": NETLINK_KEYS}
LAYOUT_READER = {"intel": INTEL, "mellanox": MELLANOX, "netlink": NETLINK}


@dataclass(frozen=True)
class VfSpec:
    address: str
    driver: str = ""          # "" = unbound
    netdev: str = ""          # the VF's netdev in the host netns (a free kernel-bound VF)
    seed: int = 1             # makes every counter of every VF distinct
    rdma: str = ""            # IB device the VF owns (mlx5 VFs), written by lab/rdma_fixture.py


@dataclass(frozen=True)
class PfSpec:
    address: str
    parent: str               # "pci0000:3a/0000:3a:00.0": host bridge / root port
    netdev: str
    driver: str
    layout: str               # intel | mellanox | netlink (no sriov/ stats at all)
    vendor: str
    pf_device: str
    vf_device: str
    numa_node: int = 0
    vfs: tuple[VfSpec, ...] = ()
    phys_port_name: str = ""
    representors: tuple[tuple[str, str], ...] = ()   # (netdev, phys_port_name), switchdev


def counters_for(vf: VfSpec, layout: str) -> dict[str, int]:
    """The driver's raw counters for one VF: distinct, some past 2**32."""
    return {key: vf.seed * 10**10 + i * 1001 + 3 for i, key in enumerate(LAYOUT_KEYS[layout])}


def expected_metrics(counters: dict[str, int]) -> dict[str, int]:
    """metric name -> value that /metrics must show for these raw counters."""
    return {COUNTERS[k][0]: v for k, v in counters.items() if k in COUNTERS}


LAB_LAYOUT = (
    PfSpec("0000:3b:00.0", "pci0000:3a/0000:3a:00.0", "ens1f0", "i40e", "intel",
           "0x8086", "0x1572", "0x154c", numa_node=0,
           vfs=(VfSpec("0000:3b:02.0", "iavf", seed=1), VfSpec("0000:3b:02.1", "vfio-pci", seed=2))),
    PfSpec("0000:5e:00.0", "pci0000:5d/0000:5d:00.0", "ens2f0np0", "mlx5_core", "mellanox",
           "0x15b3", "0x1017", "0x1018", numa_node=1, phys_port_name="p0",
           vfs=(VfSpec("0000:5e:00.2", "mlx5_core", seed=3, rdma="mlx5_2"),)),
)

TEST_LAYOUT = (
    PfSpec("0000:3b:00.0", "pci0000:3a/0000:3a:00.0", "ens1f0", "i40e", "intel",
           "0x8086", "0x1572", "0x154c", numa_node=0,
           vfs=(VfSpec("0000:3b:02.0", "iavf", seed=1), VfSpec("0000:3b:02.1", "vfio-pci", seed=2),
                VfSpec("0000:3b:02.2", "iavf", netdev="ens1f0v2", seed=3))),
    PfSpec("0000:5e:00.0", "pci0000:5d/0000:5d:00.0", "ens2f0np0", "mlx5_core", "mellanox",
           "0x15b3", "0x1017", "0x1018", numa_node=1, phys_port_name="p0",
           representors=(("ens2f0_0", "pf0vf0"), ("ens2f0_1", "pf0vf1")),
           vfs=(VfSpec("0000:5e:00.2", "mlx5_core", seed=4, rdma="mlx5_2"),
                VfSpec("0000:5e:00.3", "vfio-pci", seed=5))),
    PfSpec("0000:af:00.0", "pci0000:ae/0000:ae:00.0", "ens3f0", "ice", "netlink",
           "0x8086", "0x159b", "0x1889", numa_node=-1,
           vfs=(VfSpec("0000:af:01.0", "iavf", seed=6), VfSpec("0000:af:01.1", "vfio-pci", seed=7),
                VfSpec("0000:af:01.2", "", seed=8))),
)


@dataclass
class _Writer:
    root: str
    ifindex: int = 10
    written: list = field(default_factory=list)

    def file(self, rel: str, text: str) -> None:
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def link(self, rel: str, target: str, relative_to_root: bool = True) -> None:
        """Symlink at `rel`; `target` is root-relative unless told otherwise."""
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if relative_to_root:
            target = os.path.relpath(os.path.join(self.root, target), os.path.dirname(path))
        os.symlink(target, path)

    def device(self, parent: str, address: str, vendor: str, device: str, driver: str, numa: int) -> str:
        base = f"devices/{parent}/{address}"
        self.file(f"{base}/vendor", vendor + "\n")
        self.file(f"{base}/device", device + "\n")
        self.file(f"{base}/class", "0x020000\n")
        self.file(f"{base}/numa_node", f"{numa}\n")
        self.link(f"bus/pci/devices/{address}", base)
        if driver:
            self.link(f"{base}/driver", f"bus/pci/drivers/{driver}")
            self.link(f"bus/pci/drivers/{driver}/{address}", base)
        return base

    def netdev(self, base: str, address: str, name: str, phys_port_name: str = "") -> None:
        self.ifindex += 1
        nd = f"{base}/net/{name}"
        self.file(f"{nd}/ifindex", f"{self.ifindex}\n")
        self.file(f"{nd}/address", f"02:00:00:00:{self.ifindex // 256:02x}:{self.ifindex % 256:02x}\n")
        self.file(f"{nd}/carrier_changes", f"{self.ifindex * 2 + 1}\n")
        if phys_port_name:
            self.file(f"{nd}/phys_port_name", phys_port_name + "\n")
        # the kernel's link goes up to the common ancestor's parent: ../../../<pf>
        self.link(f"{nd}/device", f"../../../{address}", relative_to_root=False)
        self.link(f"class/net/{name}", nd)


def _write_stats(w: _Writer, pf_base: str, pf: PfSpec, index: int, counters: dict[str, int]) -> None:
    sriov = f"{pf_base}/sriov/{index}"
    if pf.layout == "intel":
        for key, value in counters.items():
            w.file(f"{sriov}/stats/{key}", f"{value}\n")
    elif pf.layout == "mellanox":
        w.file(f"{sriov}/stats", "".join(f"{k:<14}: {v}\n" for k, v in counters.items()))
        w.file(f"{sriov}/config", f"VF         : {index}\nSpoofCheck : OFF\nTrust      : OFF\n")
        w.file(f"{pf_base}/sriov/pf/min_tx_rate", "0\n")


def write_tree(root: str, layout=TEST_LAYOUT) -> dict:
    """Write `layout` under `root`; return what the collector must report."""
    w = _Writer(root)
    vfs = []
    for pf in layout:
        pf_base = w.device(pf.parent, pf.address, pf.vendor, pf.pf_device, pf.driver, pf.numa_node)
        w.file(f"{pf_base}/sriov_totalvfs", "64\n")
        w.file(f"{pf_base}/sriov_numvfs", f"{len(pf.vfs)}\n")
        w.netdev(pf_base, pf.address, pf.netdev, pf.phys_port_name)
        for name, port in pf.representors:
            w.netdev(pf_base, pf.address, name, port)
        for index, vf in enumerate(pf.vfs):
            base = w.device(pf.parent, vf.address, pf.vendor, pf.vf_device, vf.driver, pf.numa_node)
            w.link(f"{base}/physfn", pf_base)
            w.link(f"{pf_base}/virtfn{index}", base)
            if vf.netdev:
                w.netdev(base, vf.address, vf.netdev)
            counters = counters_for(vf, pf.layout)
            _write_stats(w, pf_base, pf, index, counters)
            rdma = write_ib_device(root, base, vf.rdma, (IbPort(seed=vf.seed),)) if vf.rdma else None
            vfs.append({
                "pci_address": vf.address, "pf_pci_address": pf.address, "pf": pf.netdev,
                "vf": index, "driver": vf.driver, "host_netdev": vf.netdev,
                "carrier_changes": w.ifindex * 2 + 1 if vf.netdev else None,
                "numa_node": "" if pf.numa_node < 0 else str(pf.numa_node),
                "reader": LAYOUT_READER[pf.layout], "counters": counters,
                "metrics": expected_metrics(counters), "rdma": rdma,
            })
    return {"sysfs": root, "vfs": vfs}


def write_sriov_fixture(root: str) -> dict:
    """The lab's tree: an Intel-style PF with 2 VFs and a Mellanox-style PF with 1.

    Returns {"sysfs": root, "vfs": [{pci_address, pf_pci_address, pf, vf, driver,
    numa_node, reader, counters, metrics}]}; `metrics` maps each planewatch metric
    name to the value /metrics must show for a pod whose network-status carries
    `"device-info": {"type": "pci", "pci": {"pci-address": <pci_address>}}`.
    """
    return write_tree(root, LAB_LAYOUT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--layout", choices=("lab", "test"), default="lab")
    ap.add_argument("--replace", action="store_true", help="remove root first")
    args = ap.parse_args(argv)
    if os.path.lexists(args.root) and os.listdir(args.root):
        if not args.replace:
            ap.error(f"{args.root} is not empty (use --replace)")
        shutil.rmtree(args.root)
    result = write_tree(args.root, LAB_LAYOUT if args.layout == "lab" else TEST_LAYOUT)
    for vf in result["vfs"]:
        print(vf["pci_address"], vf["pf"], vf["vf"], vf["driver"] or "-", vf["reader"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
