"""Pod drill-down: every interface of one pod with its network and plane, its
counters, the kernel's drop reasons, and the VF counters (PF view) next to the
in-pod counters (netlink) and the eBPF counters for the same interface.
"""
from dashboards.generate import dashboard, graph, selector, table, target

# One pod: no node filter needed, plane narrows its interfaces.
POD_FILTERS = ('namespace=~"$namespace"', 'pod=~"$pod"', 'plane=~"$plane"')
RATE = "[$__rate_interval]"


def pod_selector(*extra: str) -> str:
    return selector(*extra, filters=POD_FILTERS)


def per_interface(metric: str) -> str:
    return f"sum by (interface, network, plane) (rate({metric}{pod_selector()}{RATE}))"


def interfaces():
    return table("Interfaces", [
        target(f"planewatch_pod_interface_info{pod_selector()}", instant=True),
        target(f"planewatch_interface_up{pod_selector()}", instant=True),
        target(f"planewatch_interface_mtu_bytes{pod_selector()}", instant=True),
    ], description="From the network-status annotation (mac, ips, device-info) and netlink "
                   "(up, MTU). Value #B is up (1/0), #C the MTU.")


def packets():
    return graph("Packets per interface", [
        target(per_interface("planewatch_interface_receive_packets_total"), "{{interface}} ({{network}}, {{plane}}) rx"),
        target(per_interface("planewatch_interface_transmit_packets_total"), "{{interface}} ({{network}}, {{plane}}) tx"),
    ], unit="pps")


def throughput():
    return graph("Throughput per interface", [
        target("8 * " + per_interface("planewatch_interface_receive_bytes_total"), "{{interface}} rx"),
        target("8 * " + per_interface("planewatch_interface_transmit_bytes_total"), "{{interface}} tx"),
    ], unit="bps")


def drops_and_errors():
    return graph("Drops and errors per interface", [
        target(per_interface(f"planewatch_interface_{d}_{kind}_total"), f"{{{{interface}}}} {d} {kind}")
        for d in ("receive", "transmit") for kind in ("drops", "errors")
    ], unit="pps")


def drops_by_reason():
    return graph("Kernel drops by reason", [
        target(f"sum by (interface, reason) (rate(planewatch_packet_drops_total{pod_selector()}{RATE}))",
               "{{interface}} {{reason}}"),
    ], unit="pps", description="kfree_skb drop reasons seen by eBPF for packets of this pod.")


def loss_ratios():
    pod = "namespace_pod_network_plane"
    return graph("Loss ratios per network", [
        target(f"{pod}:planewatch_interface_loss:ratio_rate5m{pod_selector()}", "{{network}} interface"),
        target(f"{pod}:planewatch_packet_drops:ratio_rate5m{pod_selector()}", "{{network}} kernel"),
        target(f"{pod}:planewatch_vf_drops:ratio_rate5m{pod_selector()}", "{{network}} VF"),
    ], unit="percentunit")


def views_compared(direction: str):
    return graph(f"{direction.capitalize()} packets: VF, in-pod and eBPF counters", [
        target(f"sum by (interface) (rate(planewatch_vf_{direction}_packets_total{pod_selector()}{RATE}))",
               "{{interface}} VF (PF view)"),
        target(f"sum by (interface) (rate(planewatch_interface_{direction}_packets_total{pod_selector()}{RATE}))",
               "{{interface}} netlink (pod view)"),
        target(f"sum by (interface) (rate(planewatch_ebpf_interface_{direction}_packets_total{pod_selector()}{RATE}))",
               "{{interface}} eBPF"),
    ], unit="pps", description="The same interface counted three ways; a gap between the VF "
                               "and the pod view is loss between the NIC and the pod.")


dashboard = dashboard(
    "planewatch / Pod", uid="planewatch-pod",
    description="Every interface of one pod: network, plane, counters, drop reasons.",
    single_pod=True,
    rows=[
        [interfaces()],
        [packets(), throughput()],
        [drops_and_errors(), drops_by_reason()],
        [loss_ratios()],
        [views_compared("receive"), views_compared("transmit")],
    ],
)
