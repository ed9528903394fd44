"""The Kubernetes objects describing the lab: Pods with their Multus annotations
and the NetworkAttachmentDefinitions, as a pods file for `planewatch serve`."""
from __future__ import annotations

import hashlib
import ipaddress
import json
from typing import Mapping

from collector.whereabouts import GROUP, VERSION, normalize_range
from lab.topology import DEFAULT_NETWORK_NAME, NETWORKS, SRIOV_NAD, LabState, gateway, pod_uid

NODE_NAME = "lab-node"


def network_status(state: LabState, key: str, spec: dict) -> str:
    """The annotation as Multus (thick plugin, v4) writes it: indented JSON."""
    entries = []
    for ifname, netkey in spec["interfaces"]:
        net = NETWORKS[netkey]
        entry = {"name": net.nad, "interface": ifname, "ips": state.addresses[key][ifname],
                 "mac": state.macs[key][ifname]}
        if netkey == "default":
            entry.update({"default": True, "dns": {}, "gateway": [gateway(net)]})
        else:
            entry["dns"] = {}
        entries.append(entry)
    for ifname, nad, pci in spec.get("vfs") or ():
        entry = {"name": nad, "dns": {},
                 "device-info": {"type": "pci", "version": "1.1.0", "pci": {"pci-address": pci}}}
        if ifname:
            entry = {"name": nad, "interface": ifname, **{k: v for k, v in entry.items() if k != "name"}}
        entries.append(entry)
    return json.dumps(entries, indent=4)


def network_requests(spec: dict) -> str:
    names = [f"{NETWORKS[n].nad}@{i}" for i, n in spec["interfaces"] if n != "default"]
    names += [nad + (f"@{i}" if i else "") for i, nad, _ in spec.get("vfs") or ()]
    return ",".join(names + list(spec.get("requests_extra") or ()))


def pod_object(state: LabState, spec: dict) -> dict:
    key = f"{spec['namespace']}/{spec['name']}"
    annotations = {"k8s.v1.cni.cncf.io/network-status": network_status(state, key, spec)}
    requests = network_requests(spec)
    if requests:
        annotations["k8s.v1.cni.cncf.io/networks"] = requests
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": spec["name"], "namespace": spec["namespace"],
                     "uid": pod_uid(state.prefix, spec["namespace"], spec["name"]),
                     "annotations": annotations},
        "spec": {"nodeName": NODE_NAME, "containers": [{"name": "app", "image": "registry.invalid/app"}]},
        "status": {"phase": "Running"},
    }


def host_network_pod(state: LabState) -> dict:
    """Every node runs some; the collector must skip them."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "node-agent", "namespace": "kube-system",
                         "uid": pod_uid(state.prefix, "kube-system", "node-agent")},
            "spec": {"nodeName": NODE_NAME, "hostNetwork": True,
                     "containers": [{"name": "agent", "image": "registry.invalid/agent"}]},
            "status": {"phase": "Running"}}


def whereabouts_range(state: LabState) -> str:
    """The signaling network's pool: small for the demo lab, so its fill shows."""
    return "10.71.0.0/26" if len(state.specs) <= 50 else "10.71.0.0/16"


def ippool_object(state: LabState) -> dict:
    """The Whereabouts IPPool of the signaling network, as whereabouts writes it: one
    allocation per lab pod on it, plus one whose pod was deleted long ago (a leak)."""
    allocations = {}
    for spec in state.specs:
        key = f"{spec['namespace']}/{spec['name']}"
        for ifname, netkey in spec["interfaces"]:
            if netkey == "signaling":
                allocations.setdefault(state.addresses[key][ifname][0], key)
    allocations["10.71.0.60"] = f"{NETWORKS['signaling'].nad.split('/')[0]}/upf-decommissioned"
    return example_ippool(whereabouts_range(state), allocations)


def nad_objects(state: LabState) -> list[dict]:
    out = []
    for net in NETWORKS.values():
        if net.nad == DEFAULT_NETWORK_NAME:
            continue
        ns, name = net.nad.split("/")
        if net.kind == "macvlan":
            config = {"cniVersion": "0.3.1", "type": "macvlan", "master": net.host_dev, "mode": "bridge",
                      "ipam": {"type": "whereabouts", "range": whereabouts_range(state)}}
        else:
            config = {"cniVersion": "0.3.1", "type": "bridge", "bridge": net.host_dev,
                      "ipam": {"type": "host-local", "subnet": f"10.{net.octet}.0.0/16"}}
        out.append({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                    "metadata": {"name": name, "namespace": ns,
                                 "annotations": {"planewatch.io/plane": net.plane}},
                    "spec": {"config": json.dumps(config)}})
    return out


def sriov_nad() -> dict:
    ns, name = SRIOV_NAD.split("/")
    return {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": ns,
                         "annotations": {"k8s.v1.cni.cncf.io/resourceName": "intel.com/sriov_n3",
                                         "planewatch.io/plane": "data"}},
            "spec": {"config": json.dumps({"cniVersion": "0.3.1", "type": "sriov", "vlan": 300,
                                           "ipam": {"type": "static"}})}}


def lab_objects(state: LabState) -> list[dict]:
    nads = nad_objects(state) + [ippool_object(state)]
    if any(s.get("vfs") for s in state.specs):
        nads.append(sriov_nad())
    return nads + [pod_object(state, s) for s in state.specs] + [host_network_pod(state)]


def write_pods_file(state: LabState, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": lab_objects(state)}, f, indent=1)
    state.pods_file = path
    state.save()


def example_ippool(range_cidr: str, allocations: Mapping[str, str], namespace: str = "kube-system",
                   network_name: str = "") -> dict:
    """An IPPool as whereabouts would write it: `allocations` maps an IP of the range to
    the podref ("ns/name") holding it. Container IDs are made up (stable per IP+pod)."""
    net = ipaddress.ip_network(range_cidr, strict=False)
    spec_allocations = {}
    for ip, podref in allocations.items():
        address = ipaddress.ip_address(ip)
        if address not in net:
            raise ValueError(f"{ip} is not in {net}")
        container_id = hashlib.sha256(f"{podref}@{address}".encode()).hexdigest()
        spec_allocations[str(int(address) - int(net.network_address))] = {
            "id": container_id, "podref": podref, "ifname": "net1"}
    name = normalize_range(str(net))
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "IPPool",
            "metadata": {"name": f"{network_name}-{name}" if network_name else name, "namespace": namespace},
            "spec": {"range": str(net), "allocations": spec_allocations}}
