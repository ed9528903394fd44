"""SR-IOV per PF and VF: the VF counters read from the PF side (so DPDK/vfio VFs
are covered), joined to `planewatch_vf_info` for the PF name and VF index.
"""
from dashboards.generate import dashboard, graph, selector, table, target

RATE = "[$__rate_interval]"
JOIN = "on (instance, namespace, pod, network, interface)"


def per_vf(metric: str) -> str:
    """Rate of a VF counter per PF/VF, with the pod it belongs to."""
    return (f"sum by (node, pf, vf, namespace, pod) (rate({metric}{selector()}{RATE}) "
            f"* {JOIN} group_left (pf, vf) planewatch_vf_info)")


def per_pf(metric: str) -> str:
    return (f"sum by (node, pf) (rate({metric}{selector()}{RATE}) "
            f"* {JOIN} group_left (pf) planewatch_vf_info)")


VF_LEGEND = "{{pf}} vf {{vf}} {{namespace}}/{{pod}}"


def vf_table():
    return table("VFs", [target(f"planewatch_vf_info{selector()}", instant=True)],
                 description="PF, VF index, PCI address, driver, NUMA node and the pod using it.")


def pf_throughput():
    return graph("Throughput per PF (VFs in pods)", [
        target("8 * " + per_pf("planewatch_vf_receive_bytes_total"), "{{node}} {{pf}} rx"),
        target("8 * " + per_pf("planewatch_vf_transmit_bytes_total"), "{{node}} {{pf}} tx"),
    ], unit="bps")


def vf_packets(direction: str):
    return graph(f"VF {direction} packets", [
        target(per_vf(f"planewatch_vf_{direction}_packets_total"), VF_LEGEND),
    ], unit="pps")


def vf_drops():
    return graph("VF drops", [
        target(per_vf("planewatch_vf_receive_drops_total"), VF_LEGEND + " rx"),
        target(per_vf("planewatch_vf_transmit_drops_total"), VF_LEGEND + " tx"),
    ], unit="pps")


def vf_broadcast_multicast():
    return graph("VF broadcast and multicast received", [
        target(per_vf("planewatch_vf_receive_broadcast_packets_total"), VF_LEGEND + " broadcast"),
        target(per_vf("planewatch_vf_receive_multicast_packets_total"), VF_LEGEND + " multicast"),
    ], unit="pps")


def vf_spoofed_and_errors():
    return graph("VF spoofed and transmit errors", [
        target(per_vf("planewatch_vf_transmit_spoofed_packets_total"), VF_LEGEND + " spoofed"),
        target(per_vf("planewatch_vf_transmit_errors_total"), VF_LEGEND + " tx errors"),
    ], unit="pps", description="Only drivers exposing sysfs VF stats (Intel) report these.")


dashboard = dashboard(
    "planewatch / SR-IOV", uid="planewatch-sriov",
    description="SR-IOV VF counters per PF and VF, read from the PF.",
    rows=[
        [vf_table()],
        [pf_throughput(), vf_drops()],
        [vf_packets("receive"), vf_packets("transmit")],
        [vf_broadcast_multicast(), vf_spoofed_and_errors()],
    ],
)
