"""`planewatch inspect`: rates, drops, reasons and findings from two scrapes."""
from __future__ import annotations

from exporters.inspect import build_rows, parse, plane_summary, render_table, select

L = 'namespace="telco",pod="upf-a",network="telco/data",interface="net2",plane="data"'
L1 = 'namespace="telco",pod="upf-a",network="telco/sig",interface="net1",plane="signaling"'


def scrape(rx: int, drops: int, reason: int, asym: int) -> dict:
    return parse(f"""# TYPE planewatch_pod_interface_info gauge
planewatch_pod_interface_info{{{L},mac="02:00:00:00:00:01",ips="10.72.0.10",device_type="pci",pci_address="0000:3b:02.1"}} 1
planewatch_pod_interface_info{{{L1},mac="02:00:00:00:00:02",ips="10.71.0.10",device_type="",pci_address=""}} 1
# TYPE planewatch_interface_receive_packets_total counter
planewatch_interface_receive_packets_total{{{L}}} {rx}
planewatch_interface_receive_packets_total{{{L1}}} 5
# TYPE planewatch_interface_receive_drops_total counter
planewatch_interface_receive_drops_total{{{L}}} {drops}
# TYPE planewatch_packet_drops_total counter
planewatch_packet_drops_total{{{L},reason="IP_RPFILTER"}} {reason}
# TYPE planewatch_asymmetric_packets_total counter
planewatch_asymmetric_packets_total{{{L1},ingress_interface="net1",egress_interface="eth0"}} {asym}
# TYPE planewatch_vf_info gauge
planewatch_vf_info{{{L},pf="ens1f0",vf="1",pci_address="0000:3b:02.1",driver="vfio-pci",numa_node="0",reader="sysfs-intel"}} 1
# TYPE planewatch_gateway_neighbour_state gauge
planewatch_gateway_neighbour_state{{{L1},gateway="10.71.255.254",state="failed"}} 1
planewatch_gateway_neighbour_state{{{L1},gateway="10.71.255.254",state="reachable"}} 0
planewatch_gateway_neighbour_state{{{L},gateway="10.72.255.254",state="failed"}} 0
planewatch_gateway_neighbour_state{{{L},gateway="10.72.255.254",state="stale"}} 1
# TYPE planewatch_gateway_neighbour_updated_age_seconds gauge
planewatch_gateway_neighbour_updated_age_seconds{{{L1},gateway="10.71.255.254"}} 42.3
# TYPE planewatch_gateway_probes_total counter
planewatch_gateway_probes_total{{{L},gateway="10.72.255.254"}} {rx // 100}
# TYPE planewatch_gateway_probe_failures_total counter
planewatch_gateway_probe_failures_total{{{L},gateway="10.72.255.254"}} {asym // 2}
""")


def test_rates_reasons_vf_and_findings():
    before, after = scrape(1000, 10, 0, 0), scrape(3000, 50, 20, 8)
    debug = {"findings": [{"namespace": "telco", "pod": "upf-a", "interface": "net1",
                           "kind": "route_mismatch", "sentence": "replies to 10.71.5.9 leave by eth0"}]}
    rows = build_rows(before, after, debug, interval=2.0)
    by = {r.interface: r for r in rows}
    assert by["net2"].rx_pps == 1000.0 and by["net2"].drops_per_s == 20.0
    assert by["net2"].drop_reasons == {"IP_RPFILTER": 10.0}
    assert by["net2"].vf == "ens1f0/vf1"
    assert by["net1"].rx_pps == 0.0 and by["net1"].asymmetric_per_s == 4.0
    assert by["net1"].findings == ["replies to 10.71.5.9 leave by eth0"]
    assert rows[0].interface == "net2"            # the lossiest first
    assert [r.interface for r in select(rows, plane="signaling")] == ["net1"]
    assert select(rows, pod="telco/other") == [] and len(select(rows, pod="upf-a")) == 2
    table = render_table(rows)
    assert "IP_RPFILTER=10" in table and "ens1f0/vf1" in table
    # reachability: the current state of each gateway, how long, and probe loss between the reads
    assert by["net1"].gateways == ["10.71.255.254 failed for 42s"]
    assert by["net2"].gateways == ["10.72.255.254 stale probe loss 20%"]     # 4 lost of 20 probes
    assert "10.71.255.254 failed for 42s" in table
    assert table.splitlines()[0].split()[:4] == ["POD", "INTERFACE", "NETWORK", "PLANE"]
    # loss as the recording rules define it: the eBPF reasons explain, they are not added
    assert "data: 1.0k pps, 20 lost/s (1.96%)" in plane_summary(rows)


def test_counter_reset_counts_from_zero():
    rows = build_rows(scrape(5000, 0, 0, 0), scrape(400, 0, 0, 0), {}, interval=1.0)
    assert {r.interface: r.rx_pps for r in rows}["net2"] == 400.0
