"""End to end against a real kube-apiserver + etcd: pods on this node and NADs
come from a watch; pods added, changed and deleted show up in and leave /metrics;
the collector rides out the API server going away and coming back."""
from __future__ import annotations

import copy
import json
import time

import pytest
from kubernetes import client

from lab.objects import NODE_NAME, lab_objects
from tests.conftest import Collector, parse_metrics, series, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.lab]


def pods_of(collector: Collector) -> set[str]:
    parsed = parse_metrics(collector.metrics())
    return {dict(l)["pod"] for l in series(parsed, "planewatch_interface_up")}


def create(api: client.ApiClient, obj: dict) -> None:
    obj = copy.deepcopy(obj)
    obj["metadata"].pop("uid", None)
    ns = obj["metadata"]["namespace"]
    core = client.CoreV1Api(api)
    try:
        core.create_namespace({"metadata": {"name": ns}})
    except client.ApiException as err:
        if err.status != 409:
            raise
    if obj["kind"] == "Pod":
        obj.pop("status", None)
        core.create_namespaced_pod(ns, obj)
    else:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "k8s.cni.cncf.io", "v1", ns, "network-attachment-definitions", obj)


def delete_pod(api, ns, name):
    client.CoreV1Api(api).delete_namespaced_pod(name, ns, grace_period_seconds=0)


@pytest.fixture(scope="module")
def cluster(kube, lab):
    """The lab's NADs and pods created in the API server (except smf-d, added by a test)."""
    api = kube.api_client()
    objs = [o for o in lab_objects(lab) if o["kind"] in ("Pod", "NetworkAttachmentDefinition")]
    held_back = [o for o in objs if o["metadata"]["name"] == "smf-d"]
    for obj in objs:
        if obj not in held_back:
            create(api, obj)
    yield kube, api, lab, held_back[0]
    for obj in objs:
        if obj["kind"] == "Pod":
            try:
                delete_pod(api, obj["metadata"]["namespace"], obj["metadata"]["name"])
            except client.ApiException:
                pass


@pytest.fixture(scope="module")
def watching(cluster):
    kube, api, lab, held_back = cluster
    c = Collector("--kubeconfig", kube.kubeconfig(), "--node-name", NODE_NAME, "--no-collector.ebpf")
    try:
        c.wait_ready()
        yield kube, api, lab, held_back, c
    finally:
        c.stop()


def test_pods_listed_with_planes_from_nads(watching):
    _, _, _, _, c = watching
    assert wait_for(lambda: pods_of(c) == {"upf-a", "upf-b", "plain-c"}, what="lab pods in /metrics")
    parsed = parse_metrics(c.metrics())
    planes = {(dict(l)["pod"], dict(l)["interface"]): dict(l)["plane"]
              for l in series(parsed, "planewatch_interface_up")}
    assert planes[("upf-a", "net1")] == "signaling" and planes[("upf-a", "eth0")] == "management"
    assert planes[("upf-b", "net2")] == "data"
    nets = series(parsed, "planewatch_network_info")
    assert {dict(l)["network"] for l in nets} == {"telco/signaling", "telco/data", "telco/storage"}


def test_pod_added_changed_deleted(watching):
    kube, api, lab, smf_d, c = watching
    wait_for(lambda: "upf-a" in pods_of(c), what="initial pods")
    create(api, smf_d)
    t0 = time.monotonic()
    wait_for(lambda: "smf-d" in pods_of(c), what="added pod in /metrics")
    # how fast: bench/discovery_latency.py; here only that it came
    print(f"\npod in /metrics {time.monotonic() - t0:.2f} s after its creation")

    # changed: the NAD's plane annotation moves every pod's net1 to another plane
    custom = client.CustomObjectsApi(api)
    custom.patch_namespaced_custom_object("k8s.cni.cncf.io", "v1", "telco", "network-attachment-definitions",
                                          "signaling", {"metadata": {"annotations": {"planewatch.io/plane": "control"}}})

    def net1_planes():
        parsed = parse_metrics(c.metrics())
        return {dict(l)["plane"] for l in series(parsed, "planewatch_interface_up", interface="net1")}
    wait_for(lambda: net1_planes() == {"control"}, what="plane change to show")

    # changed: the pod's network-status loses net1 → its series go
    core = client.CoreV1Api(api)
    pod = core.read_namespaced_pod("smf-d", "telco")
    status = json.loads(pod.metadata.annotations["k8s.v1.cni.cncf.io/network-status"])
    status = [e for e in status if e.get("interface") != "net1"]
    core.patch_namespaced_pod("smf-d", "telco", {"metadata": {"annotations": {
        "k8s.v1.cni.cncf.io/network-status": json.dumps(status)}}})

    def smf_interfaces():
        parsed = parse_metrics(c.metrics())
        return {dict(l)["interface"] for l in series(parsed, "planewatch_interface_up", pod="smf-d")}
    wait_for(lambda: smf_interfaces() == {"eth0"}, what="net1 of smf-d to leave")

    delete_pod(api, "telco", "smf-d")
    wait_for(lambda: "smf-d" not in pods_of(c), what="deleted pod to leave /metrics")
    parsed = parse_metrics(c.metrics())
    assert not [k for k in parsed if ("pod", "smf-d") in k[1]], "no series of a deleted pod may remain"
    custom.patch_namespaced_custom_object("k8s.cni.cncf.io", "v1", "telco", "network-attachment-definitions",
                                          "signaling", {"metadata": {"annotations": {"planewatch.io/plane": "signaling"}}})


def test_survives_api_server_restart(watching):
    kube, api, lab, smf_d, c = watching
    wait_for(lambda: {"upf-a", "upf-b", "plain-c"} <= pods_of(c), what="pods before the outage")
    kube.stop_apiserver()
    try:
        time.sleep(3)
        # the API is gone: /metrics still answers with what the node knows
        assert {"upf-a", "upf-b", "plain-c"} <= pods_of(c)
        assert c.get("/healthz")[0] == 200
    finally:
        kube.start_apiserver()
    api = kube.api_client()
    delete_pod(api, "default", "plain-c")
    t0 = time.monotonic()
    wait_for(lambda: "plain-c" not in pods_of(c), timeout=40, what="a deletion made after the restart")
    print(f"\ndeletion after the restart seen in {time.monotonic() - t0:.1f} s")
    plain_c = next(o for o in lab_objects(lab) if o["metadata"]["name"] == "plain-c")
    create(api, plain_c)
    wait_for(lambda: "plain-c" in pods_of(c), what="pod re-created after the restart")
