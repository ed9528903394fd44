"""Which VF counter becomes which metric, written out here and not taken from the
product (collector/sriov_readers.COUNTERS), so a swap there fails the tests.

Keys are the drivers' names (Intel `sriov/<vf>/stats/<name>`, Mellanox OFED
`config` fields, IFLA_VF_STATS_* as collector/sriov_readers.py maps them)."""
from __future__ import annotations

VF_METRIC = {
    "rx_bytes": "planewatch_vf_receive_bytes_total",
    "rx_packets": "planewatch_vf_receive_packets_total",
    "rx_dropped": "planewatch_vf_receive_drops_total",
    "rx_broadcast": "planewatch_vf_receive_broadcast_packets_total",
    "rx_multicast": "planewatch_vf_receive_multicast_packets_total",
    "tx_bytes": "planewatch_vf_transmit_bytes_total",
    "tx_packets": "planewatch_vf_transmit_packets_total",
    "tx_dropped": "planewatch_vf_transmit_drops_total",
    "tx_errors": "planewatch_vf_transmit_errors_total",
    "tx_spoofed": "planewatch_vf_transmit_spoofed_packets_total",
    "tx_broadcast": "planewatch_vf_transmit_broadcast_packets_total",
    "tx_multicast": "planewatch_vf_transmit_multicast_packets_total",
}


def with_expected_metrics(tree: dict) -> dict:
    """A fixture tree (lab/sriov_fixture.write_tree) whose per-VF "metrics" come
    from its raw "counters" through VF_METRIC, not through the product's table."""
    for vf in tree["vfs"]:
        vf["metrics"] = {VF_METRIC[k]: v for k, v in vf["counters"].items() if k in VF_METRIC}
    return tree
