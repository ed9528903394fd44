"""Plane mapping, the pods file reader and the store that both feeds fill."""
from __future__ import annotations

import json
import os

import pytest

from collector.discovery import Store
from collector.planes import PlaneMap, PlaneMapError
from collector.podsfile import PodsFile, parse_objects

PLANE_MAP = {"default": "oam", "networks": {"telco/sig-exact": "signaling", "*/n3-*": "data",
                                            "storage/*": "storage", "telco/sig-*": "control"}}


@pytest.mark.parametrize("network,default,nad_plane,want", [
    ("telco/sig-exact", False, "", "signaling"),       # exact beats the glob listed after it
    ("telco/sig-other", False, "", "control"),
    ("upf/n3-user", False, "", "data"),
    ("storage/ceph", False, "", "storage"),
    ("telco/sig-exact", False, "media", "media"),      # the NAD annotation wins over the map
    ("k8s-pod-network", True, "", "oam"),              # default network: the map's `default:`
    ("other/net", False, "", "unclassified"),
])
def test_plane_for(network, default, nad_plane, want):
    assert PlaneMap.from_dict(PLANE_MAP).plane_for(network, default=default, nad_plane=nad_plane) == want


def test_plane_map_defaults_and_errors(tmp_path):
    assert PlaneMap().plane_for("cbr0", default=True) == "management"
    for bad in ([], {"networks": []}, {"planes": {}}, {"networks": {"a/b": "bad plane!"}}):
        with pytest.raises(PlaneMapError):
            PlaneMap.from_dict(bad)
    path = tmp_path / "planes.yaml"
    path.write_text("networks:\n  'telco/*': signaling\n")
    assert PlaneMap.load(str(path)).plane_for("telco/x", default=False) == "signaling"
    with pytest.raises(PlaneMapError):
        PlaneMap.load(str(tmp_path / "nope.yaml"))


def pod_obj(name, uid, node="n1", status=None, host_network=False, phase="Running"):
    ann = {}
    if status is not None:
        ann["k8s.v1.cni.cncf.io/network-status"] = json.dumps(status)
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "telco", "uid": uid, "annotations": ann},
            "spec": {"nodeName": node, "hostNetwork": host_network}, "status": {"phase": phase}}


NAD = {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
       "metadata": {"name": "sig", "namespace": "telco", "annotations": {"planewatch.io/plane": "signaling"}},
       "spec": {"config": json.dumps({"type": "macvlan", "master": "eth1", "ipam": {"type": "whereabouts"}})}}
STATUS = [{"name": "cbr0", "interface": "eth0", "ips": ["10.0.0.5"], "default": True},
          {"name": "telco/sig", "interface": "net1", "ips": ["10.1.0.5"]}]


def test_store_filters_node_host_network_and_finished_and_assigns_planes():
    store = Store("n1")
    store.replace_networks([NAD])
    store.replace_pods([pod_obj("a", "u1", status=STATUS), pod_obj("elsewhere", "u2", node="n2", status=STATUS),
                        pod_obj("host", "u3", host_network=True), pod_obj("done", "u4", status=STATUS,
                                                                            phase="Succeeded")])
    view = store.view()
    assert [p.name for p in view.pods] == ["a"]
    assert [(a.network, a.plane) for a in view.pods[0].attachments] == [
        ("cbr0", "management"), ("telco/sig", "signaling")]
    v1 = view.version
    store.delete_network(NAD)
    assert store.view().version > v1
    assert store.view().pods[0].attachments[1].plane == "unclassified"


def test_store_counts_each_malformed_annotation_once():
    store = Store("n1")
    bad = pod_obj("a", "u1")
    bad["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"] = "[{not json"
    store.upsert_pod(bad)
    store.upsert_pod(bad)                                  # a status update, same annotation
    assert store.view().annotation_errors.get("invalid_json") == 1
    bad["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"] = "{also not json"
    store.upsert_pod(bad)
    assert store.view().annotation_errors.get("invalid_json") == 2
    store.delete_pod(bad)
    assert store.view().pods == ()


def test_replace_pods_drops_absent_ones():
    store = Store("n1")
    store.replace_pods([pod_obj("a", "u1", status=STATUS), pod_obj("b", "u2", status=STATUS)])
    store.replace_pods([pod_obj("b", "u2", status=STATUS)])
    assert [p.name for p in store.view().pods] == ["b"]


@pytest.mark.parametrize("text,count", [
    ("", 0),
    (json.dumps([pod_obj("a", "1"), NAD]), 2),
    (json.dumps({"apiVersion": "v1", "kind": "List", "items": [pod_obj("a", "1")]}), 1),
    (json.dumps({"kind": "PodList", "metadata": {"resourceVersion": "5"}, "items": [pod_obj("a", "1")]}), 1),
    ("---\nkind: Pod\nmetadata: {name: a, uid: '1'}\n---\nkind: Pod\nmetadata: {name: b, uid: '2'}\n", 2),
])
def test_parse_objects_forms(text, count):
    assert len(parse_objects(text)) == count


def test_pods_file_reload_and_broken_file_keeps_previous(tmp_path):
    path = tmp_path / "pods.json"
    path.write_text(json.dumps([pod_obj("a", "u1", status=STATUS), NAD]))
    store = Store("n1")
    feed = PodsFile(str(path), store)
    assert not store.ready
    assert feed.load_once() and store.ready
    assert [p.name for p in store.view().pods] == ["a"] and "telco/sig" in store.view().networks
    assert not feed.load_once()                       # unchanged: not re-read
    path.write_text("[{broken")
    os.utime(path, ns=(1, 1))
    assert not feed.load_once()
    assert [p.name for p in store.view().pods] == ["a"]
    path.write_text(json.dumps([pod_obj("b", "u2", status=STATUS)]))
    assert feed.load_once()
    assert [p.name for p in store.view().pods] == ["b"] and store.view().networks == {}
