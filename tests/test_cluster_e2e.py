"""`planewatch cluster` against a real kube-apiserver: Whereabouts IPPools, NADs
(with exclusions, a named network, a host-local one ignored), live and missing pods,
OverlappingRangeIPReservations; exact size/allocated/free/leaked, then changes through
the watches. The collector runs as deploy/cluster's ServiceAccount, with a real token."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from collector.whereabouts import GROUP, IPPOOL_PLURAL, RESERVATION_PLURAL, VERSION
from tests import kubeapi
from tests.conftest import CLUSTER, REPO, Collector, parse_metrics, series, wait_for

pytestmark = pytest.mark.kube

TAG = f"wb{os.getpid() % 10000:04d}"
NS = f"{TAG}-telco"                 # pods and NADs
IPAM_NS = f"{TAG}-ipam"             # where whereabouts keeps its pools (kube-system in real life)
NODE = f"{TAG}-node"
ORIP_CRD = Path(REPO) / "tests" / "fixtures" / "crds" / "whereabouts-overlappingrangeipreservation.yaml"

SIGNALING = {"pool": f"{IPAM_NS}/10.201.0.0-24", "range": "10.201.0.0/24", "network": f"{NS}/signaling"}
STORAGE = {"pool": f"{IPAM_NS}/stor-fd00-201---120", "range": "fd00:201::/120", "network": f"{NS}/storage"}
ORPHAN = {"pool": f"{IPAM_NS}/10.203.0.0-24", "range": "10.203.0.0/24", "network": ""}


def nad(name: str, config: dict) -> dict:
    return {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": NS}, "spec": {"config": json.dumps(config)}}


NADS = [
    # 254 usable - .0/28 (15 usable) - .254 = 238
    nad("signaling", {"cniVersion": "0.3.1", "type": "macvlan", "master": "eth1", "mode": "bridge",
                      "ipam": {"type": "whereabouts", "range": "10.201.0.0/24",
                               "exclude": ["10.201.0.0/28", "10.201.0.254/32"]}}),
    # a named network, ipRanges, start/end: fd00:201::10 .. ::1f = 16
    nad("storage", {"cniVersion": "0.3.1", "type": "ipvlan", "master": "eth2",
                    "ipam": {"type": "whereabouts", "network_name": "stor",
                             "ipRanges": [{"range": "fd00:201::/120", "range_start": "fd00:201::10",
                                           "range_end": "fd00:201::1f"}]}}),
    # not whereabouts: no pool, no effect
    nad("data", {"cniVersion": "0.3.1", "type": "bridge", "bridge": "br-data",
                 "ipam": {"type": "host-local", "subnet": "10.201.0.0/24"}}),
]


def alloc(podref: str, n: int) -> dict:
    return {"id": f"{n:064x}", "podref": podref, "ifname": "net1"}


def pool(name: str, rng: str, allocations: dict) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "IPPool",
            "metadata": {"name": name, "namespace": IPAM_NS},
            "spec": {"range": rng, "allocations": allocations}}


POOLS = [
    pool("10.201.0.0-24", "10.201.0.0/24", {
        "16": alloc(f"{NS}/pod-a", 1), "17": alloc(f"{NS}/pod-b", 2),
        "18": alloc(f"{NS}/ghost", 3), "19": alloc("elsewhere/ghost", 4),
        "5": alloc(f"{NS}/pod-a", 5)}),         # inside the excluded /28: allocated, not free
    pool("stor-fd00-201---120", "fd00:201::/120", {
        "16": alloc(f"{NS}/pod-b", 6), "17": alloc(f"{NS}/ghost", 7)}),
    pool("10.203.0.0-24", "10.203.0.0/24", {    # no NAD; two unusable keys
        "1": alloc(f"{NS}/pod-a", 8), "abc": alloc(f"{NS}/pod-a", 9), "300": alloc(f"{NS}/pod-a", 10)}),
]

RESERVATIONS = [
    {"apiVersion": f"{GROUP}/{VERSION}", "kind": "OverlappingRangeIPReservation",
     "metadata": {"name": name, "namespace": IPAM_NS}, "spec": {"containerid": "c", "podref": ref}}
    for name, ref in (("10.201.0.16", f"{NS}/pod-a"), ("10.201.0.18", f"{NS}/ghost"))]


def pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "pause"}]}}


def kubectl(kube, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([kubeapi.require_kubectl(), "--kubeconfig", kube.kubeconfig(), *args],
                          capture_output=True, text=True, timeout=120)


def ensure_namespace(core: client.CoreV1Api, name: str) -> None:
    try:
        core.create_namespace({"metadata": {"name": name}})
    except client.ApiException as err:
        if err.status != 409:
            raise


@pytest.fixture(scope="module")
def whereabouts_world(kube):
    kubeapi.require_kubectl()
    api = kube.api_client()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    kube.create_ippool_crd()
    kube.create_crd(ORIP_CRD)
    for ns in (NS, IPAM_NS, "planewatch"):
        ensure_namespace(core, ns)
    applied = kubectl(kube, "apply", "-k", str(Path(REPO) / "deploy" / "cluster"))
    assert applied.returncode == 0, applied.stderr
    try:
        for obj in NADS:
            custom.create_namespaced_custom_object("k8s.cni.cncf.io", "v1", NS,
                                                   "network-attachment-definitions", obj)
        for obj in POOLS:
            custom.create_namespaced_custom_object(GROUP, VERSION, IPAM_NS, IPPOOL_PLURAL, obj)
        for obj in RESERVATIONS:
            custom.create_namespaced_custom_object(GROUP, VERSION, IPAM_NS, RESERVATION_PLURAL, obj)
        for name in ("pod-a", "pod-b"):
            core.create_namespaced_pod(NS, pod(name))
        yield kube, core, custom
    finally:
        for name in ("pod-a", "pod-b"):
            _quietly(core.delete_namespaced_pod, name, NS, grace_period_seconds=0)
        for obj in NADS:
            _quietly(custom.delete_namespaced_custom_object, "k8s.cni.cncf.io", "v1", NS,
                     "network-attachment-definitions", obj["metadata"]["name"])
        for plural, objs in ((IPPOOL_PLURAL, POOLS), (RESERVATION_PLURAL, RESERVATIONS)):
            for obj in objs:
                _quietly(custom.delete_namespaced_custom_object, GROUP, VERSION, IPAM_NS, plural,
                         obj["metadata"]["name"])
        kubectl(kube, "delete", "--ignore-not-found", "-k", str(Path(REPO) / "deploy" / "cluster"))


def _quietly(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except client.ApiException as err:
        if err.status != 404:
            raise


def service_account_kubeconfig(kube, tmp_path: Path) -> str:
    """A real token of deploy/cluster's ServiceAccount (TokenRequest API)."""
    from tests.kubeapi import kubeconfig_doc
    status, body = kube.request(
        "POST", "/api/v1/namespaces/planewatch/serviceaccounts/planewatch-cluster/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
         "spec": {"expirationSeconds": 3600}})
    assert status == 201, body
    path = tmp_path / "kubeconfig-cluster-sa"
    path.write_text(yaml.safe_dump(kubeconfig_doc(kube.url, kube.ca_path, "planewatch-cluster",
                                                  body["status"]["token"])))
    return str(path)


@pytest.fixture
def start_collector(tmp_path):
    started: list[Collector] = []

    def start(kubeconfig: str) -> Collector:
        c = Collector("--kubeconfig", kubeconfig, command=CLUSTER)
        started.append(c)
        wait_for(c.answering, timeout=30, what="the cluster collector to answer")
        return c
    yield start
    for c in started:
        c.stop()


def pool_numbers(parsed: dict, labels: dict) -> dict[str, float]:
    out = {}
    for what in ("size", "allocated", "free", "leaked"):
        found = series(parsed, f"planewatch_ippool_{what}", **labels)
        assert len(found) <= 1, found
        out[what] = next(iter(found.values()), None)
    return out


def wait_numbers(collector: Collector, labels: dict, want: dict, timeout: float = 20.0) -> dict:
    seen = {}

    def matches() -> bool:
        seen.update(pool_numbers(parse_metrics(collector.metrics()), labels))
        return all(seen.get(k) == v for k, v in want.items())
    try:
        wait_for(matches, timeout=timeout, what=f"{labels['pool']} = {want}")
    except AssertionError:
        raise AssertionError(f"{labels['pool']}: want {want}, last seen {seen}") from None
    return seen


def test_pools_sizes_allocations_and_leaks_follow_the_api(whereabouts_world, start_collector, tmp_path):
    kube, core, custom = whereabouts_world
    collector = start_collector(service_account_kubeconfig(kube, tmp_path))
    wait_for(lambda: collector.get("/readyz")[0] == 200, timeout=30, what="/readyz")

    # Exact numbers as created (the other tests' pools may be there too: filter by label).
    assert wait_numbers(collector, SIGNALING, {"size": 238, "allocated": 5, "free": 234, "leaked": 2}) \
        == {"size": 238, "allocated": 5, "free": 234, "leaked": 2}
    assert wait_numbers(collector, STORAGE, {"size": 16, "allocated": 2, "free": 14, "leaked": 1}) \
        == {"size": 16, "allocated": 2, "free": 14, "leaked": 1}
    assert wait_numbers(collector, ORPHAN, {"size": 254, "allocated": 1, "free": 253, "leaked": 0}) \
        == {"size": 254, "allocated": 1, "free": 253, "leaked": 0}
    parsed = parse_metrics(collector.metrics())
    invalid = {dict(l)["reason"]: v for l, v in
               series(parsed, "planewatch_ippool_invalid_entries", pool=ORPHAN["pool"]).items()}
    assert invalid == {"invalid_offset": 1, "offset_out_of_range": 1}
    assert series(parsed, "planewatch_ippool_size", range="10.201.0.0/24", network=f"{NS}/data") == {}
    assert list(series(parsed, "planewatch_ippool_overlapping_reservations").values()) == [2]
    assert list(series(parsed, "planewatch_ippool_overlapping_reservations_leaked").values()) == [1]
    assert list(series(parsed, "planewatch_scrape_collector_success", collector="whereabouts").values()) == [1]

    # A pod goes away: its allocations leak (pod-b holds one in each pool).
    core.delete_namespaced_pod("pod-b", NS, grace_period_seconds=0)
    t0 = time.monotonic()
    wait_numbers(collector, SIGNALING, {"leaked": 3, "allocated": 5, "free": 234})
    wait_numbers(collector, STORAGE, {"leaked": 2})
    print(f"leak seen {(time.monotonic() - t0) * 1000:.0f} ms after the pod was deleted")

    # The pod comes back (same name): no longer leaked.
    core.create_namespaced_pod(NS, pod("pod-b"))
    wait_numbers(collector, SIGNALING, {"leaked": 2})

    # A new allocation for a missing pod, written the way whereabouts patches pools.
    custom.patch_namespaced_custom_object(GROUP, VERSION, IPAM_NS, IPPOOL_PLURAL, "10.201.0.0-24",
                                          {"spec": {"allocations": {"40": alloc(f"{NS}/ghost2", 11)}}})
    wait_numbers(collector, SIGNALING, {"allocated": 6, "free": 233, "leaked": 3})

    # The NAD excludes one more /28 (.32-.47, which holds .40): size drops by 16, free by 15.
    signaling = json.loads(NADS[0]["spec"]["config"])
    signaling["ipam"]["exclude"].append("10.201.0.32/28")
    custom.patch_namespaced_custom_object("k8s.cni.cncf.io", "v1", NS, "network-attachment-definitions",
                                          "signaling", {"spec": {"config": json.dumps(signaling)}})
    wait_numbers(collector, SIGNALING, {"size": 222, "allocated": 6, "free": 218})

    # The NAD disappears: the pool is sized by its range alone and loses its network.
    custom.delete_namespaced_custom_object("k8s.cni.cncf.io", "v1", NS, "network-attachment-definitions",
                                           "signaling")
    wait_numbers(collector, {**SIGNALING, "network": ""}, {"size": 254, "allocated": 6, "free": 248})


def test_without_rights_it_stays_unready_but_alive(whereabouts_world, start_collector):
    kube, _, _ = whereabouts_world
    collector = start_collector(kube.kubeconfig("nobody"))
    time.sleep(2)                       # several refused lists
    assert collector.get("/healthz")[0] == 200
    status, body = collector.get("/readyz")
    assert status == 503, body
    parsed = parse_metrics(collector.metrics())
    assert list(series(parsed, "planewatch_scrape_collector_success", collector="whereabouts").values()) == [0]
    assert series(parsed, "planewatch_ippool_size") == {}
    assert "403" in collector.logs()
