"""Plane overview: which plane loses packets, which pods carry the loss, how much
traffic each plane moves.

Loss per plane is cluster-wide (the same recording rules and thresholds the alerts
use); the per-pod and throughput panels follow the node/namespace/pod filters.
"""
from dashboards.generate import dashboard, dashed, graph, selector, table, target

POD = "namespace_pod_network_plane"


def loss_per_plane():
    return graph("Interface loss per plane (cluster)", [
        target('plane:planewatch_interface_loss:ratio_rate5m{plane=~"$plane"}', "{{plane}}"),
        target('plane:planewatch_packet_loss_threshold:ratio{plane=~"$plane"}', "{{plane}} threshold"),
    ], unit="percentunit", overrides=[dashed(".* threshold")],
        description="(drops + errors) / (packets + drops + errors), rx and tx, over 5m; "
                    "dashed lines: the alert threshold of each plane.")


def other_drops_per_plane():
    return graph("Kernel and VF drops per plane (cluster)", [
        target('plane:planewatch_packet_drops:ratio_rate5m{plane=~"$plane"}', "{{plane}} kernel (eBPF)"),
        target('plane:planewatch_vf_drops:ratio_rate5m{plane=~"$plane"}', "{{plane}} VF (PF view)"),
    ], unit="percentunit",
        description="Packets the kernel freed as dropped (any reason), and SR-IOV VF drops, "
                    "over the packets of the plane.")


def top_pods_by_loss():
    return table("Top pods by interface loss", [
        target(f"topk(10, {POD}:planewatch_interface_loss:ratio_rate5m{selector()})", instant=True),
    ], description="The ten pod networks with the highest loss ratio over the last 5m.")


def loss_per_node():
    return graph("Interface loss per node and plane", [
        target('node_plane:planewatch_interface_loss:ratio_rate5m{node=~"$node", plane=~"$plane"}',
               "{{node}} {{instance}} {{plane}}"),
    ], unit="percentunit")


def throughput(direction: str):
    return graph(f"{direction.capitalize()} throughput per plane", [
        target(f"8 * sum by (plane) ({POD}:planewatch_interface_{direction}_bytes:rate5m{selector()})",
               "{{plane}}"),
    ], unit="bps")


def packet_rate():
    return graph("Packet rate per plane", [
        target(f"sum by (plane) ({POD}:planewatch_interface_receive_packets:rate5m{selector()})",
               "{{plane}} rx"),
        target(f"sum by (plane) ({POD}:planewatch_interface_transmit_packets:rate5m{selector()})",
               "{{plane}} tx"),
    ], unit="pps")


# --- reachability: is each plane's gateway answering? ---------------------------------

def unreachable_per_plane():
    return graph("Attachments that cannot reach their gateway, per plane (cluster)", [
        target('plane:planewatch_gateway_unreachable:ratio{plane=~"$plane"}', "{{plane}}"),
    ], unit="percentunit",
        description="Share of the plane's pod attachments with a gateway or next hop that does not "
                    "answer ARP/NDP: neighbour entry failed/incomplete in the pod, or every active probe "
                    "of the last 2m lost. Half of a plane (two pods or more) = plane outage alert.")


def gateway_states():
    return table("Gateway neighbour state", [
        target(f"planewatch_gateway_neighbour_state{selector()} == 1", instant=True),
    ], description="Each gateway and route next hop of each pod attachment, with the state of its "
                   "neighbour entry in the pod (none = never resolved). Filter the state column for "
                   "failed/incomplete during an incident.")


def probe_rtt():
    bucket = f"planewatch_gateway_probe_rtt_seconds_bucket{selector()}"
    return graph("Gateway probe RTT per plane (opt-in probes)", [
        target(f"histogram_quantile(0.5, sum by (le, plane) (rate({bucket}[$__rate_interval])))", "{{plane}} p50"),
        target(f"histogram_quantile(0.99, sum by (le, plane) (rate({bucket}[$__rate_interval])))", "{{plane}} p99"),
    ], unit="s", description="ARP/NDP request to reply, from inside the pods of the planes given in "
                             "--collector.neighbours.probe-planes.")


def probe_loss():
    return graph("Gateway probe loss (opt-in probes)", [
        target(f"{POD}:planewatch_gateway_probe_loss:ratio_rate5m{selector()}",
               "{{namespace}}/{{pod}} {{network}}"),
    ], unit="percentunit", description="Unanswered probes over probes, per pod network, over 5m.")


dashboard = dashboard(
    "planewatch / Planes", uid="planewatch-planes",
    description="Loss, throughput and gateway reachability per network plane of multi-homed pods.",
    rows=[
        [loss_per_plane(), other_drops_per_plane()],
        [top_pods_by_loss(), loss_per_node()],
        [throughput("receive"), throughput("transmit"), packet_rate()],
        [unreachable_per_plane(), gateway_states()],
        [probe_rtt(), probe_loss()],
    ],
)
