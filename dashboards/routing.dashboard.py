"""Routing of multi-homed pods: flows answered by another interface than the one
they came in on, routes that leave by the wrong interface, rp_filter settings and
the packets rp_filter drops.
"""
from dashboards.generate import dashboard, graph, selector, table, target

RATE = "[$__rate_interval]"


def asymmetric_flows():
    return graph("Asymmetric packets (in on one interface, out on another)", [
        target("sum by (namespace, pod, ingress_interface, egress_interface) "
               f"(rate(planewatch_asymmetric_packets_total{selector()}{RATE}))",
               "{{namespace}}/{{pod}} in {{ingress_interface}} out {{egress_interface}}"),
    ], unit="pps")


def rp_filter_drops():
    rpfilter = selector('reason="IP_RPFILTER"')
    return graph("Reverse-path filter drops", [
        target("sum by (namespace, pod, interface) "
               f"(rate(planewatch_packet_drops_total{rpfilter}{RATE}))",
               "{{namespace}}/{{pod}} {{interface}}"),
    ], unit="pps", description="kfree_skb reason IP_RPFILTER: packets strict rp_filter dropped.")


def route_mismatches():
    return table("Route mismatches", [
        target(f"planewatch_route_mismatch{selector()} == 1", instant=True),
    ], description="Destinations of a network's subnet or gateway that the pod routes out of "
                   "another interface (egress_interface).")


def rp_filter_settings():
    return table("rp_filter per interface", [
        target(f"planewatch_interface_rp_filter{selector()}", instant=True),
    ], value_text={"0": "0 off", "1": "1 strict", "2": "2 loose"})


def strict_multihomed():
    return table("Strict rp_filter on multi-homed pods", [
        target(f"planewatch_interface_rp_filter{selector()} == 1 and on (namespace, pod) "
               "count by (namespace, pod) (planewatch_pod_interface_info) > 1", instant=True),
    ], description="The condition of PlanewatchStrictReversePathFilterMultihomed.")


dashboard = dashboard(
    "planewatch / Routing", uid="planewatch-routing",
    description="Asymmetric flows, route mismatches and rp_filter of multi-homed pods.",
    rows=[
        [asymmetric_flows(), rp_filter_drops()],
        [route_mismatches()],
        [rp_filter_settings(), strict_multihomed()],
    ],
)
