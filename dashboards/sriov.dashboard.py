"""SR-IOV per PF and VF: the VF counters read from the PF side (so DPDK/vfio VFs
are covered), joined to `planewatch_vf_info` for the PF name and VF index; the
VFs' configuration, link flaps of the planes, RDMA ports, and device reads that
fail or are refused.
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


FLAP_PLANES = selector('plane=~"data|signaling"')
RETRANSMITS = selector('stat=~".*retrans.*|out_of_sequence|local_ack_timeout_err"')


def vf_config_table():
    return table("VF configuration", [target(f"planewatch_vf_config_info{selector()}", instant=True)],
                 description="Set on the PF: MAC, port VLAN/QoS, spoof check, trust, link state "
                             "(disable = forced down).")


def carrier_flaps():
    return graph("Carrier changes (data and signaling planes)", [
        target("sum by (node, plane, namespace, pod, interface) (increase("
               f"planewatch_interface_carrier_changes_total{FLAP_PLANES}[15m]))",
               "{{plane}} {{namespace}}/{{pod}} {{interface}}"),
    ], unit="short", description="Carrier up/down transitions in the last 15m; 4 or more alert.")


def rdma_throughput():
    return graph("RDMA port throughput", [
        target(f"8 * sum by (node, namespace, pod, interface, port) "
               f"(rate(planewatch_rdma_port_receive_bytes_total{selector()}{RATE}))",
               "{{namespace}}/{{pod}} {{interface}} port {{port}} rx"),
        target(f"8 * sum by (node, namespace, pod, interface, port) "
               f"(rate(planewatch_rdma_port_transmit_bytes_total{selector()}{RATE}))",
               "{{namespace}}/{{pod}} {{interface}} port {{port}} tx"),
    ], unit="bps")


def rdma_errors():
    legend = "{{namespace}}/{{pod}} {{interface}} port {{port}}"
    return graph("RDMA link errors and retransmits", [
        target(f"sum by (node, namespace, pod, interface, port) (rate("
               f"planewatch_rdma_port_symbol_errors_total{selector()}{RATE}))", legend + " symbol errors"),
        target(f"sum by (node, namespace, pod, interface, port) (increase("
               f"planewatch_rdma_port_link_downed_total{selector()}{RATE}))", legend + " link downed"),
        target(f"sum by (node, namespace, pod, interface, port, stat) (rate("
               f"planewatch_rdma_port_hw_events_total{RETRANSMITS}{RATE}))", legend + " {{stat}}"),
    ], unit="short")


def device_read_health():
    return graph("Device reads failing or refused", [
        target(f"sum by (node, namespace, pod, interface, reason) (rate(planewatch_vf_read_errors_total{selector()}{RATE}))",
               "VF {{namespace}}/{{pod}} {{interface}} {{reason}}"),
        target(f"sum by (node, namespace, pod, interface, reason) (rate(planewatch_rdma_read_errors_total{selector()}{RATE}))",
               "RDMA {{namespace}}/{{pod}} {{interface}} {{reason}}"),
        target(f"sum by (node, namespace, pod, interface, reason) (planewatch_vf_attachment_refused{selector()})",
               "refused VF {{namespace}}/{{pod}} {{interface}} {{reason}}"),
    ], unit="short", description="Reads that fail (errno from the driver) cost only their counter; refused "
                                 "device-info (bad format, outside the device tree) is never read.")


dashboard = dashboard(
    "planewatch / SR-IOV", uid="planewatch-sriov",
    description="SR-IOV VF counters per PF and VF, read from the PF.",
    rows=[
        [vf_table()],
        [pf_throughput(), vf_drops()],
        [vf_packets("receive"), vf_packets("transmit")],
        [vf_broadcast_multicast(), vf_spoofed_and_errors()],
        [vf_config_table()],
        [carrier_flaps(), device_read_health()],
        [rdma_throughput(), rdma_errors()],
    ],
)
