"""What each writer's network-status `name` means (collector/netnames.py), one case
per pattern met in real clusters, read through the store and checked on /metrics
(network and plane labels, the missing-network series, planewatch_pod_ip_info).
All names and addresses are this file's own."""
from __future__ import annotations

import json
import re

import pytest

from collector.discovery import Store
from collector.model import InterfaceView, PodView
from collector.registry import Config, Snapshot
from collector.sources.attachments import AttachmentsSource
from exporters.exposition import render

NS = "shop"


def nad(name, config, namespace=NS, plane=""):
    meta = {"name": name, "namespace": namespace}
    if plane:
        meta["annotations"] = {"planewatch.io/plane": plane}
    return {"kind": "NetworkAttachmentDefinition", "metadata": meta, "spec": {"config": json.dumps(config)}}


def pod(status, request=None, legacy=False):
    ann = {("k8s.v1.cni.cncf.io/networks-status" if legacy else "k8s.v1.cni.cncf.io/network-status"):
           json.dumps(status)}
    if request is not None:
        ann["k8s.v1.cni.cncf.io/networks"] = request if isinstance(request, str) else json.dumps(request)
    return {"metadata": {"name": "cart-0", "namespace": NS, "uid": "7c0ffee0-0000-4000-8000-000000000001",
                         "annotations": ann},
            "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}


CASES = {
    # Multus >= 3.6: NADs as ns/name, the cluster network under its delegate name.
    "multus-3.6-qualified": dict(
        status=[{"name": "k8s-pod-network", "interface": "eth0", "ips": ["10.42.3.7"], "default": True},
                {"name": "shop/sig", "interface": "net1", "ips": ["172.20.0.7"]}],
        request="sig",
        want=[("k8s-pod-network", "eth0", "management"), ("shop/sig", "net1", "unclassified")],
        missing=[], ips=[("shop/sig", "172.20.0.7")]),
    # Calico/flannel without a config name: "" for the cluster network is normal.
    "nameless-default": dict(
        status=[{"name": "", "interface": "eth0", "ips": ["10.42.3.8"], "default": True}],
        want=[("", "eth0", "management")], missing=[], ips=[], errors={}),
    # OVN-K primary UDN: the delegate's name twice; the default entry is the UDN.
    "ovn-k-primary-udn": dict(
        nads=[nad("blue", {"name": "tenant_blue", "type": "ovn-k8s-cni-overlay", "role": "primary",
                           "topology": "layer2", "subnets": "10.150.0.0/16"})],
        status=[{"name": "ovn-kubernetes", "interface": "eth0", "ips": ["10.128.4.20"], "mac": "0a:58:0a:80:04:14"},
                {"name": "ovn-kubernetes", "interface": "ovn-udn1", "ips": ["10.150.0.9"],
                 "mac": "0a:58:0a:96:00:09", "default": True}],
        want=[("ovn-kubernetes", "eth0", "management"), ("shop/blue", "ovn-udn1", "management")],
        missing=[], ips=[]),
    # ... and without the UDN's NAD known: both keep the delegate's name.
    "ovn-k-primary-udn-nad-unknown": dict(
        status=[{"name": "ovn-kubernetes", "interface": "eth0", "ips": ["10.128.4.21"]},
                {"name": "ovn-kubernetes", "interface": "ovn-udn1", "ips": ["10.150.0.10"], "default": True}],
        want=[("ovn-kubernetes", "eth0", "management"), ("ovn-kubernetes", "ovn-udn1", "management")],
        missing=[], ips=[]),
    # KubeVirt: cluster network default:false next to a default-network override.
    "kubevirt-override": dict(
        status=[{"name": "k8s-pod-network", "interface": "eth0", "ips": ["10.42.9.3", "fd00:42::9:3"],
                 "default": False},
                {"name": "ovn-secondary-default", "interface": "custom0", "ips": ["10.99.0.4"], "default": True},
                {"name": "shop/vmnet", "interface": "podab12cd34ef5", "mac": "02:5e:00:aa:bb:01"}],
        request=[{"name": "vmnet", "namespace": NS, "interface": "podab12cd34ef5"}],
        want=[("k8s-pod-network", "eth0", "management"), ("ovn-secondary-default", "custom0", "management"),
              ("shop/vmnet", "podab12cd34ef5", "unclassified")],
        missing=[], ips=[]),
    # KubeVirt override with a Calico-style cluster entry: first, no interface, default:false.
    "kubevirt-override-no-interface": dict(
        status=[{"name": "k8s-pod-network", "ips": ["10.42.9.4"], "default": False},
                {"name": "override-net", "interface": "custom0", "ips": ["10.99.0.5"], "default": True}],
        want=[("k8s-pod-network", "", "management"), ("override-net", "custom0", "management")],
        missing=[], ips=[]),
    # Multus <= 3.5: a bare NAD name, meant in the pod's namespace.
    "multus-3.5-bare-nad-name": dict(
        status=[{"name": "cni0", "ips": ["10.88.0.4"], "default": True},
                {"name": "sig", "interface": "net1", "ips": ["172.20.0.9"], "mac": "02:aa:00:00:00:09"}],
        request="sig",
        want=[("cni0", "", "management"), ("shop/sig", "net1", "unclassified")],
        missing=[], ips=[("shop/sig", "172.20.0.9")]),
    # ... a request into another namespace, the status still bare.
    "multus-3.5-other-namespace": dict(
        status=[{"name": "storage-net", "interface": "net1", "ips": ["192.168.77.3"]}],
        request="infra/storage-net",
        want=[("infra/storage-net", "net1", "unclassified")], missing=[], ips=[("infra/storage-net", "192.168.77.3")]),
    # Multus <= 3.4: the CNI config name, mapped back through the requested NAD.
    "multus-3.4-config-name": dict(
        nads=[nad("vf-left", {"type": "sriov", "name": "fronthaul", "vlan": 310}, plane="data")],
        status=[{"name": "", "ips": ["10.96.7.1"], "default": True}, {"name": "fronthaul", "dns": {}}],
        request="vf-left", legacy=True,
        want=[("", "", "management"), ("shop/vf-left", "", "data")], missing=[], ips=[]),
    # Two requested NADs share the config name: the requested interface decides.
    "multus-3.4-shared-config-name-by-interface": dict(
        nads=[nad("vf-left", {"type": "sriov", "name": "fronthaul"}),
              nad("vf-right", {"type": "sriov", "name": "fronthaul"})],
        status=[{"name": "fronthaul", "interface": "net1"}, {"name": "fronthaul", "interface": "net2"}],
        request=[{"name": "vf-left", "interface": "net1"}, {"name": "vf-right", "interface": "net2"}],
        want=[("shop/vf-left", "net1", "unclassified"), ("shop/vf-right", "net2", "unclassified")],
        missing=[], ips=[]),
    # ... without interfaces it cannot be told: names stay bare, nothing reported missing.
    "multus-3.4-shared-config-name-ambiguous": dict(
        nads=[nad("vf-left", {"type": "sriov", "name": "fronthaul"}),
              nad("vf-right", {"type": "sriov", "name": "fronthaul"})],
        status=[{"name": "fronthaul", "dns": {}}],
        request="vf-left,vf-right",
        want=[("fronthaul", "", "unclassified")], missing=["shop/vf-right"], ips=[]),
    # ... a config name no requested NAD has: read as Multus <= 3.5's bare NAD
    # name, and the request is missing.
    "multus-3.4-config-name-unknown": dict(
        status=[{"name": "", "ips": ["10.96.7.2"], "default": True}, {"name": "midhaul", "dns": {}}],
        request="vf-up",
        want=[("", "", "management"), ("shop/midhaul", "", "unclassified")], missing=["shop/vf-up"], ips=[]),
    # A bare secondary name, nothing known: Multus <= 3.5's meaning (pod's namespace).
    "bare-secondary-no-evidence": dict(
        status=[{"name": "k8s-pod-network", "ips": ["10.42.1.1"], "default": True},
                {"name": "vmnet", "interface": "pod1f2e3d4c5b6", "mac": "02:5e:00:aa:bb:02"}],
        want=[("k8s-pod-network", "", "management"), ("shop/vmnet", "pod1f2e3d4c5b6", "unclassified")],
        missing=[], ips=[]),
    # A known NAD of that name in the pod's namespace, no request (Multus defaultNetworks).
    "bare-known-nad-no-request": dict(
        nads=[nad("mgmt-extra", {"type": "macvlan", "master": "eth3"}, plane="oam")],
        status=[{"name": "mgmt-extra", "interface": "net1", "ips": ["10.250.0.3"]}],
        want=[("shop/mgmt-extra", "net1", "oam")], missing=[], ips=[("shop/mgmt-extra", "10.250.0.3")]),
    # KubeVirt's fixtures put the NAD's namespace in a key of its own.
    "namespace-key": dict(
        status=[{"name": "vmnet", "namespace": "vms", "interface": "net1"},
                {"name": "vmnet", "namespace": "lab", "interface": "net2"}],
        want=[("vms/vmnet", "net1", "unclassified"), ("lab/vmnet", "net2", "unclassified")], missing=[], ips=[]),
    # Go's "<nil>" for a route without gateway: dropped and counted.
    "go-nil-gateway": dict(
        status=[{"name": "shop/rdma", "interface": "net1", "ips": ["10.77.0.2"], "gateway": ["<nil>"]}],
        want=[("shop/rdma", "net1", "unclassified")], missing=[], ips=[("shop/rdma", "10.77.0.2")],
        errors={"nil_gateway": 1}, gateways={"net1": ()}),
    # multi-net spec >= 1.2: the IPoIB address under infiniband-guid.
    "infiniband-guid": dict(
        status=[{"name": "shop/ib", "interface": "ib0", "ips": ["10.66.0.2"],
                 "infiniband-guid": "80:00:02:08:FE:80:00:00:00:00:00:00:0c:42:a1:03:00:5d:11:22"}],
        want=[("shop/ib", "ib0", "unclassified")], missing=[], ips=[("shop/ib", "10.66.0.2")],
        macs={"ib0": "80:00:02:08:fe:80:00:00:00:00:00:00:0c:42:a1:03:00:5d:11:22"}),
}


def scrape(case):
    store = Store("n1")
    store.replace_networks(case.get("nads", []))
    store.replace_pods([pod(case["status"], case.get("request"), case.get("legacy", False))])
    view = store.view()
    views = tuple(PodView(p, interfaces=tuple(InterfaceView(a, None) for a in p.attachments)) for p in view.pods)
    snap = Snapshot(views, view.networks, annotation_errors=view.annotation_errors)
    text = render(AttachmentsSource(Config()).collect(snap)).decode()
    return view, text


def series(text, metric):
    out = []
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels = line[len(metric) + 1:line.rindex("}")]
            out.append(dict(re.findall(r'(\w+)="([^"]*)"', labels)))
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_network_names_on_metrics(name):
    case = CASES[name]
    view, text = scrape(case)
    info = series(text, "planewatch_pod_interface_info")
    assert [(s["network"], s["interface"], s["plane"]) for s in info] == case["want"]
    missing = series(text, "planewatch_pod_network_attachment_missing")
    assert [s["network"] for s in missing] == case["missing"]
    ips = series(text, "planewatch_pod_ip_info")
    assert sorted((s["network"], s["ip"]) for s in ips) == sorted(case["ips"])
    errors = {k: v for k, v in view.annotation_errors.items() if v}
    assert errors == case.get("errors", {})
    atts = {a.interface: a for a in view.pods[0].attachments}
    for ifname, gateways in case.get("gateways", {}).items():
        assert atts[ifname].gateway == gateways
    for ifname, mac in case.get("macs", {}).items():
        assert atts[ifname].mac == mac


def test_config_name_maps_once_the_nad_arrives():
    """The store maps config names when the NAD is known, also when it comes after the pod."""
    case = CASES["multus-3.4-config-name"]
    store = Store("n1")
    store.replace_pods([pod(case["status"], case["request"], legacy=True)])
    assert store.view().pods[0].missing == ("shop/vf-left",)
    store.upsert_network(case["nads"][0])
    assert store.view().pods[0].missing == ()
    assert [a.network for a in store.view().pods[0].attachments] == ["", "shop/vf-left"]
