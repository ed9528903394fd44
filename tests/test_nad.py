"""NetworkAttachmentDefinitions → NetworkDefinition: a table of NADs as users write them."""
from __future__ import annotations

import json

import pytest
import yaml

from collector.model import NetworkDefinition
from collector.nad import CONFIG_ERRORS, network_from_object

# Each NAD as `kubectl get net-attach-def -o yaml` would show it; expected fields after it.
CASES = {
    # Module "Multus CNI" (macvlan + whereabouts, exclusions, gateway).
    "macvlan_whereabouts": ("""
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: macvlan-whereabouts
  namespace: default
  annotations:
    planewatch.io/plane: signaling
spec:
  config: '{
    "cniVersion": "0.3.1",
    "type": "macvlan",
    "master": "eth0",
    "mode": "bridge",
    "ipam": {
      "type": "whereabouts",
      "range": "172.16.1.0/24",
      "range_start": "172.16.1.100",
      "range_end": "172.16.1.200",
      "gateway": "172.16.1.1",
      "exclude": ["172.16.1.150/32", "172.16.1.160/32"]
    }
  }'
""", dict(namespace="default", name="macvlan-whereabouts", plane="signaling", cni_type="macvlan",
          master="eth0", ipam="whereabouts")),
    # Same module: bridge with host-local, no master of its own.
    "bridge_host_local": ("""
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: bridge-conf, namespace: lab}
spec:
  config: |
    {"cniVersion": "0.3.1", "type": "bridge", "bridge": "mybridge0", "isGateway": true,
     "ipMasq": true, "ipam": {"type": "host-local", "subnet": "10.20.0.0/24"}}
""", dict(namespace="lab", name="bridge-conf", cni_type="bridge", master="mybridge0", ipam="host-local")),
    # SR-IOV: the VF comes from the device plugin resource, not from the config.
    "sriov_resource": ("""
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: sriov-net
  namespace: default
  annotations:
    k8s.v1.cni.cncf.io/resourceName: intel.com/sriov_netdevice
spec:
  config: '{"cniVersion": "0.3.1", "type": "sriov", "vlan": 1000,
            "ipam": {"type": "whereabouts", "range": "192.168.100.0/24"}}'
""", dict(namespace="default", name="sriov-net", cni_type="sriov", ipam="whereabouts",
          resource_name="intel.com/sriov_netdevice")),
    # host-device names its device with `device`; `ipam: {}` is no IPAM.
    "host_device_empty_ipam": ("""
metadata:
  name: net-a
  namespace: sriramy
  annotations: {k8s.v1.cni.cncf.io/resourceName: openshift.io/pci_sriov_vf}
spec:
  config: |-
    {
        "cniVersion": "1.0.0",
        "name": "net-a",
        "type": "host-device",
        "device": "ens2f0v3",
        "ipam": {}
    }
""", dict(namespace="sriramy", name="net-a", config_name="net-a", cni_type="host-device", master="ens2f0v3",
          resource_name="openshift.io/pci_sriov_vf")),
    # A conflist (janeczku's multicast macvlan gist): first plugin's type, master and ipam
    # from the plugins that have them; tuning after it is chained.
    "plugin_list": ("""
apiVersion: "k8s.cni.cncf.io/v1"
kind: NetworkAttachmentDefinition
metadata: {name: macvlan-test, namespace: default}
spec:
  config: '{
    "cniVersion": "0.3.1",
    "plugins": [
      {"type": "macvlan", "capabilities": {"ips": true}, "master": "eth1", "mode": "bridge",
       "ipam": {"type": "static"}},
      {"type": "tuning", "capabilities": {"mac": true}, "sysctl": {"net.ipv4.conf.all.rp_filter": "0"}}
    ]
  }'
""", dict(namespace="default", name="macvlan-test", cni_type="macvlan", master="eth1", ipam="static")),
    "plugin_list_ipam_in_second": ("""
metadata: {name: ipvlan-net, namespace: default}
spec:
  config: '{"cniVersion": "0.4.0", "name": "ipvlan-net", "plugins": [
             {"type": "ipvlan", "master": "bond0.200", "mode": "l2"},
             {"type": "sbr", "ipam": {"type": "whereabouts", "range": "11.11.11.0/24"}}]}'
""", dict(namespace="default", name="ipvlan-net", cni_type="ipvlan", master="bond0.200", ipam="whereabouts",
         config_name="ipvlan-net")),
    # Configuration from a file on the node (/etc/cni/multus/net.d/<name>.conf): valid.
    "empty_config": ("""
metadata: {name: from-file, namespace: default}
spec: {config: ""}
""", dict(namespace="default", name="from-file")),
    "no_spec": ("""
metadata: {name: from-file, namespace: default}
""", dict(namespace="default", name="from-file")),
    "blank_config": ("""
metadata: {name: from-file, namespace: default}
spec: {config: "  \\n "}
""", dict(namespace="default", name="from-file")),
    # Broken configurations: the facts that can still be read are kept.
    "broken_json": ("""
metadata:
  name: broken
  namespace: default
  annotations: {planewatch.io/plane: data}
spec:
  config: '{"cniVersion": "0.3.1", "type": "macvlan", "master": "eth0",}'
""", dict(namespace="default", name="broken", plane="data", config_error="invalid_json")),
    "curly_quotes": ("""
metadata: {name: pasted, namespace: default}
spec:
  config: '{“type”: “macvlan”}'
""", dict(namespace="default", name="pasted", config_error="invalid_json")),
    "not_an_object": ("""
metadata: {name: listy, namespace: default}
spec: {config: '[{"type": "macvlan"}]'}
""", dict(namespace="default", name="listy", config_error="not_an_object")),
    "no_type": ("""
metadata: {name: typeless, namespace: default}
spec: {config: '{"cniVersion": "0.3.1", "master": "eth0", "ipam": {"type": "dhcp"}}'}
""", dict(namespace="default", name="typeless", master="eth0", ipam="dhcp", config_error="no_type")),
    "plugins_empty": ("""
metadata: {name: empty-list, namespace: default}
spec: {config: '{"cniVersion": "0.3.1", "plugins": []}'}
""", dict(namespace="default", name="empty-list", config_error="invalid_plugins")),
    "plugins_not_objects": ("""
metadata: {name: odd-list, namespace: default}
spec: {config: '{"plugins": ["macvlan"]}'}
""", dict(namespace="default", name="odd-list", config_error="invalid_plugins")),
    "first_plugin_untyped": ("""
metadata: {name: untyped-first, namespace: default}
spec: {config: '{"plugins": [{"master": "eth0"}, {"type": "tuning"}]}'}
""", dict(namespace="default", name="untyped-first", master="eth0", config_error="no_type")),
    # A YAML object instead of a JSON string (hand-written pods/NAD files): read as is.
    "config_as_yaml_object": ("""
metadata: {name: yaml-obj, namespace: default}
spec:
  config: {type: ipvlan, master: eth2, ipam: {type: host-local}}
""", dict(namespace="default", name="yaml-obj", cni_type="ipvlan", master="eth2", ipam="host-local")),
    # host-device selecting its device by PCI address (no `device`): that is its master.
    "host_device_by_pci_bus_id": ("""
metadata: {name: fpga-port, namespace: accel}
spec:
  config: '{"cniVersion": "1.0.0", "name": "fpga-port", "type": "host-device", "pciBusID": "0000:5e:00.1", "ipam": {}}'
""", dict(namespace="accel", name="fpga-port", config_name="fpga-port", cni_type="host-device",
         master="0000:5e:00.1")),
    "host_device_by_kernel_path": ("""
metadata: {name: hd-path, namespace: accel}
spec:
  config: '{"type": "host-device", "kernelpath": "/sys/devices/pci0000:00/0000:00:1f.6/net/eno3"}'
""", dict(namespace="accel", name="hd-path", cni_type="host-device",
         master="/sys/devices/pci0000:00/0000:00:1f.6/net/eno3")),
    # OVN-Kubernetes primary user-defined network: no master, `role: primary`.
    "ovn_k_primary_udn": ("""
metadata: {name: blue-net, namespace: tenant-blue}
spec:
  config: '{"cniVersion": "1.0.0", "name": "cluster_udn_blue", "type": "ovn-k8s-cni-overlay",
            "topology": "layer3", "subnets": "10.200.0.0/16/24", "netAttachDefName": "tenant-blue/blue-net",
            "role": "primary"}'
""", dict(namespace="tenant-blue", name="blue-net", config_name="cluster_udn_blue",
         cni_type="ovn-k8s-cni-overlay", role="primary")),
    # Two NADs sharing one config name (what Multus <= 3.4 wrote in network-status).
    "shared_config_name": ("""
metadata: {name: vf-left, namespace: ran, annotations: {k8s.v1.cni.cncf.io/resourceName: example.com/vf_left}}
spec:
  config: '{"type": "sriov", "name": "fronthaul", "vlan": 310}'
""", dict(namespace="ran", name="vf-left", config_name="fronthaul", cni_type="sriov",
         resource_name="example.com/vf_left")),
    "config_not_a_string": ("""
metadata: {name: numeric, namespace: default}
spec: {config: 42}
""", dict(namespace="default", name="numeric", config_error="not_a_string")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_nad(name):
    text, expected = CASES[name]
    assert network_from_object(yaml.safe_load(text)) == NetworkDefinition(**expected)


def test_config_errors_are_from_the_fixed_set():
    for text, _expected in CASES.values():
        assert network_from_object(yaml.safe_load(text)).config_error in CONFIG_ERRORS + ("",)


def test_deeply_nested_config_is_invalid_json():
    nad = {"metadata": {"name": "deep", "namespace": "x"},
           "spec": {"config": '{"type": "macvlan", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"}}
    assert network_from_object(nad).config_error == "invalid_json"


def test_huge_config_is_not_decoded():
    nad = {"metadata": {"name": "huge", "namespace": "x"},
           "spec": {"config": json.dumps({"type": "macvlan", "pad": "x" * (2 << 20)})}}
    assert network_from_object(nad).config_error == "too_large"


def test_wrong_typed_fields_are_left_empty():
    nad = {"metadata": {"name": "odd", "namespace": "x", "annotations": {"planewatch.io/plane": 3}},
           "spec": {"config": json.dumps({"type": "macvlan", "master": ["eth0"], "ipam": "whereabouts"})}}
    assert network_from_object(nad) == NetworkDefinition("x", "odd", cni_type="macvlan")


@pytest.mark.parametrize("obj", [None, {}, [], "nad", {"metadata": []}, {"spec": "x"},
                                 {"metadata": {"name": 1, "annotations": "a"}, "spec": {"config": None}}])
def test_malformed_objects_do_not_crash(obj):
    net = network_from_object(obj)
    assert isinstance(net.name, str) and isinstance(net.namespace, str)
    assert net.config_error in CONFIG_ERRORS + ("",)
