"""InfiniBand/RDMA devices in a fake sysfs tree, laid out as ib_core and mlx5 make them.

drivers/infiniband/core/sysfs.c creates, under the PCI function that owns it:
  devices/<parent>/<pci>/infiniband/<dev>/{node_type,node_guid,sys_image_guid,fw_ver,hca_type,board_id}
  devices/<parent>/<pci>/infiniband/<dev>/device -> ../../../<pci>
  devices/<parent>/<pci>/infiniband/<dev>/ports/<n>/{state,phys_state,rate,link_layer,lid,sm_lid,cap_mask}
  devices/<parent>/<pci>/infiniband/<dev>/ports/<n>/counters/<pma counter>     (one value a file)
  devices/<parent>/<pci>/infiniband/<dev>/ports/<n>/hw_counters/<driver counter> (+ `lifespan`, ms)
  class/infiniband/<dev> -> ../../devices/<parent>/<pci>/infiniband/<dev>
`state` reads "4: ACTIVE", `phys_state` "5: LinkUp", `rate` "100 Gb/sec (4X EDR)".
port_xmit_data / port_rcv_data are PMA values: octets divided by 4.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# ib_core's PortCounters/PortCountersExtended attributes (sysfs.c pma_table / pma_table_ext)
PMA_COUNTERS = ("symbol_error", "link_error_recovery", "link_downed", "port_rcv_errors",
                "port_rcv_remote_physical_errors", "port_rcv_switch_relay_errors", "port_xmit_discards",
                "port_xmit_constraint_errors", "port_rcv_constraint_errors", "local_link_integrity_errors",
                "excessive_buffer_overrun_errors", "VL15_dropped", "port_xmit_data", "port_rcv_data",
                "port_xmit_packets", "port_rcv_packets", "port_xmit_wait", "unicast_xmit_packets",
                "unicast_rcv_packets", "multicast_xmit_packets", "multicast_rcv_packets")
# a subset of mlx5's hw_counters (drivers/infiniband/hw/mlx5/counters.c names)
MLX5_HW_COUNTERS = ("duplicate_request", "implied_nak_seq_err", "local_ack_timeout_err", "out_of_buffer",
                    "out_of_sequence", "packet_seq_err", "rnr_nak_retry_err", "rx_read_requests",
                    "rx_write_requests", "np_cnp_sent", "rp_cnp_handled", "np_ecn_marked_roce_packets",
                    "roce_adp_retrans", "roce_slow_restart")


@dataclass(frozen=True)
class IbPort:
    number: int = 1
    state: str = "4: ACTIVE"
    phys_state: str = "5: LinkUp"
    rate: str = "100 Gb/sec (4X EDR)"
    link_layer: str = "InfiniBand"
    seed: int = 1


def port_counters(port: IbPort) -> dict[str, int]:
    return {name: port.seed * 10**9 + i * 7919 + 11 for i, name in enumerate(PMA_COUNTERS)}


def port_hw_counters(port: IbPort) -> dict[str, int]:
    return {name: port.seed * 10**6 + i * 31 + 5 for i, name in enumerate(MLX5_HW_COUNTERS)}


def _file(root: str, rel: str, text: str) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _link(root: str, rel: str, target_rel_to_root: str) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(os.path.relpath(os.path.join(root, target_rel_to_root), os.path.dirname(path)), path)


def write_ib_device(root: str, pci_base: str, name: str, ports: tuple[IbPort, ...], hca: str = "MT4126") -> dict:
    """Write one IB device under `pci_base` (root-relative PCI device dir); return its expected values."""
    base = f"{pci_base}/infiniband/{name}"
    _file(root, f"{base}/node_type", "1: CA\n")
    _file(root, f"{base}/node_guid", "0c42:a103:0017:62a4\n")
    _file(root, f"{base}/sys_image_guid", "0c42:a103:0017:62a2\n")
    _file(root, f"{base}/fw_ver", "22.39.1002\n")
    _file(root, f"{base}/hca_type", hca + "\n")
    _file(root, f"{base}/board_id", "MT_0000000540\n")
    # as the kernel links it: up to the common ancestor's parent, then the PCI function's name
    os.symlink(f"../../../{os.path.basename(pci_base)}", os.path.join(root, base, "device"))
    _link(root, f"class/infiniband/{name}", base)
    expected = {}
    for port in ports:
        p = f"{base}/ports/{port.number}"
        _file(root, f"{p}/state", port.state + "\n")
        _file(root, f"{p}/phys_state", port.phys_state + "\n")
        _file(root, f"{p}/rate", port.rate + "\n")
        _file(root, f"{p}/link_layer", port.link_layer + "\n")
        _file(root, f"{p}/lid", "0x12\n")
        _file(root, f"{p}/sm_lid", "0x1\n")
        _file(root, f"{p}/cap_mask", "0xa651e848\n")
        counters, hw = port_counters(port), port_hw_counters(port)
        for key, value in counters.items():
            _file(root, f"{p}/counters/{key}", f"{value}\n")
        for key, value in hw.items():
            _file(root, f"{p}/hw_counters/{key}", f"{value}\n")
        _file(root, f"{p}/hw_counters/lifespan", "10\n")
        expected[port.number] = {"counters": counters, "hw_counters": hw, "port": port}
    return {"device": name, "ports": expected}
