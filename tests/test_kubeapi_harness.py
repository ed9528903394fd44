"""The kube-apiserver + etcd harness does what the collector's tests rely on."""
from __future__ import annotations

import json
import socket
import stat
import time
from pathlib import Path

import pytest
import yaml

from tests import kubeapi
from tests.kubeapi import KubeAPIServer, kube_available

NS = "pw-harness"
NODE = "node-a"
STATUS_KEY = "k8s.v1.cni.cncf.io/network-status"
NETWORK_STATUS = [
    {"name": "default", "interface": "eth0", "ips": ["10.244.0.5"], "default": True},
    {"name": f"{NS}/signaling", "interface": "net1", "ips": ["192.168.10.5"],
     "mac": "02:00:00:00:10:05"},
]
NAD_CONFIG = json.dumps({"cniVersion": "0.3.1", "type": "macvlan", "master": "eth1",
                         "ipam": {"type": "whereabouts", "range": "192.168.10.0/24"}})


# ---------------------------------------------------------------- pure parts

@pytest.mark.parametrize("groups, line", [
    (["system:masters"], 'tok,admin,admin,"system:masters"'),
    (["a", "b"], 'tok,admin,admin,"a,b"'),
    ([], 'tok,admin,admin,""'),
])
def test_token_file_line(groups, line):
    assert kubeapi.token_file_text({"admin": "tok"}, {"admin": groups}) == line + "\n"


def test_kubeconfig_doc_points_at_server_ca_and_token():
    doc = kubeapi.kubeconfig_doc("https://127.0.0.1:1", "/x/ca.crt", "bob", "t0k")
    ctx = doc["contexts"][0]["context"]
    assert doc["current-context"] == doc["contexts"][0]["name"]
    assert ctx["user"] == "bob" and doc["users"][0]["user"] == {"token": "t0k"}
    assert doc["clusters"][0]["cluster"] == {"server": "https://127.0.0.1:1",
                                             "certificate-authority": "/x/ca.crt"}


def test_vm_rss_read_from_proc_status():
    status = "Name:\tetcd\nVmPeak:\t  9 kB\nVmRSS:\t   51200 kB\nThreads:\t9\n"
    assert kubeapi._vm_rss_bytes(status) == 51200 * 1024


def _fake_pair(d: Path) -> tuple[str, str]:
    d.mkdir(parents=True)
    for name in ("kube-apiserver", "etcd"):
        (d / name).write_text("#!/bin/sh\n")
        (d / name).chmod(stat.S_IRWXU)
    return str(d / "kube-apiserver"), str(d / "etcd")


def test_binaries_looked_up_in_assets_then_path_then_cache(tmp_path, monkeypatch):
    assets, on_path = _fake_pair(tmp_path / "assets"), _fake_pair(tmp_path / "path")
    cached = _fake_pair(tmp_path / "cache" / f"kube-{kubeapi.KUBE_VERSION}" / "bin")
    monkeypatch.setenv("PLANEWATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path / "assets"))
    monkeypatch.setenv("PATH", f"{tmp_path / 'path'}:/usr/bin:/bin")
    assert kubeapi.find_binaries() == assets
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path / "nothing-here"))
    assert kubeapi.find_binaries() == on_path
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert kubeapi.find_binaries() == cached


def test_kube_unavailable_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANEWATCH_CACHE", str(tmp_path))
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("PLANEWATCH_NO_KUBE_BUILD", "1")
    if kubeapi.find_binaries():
        pytest.skip("kube-apiserver and etcd are in /usr/bin")
    assert "PLANEWATCH_NO_KUBE_BUILD" in kube_available()


# ---------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def kube():
    with KubeAPIServer(users={"collector": ["system:serviceaccounts"]}) as server:
        server.create_nad_crd()
        core = _core(server)
        core.create_namespace({"metadata": {"name": NS}})
        yield server


def _core(server, user="admin"):
    import kubernetes.client
    return kubernetes.client.CoreV1Api(server.api_client(user))


def _pod(name, node, annotations=None):
    return {"metadata": {"name": name, "namespace": NS, "annotations": annotations or {}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}


def _status_annotation():
    return {STATUS_KEY: json.dumps(NETWORK_STATUS),
            "k8s.v1.cni.cncf.io/networks": "signaling@net1"}


@pytest.mark.kube
@pytest.mark.skipif(bool(kube_available()), reason=str(kube_available()))
class TestRealAPIServer:
    def test_nad_is_a_served_custom_resource(self, kube):
        import kubernetes.client
        custom = kubernetes.client.CustomObjectsApi(kube.api_client())
        nad = {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
               "metadata": {"name": "signaling", "namespace": NS},
               "spec": {"config": NAD_CONFIG}}
        custom.create_namespaced_custom_object("k8s.cni.cncf.io", "v1", NS,
                                               "network-attachment-definitions", nad)
        got = custom.list_namespaced_custom_object("k8s.cni.cncf.io", "v1", NS,
                                                   "network-attachment-definitions")
        assert [(i["metadata"]["name"], i["spec"]["config"]) for i in got["items"]] == [
            ("signaling", NAD_CONFIG)]

    def test_field_selector_lists_only_this_nodes_pods(self, kube):
        core = _core(kube)
        core.create_namespaced_pod(NS, _pod("here", NODE, _status_annotation()))
        core.create_namespaced_pod(NS, _pod("elsewhere", "node-b"))
        pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE}").items
        assert [p.metadata.name for p in pods] == ["here"]
        assert json.loads(pods[0].metadata.annotations[STATUS_KEY]) == NETWORK_STATUS

    def test_watch_from_resource_version_sees_added_then_modified(self, kube):
        import kubernetes.watch
        core = _core(kube)
        since = core.list_namespaced_pod(NS).metadata.resource_version
        core.create_namespaced_pod(NS, _pod("watched", NODE))
        core.patch_namespaced_pod("watched", NS, {"metadata": {"annotations": _status_annotation()}})
        seen = []
        stream = kubernetes.watch.Watch().stream(core.list_namespaced_pod, NS,
                                                 resource_version=since, timeout_seconds=10)
        for event in stream:
            if event["object"].metadata.name == "watched":
                seen.append((event["type"], STATUS_KEY in (event["object"].metadata.annotations or {})))
            if len(seen) == 2:
                break
        assert seen == [("ADDED", False), ("MODIFIED", True)]

    def test_token_user_has_only_rbac_rights(self, kube):
        import kubernetes.client
        collector = _core(kube, "collector")
        with pytest.raises(kubernetes.client.ApiException) as err:
            collector.list_pod_for_all_namespaces()
        assert err.value.status == 403
        rbac = kubernetes.client.RbacAuthorizationV1Api(kube.api_client())
        rbac.create_cluster_role({"metadata": {"name": "pw-pod-reader"}, "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]})
        rbac.create_cluster_role_binding({
            "metadata": {"name": "pw-pod-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "pw-pod-reader"},
            "subjects": [{"kind": "User", "name": "collector",
                          "apiGroup": "rbac.authorization.k8s.io"}]})
        names = _eventually(lambda: [p.metadata.name for p in
                                     collector.list_pod_for_all_namespaces().items])
        assert "here" in names
        with pytest.raises(kubernetes.client.ApiException) as err:
            collector.list_namespace()
        assert err.value.status == 403

    def test_kubeconfig_file_is_usable_by_the_client(self, kube):
        import kubernetes.client
        import kubernetes.config
        path = kube.kubeconfig("admin")
        assert yaml.safe_load(Path(path).read_text())["clusters"][0]["cluster"]["server"] == kube.url
        api = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(path))
        assert NS in [n.metadata.name for n in api.list_namespace().items]

    def test_scheduled_pod_needs_force_delete_without_kubelet(self, kube):
        import kubernetes.client
        core = _core(kube)
        core.create_namespaced_pod(NS, _pod("doomed", NODE))
        core.delete_namespaced_pod("doomed", NS)
        assert core.read_namespaced_pod("doomed", NS).metadata.deletion_timestamp is not None
        core.delete_namespaced_pod("doomed", NS, grace_period_seconds=0)
        with pytest.raises(kubernetes.client.ApiException) as err:
            core.read_namespaced_pod("doomed", NS)
        assert err.value.status == 404

    def test_ippool_and_monitoring_crds_validate(self, kube):
        import kubernetes.client
        assert kube.create_ippool_crd() == "ippools.whereabouts.cni.cncf.io"
        assert kube.create_monitoring_crds() == ["servicemonitors.monitoring.coreos.com",
                                                 "prometheusrules.monitoring.coreos.com"]
        custom = kubernetes.client.CustomObjectsApi(kube.api_client())
        pool = {"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "IPPool",
                "metadata": {"name": "192.168.10.0-24", "namespace": NS},
                "spec": {"range": "192.168.10.0/24", "allocations": {
                    "5": {"id": "c0ffee", "podref": f"{NS}/here", "ifname": "net1"}}}}
        custom.create_namespaced_custom_object("whereabouts.cni.cncf.io", "v1alpha1", NS,
                                               "ippools", pool)
        pool["metadata"]["name"] = "bad"
        del pool["spec"]["allocations"]["5"]["podref"]
        with pytest.raises(kubernetes.client.ApiException) as err:
            custom.create_namespaced_custom_object("whereabouts.cni.cncf.io", "v1alpha1", NS,
                                                   "ippools", pool)
        assert err.value.status == 422
        rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                "metadata": {"name": "pw", "namespace": NS},
                "spec": {"groups": [{"name": "pw", "rules": [
                    {"alert": "X", "expr": "up == 0", "for": "5m"}]}]}}
        got = custom.create_namespaced_custom_object("monitoring.coreos.com", "v1", NS,
                                                     "prometheusrules", rule)
        assert got["spec"]["groups"][0]["rules"][0]["for"] == "5m"

    def test_apiserver_outage_keeps_data_in_etcd(self, kube):
        core = _core(kube)
        before = core.read_namespaced_pod("here", NS).metadata.uid
        t0 = time.monotonic()
        kube.stop_apiserver()
        print(f"\nkube-apiserver stopped in {time.monotonic() - t0:.2f} s")
        assert "kube-apiserver" not in kube.pids() and "etcd" in kube.pids()
        with pytest.raises(OSError):
            kube.request("GET", "/readyz")
        kube.start_apiserver()
        assert _core(kube).read_namespaced_pod("here", NS).metadata.uid == before

    def test_measurements(self, kube, record_property):
        rss = kube.rss_bytes()
        record_property("start_seconds", kube.start_seconds)
        record_property("rss_bytes", rss)
        print(f"\nstart seconds {kube.start_seconds}; RSS MiB "
              f"{ {k: round(v / 2**20) for k, v in rss.items()} }")
        assert set(rss) == {"etcd", "kube-apiserver"} and all(v > 10 * 2**20 for v in rss.values())
        assert 0 < kube.start_seconds["kube-apiserver"] < kubeapi.READY_TIMEOUT_SECONDS
        assert 0 < kube.start_seconds["kube-apiserver-restart"] < kubeapi.READY_TIMEOUT_SECONDS


@pytest.mark.kube
@pytest.mark.skipif(bool(kube_available()), reason=str(kube_available()))
def test_close_kills_both_processes_and_removes_the_directory():
    server = KubeAPIServer()
    with server:
        pids, workdir = server.pids(), server.dir
        assert set(pids) == {"etcd", "kube-apiserver"}
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or _is_zombie_or_gone(pid)
    assert not workdir.exists()


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _eventually(fn, timeout=10.0):
    """RBAC changes reach the authorizer through an informer: retry briefly."""
    import kubernetes.client
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except kubernetes.client.ApiException as e:
            if e.status != 403 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.kube
@pytest.mark.skipif(bool(kube_available()), reason=str(kube_available()))
def test_a_port_taken_before_the_bind_starts_both_again_on_other_ports(monkeypatch):
    """What CI saw once: kube-apiserver's port, free when asked, was in use when it
    bound. Here another program holds it (a listening socket handed out as that port)."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real = kubeapi.free_port
        handed = iter([real(), real(), taken])          # etcd, etcd peer, kube-apiserver
        monkeypatch.setattr(kubeapi, "free_port", lambda: next(handed, None) or real())
        server = KubeAPIServer()
        with server:
            assert server.port != taken
            assert server.request("GET", "/readyz")[0] == 200
            logs = {p.name for p in server.dir.iterdir() if ".log" in p.name}
            assert {"kube-apiserver.log.1", "kube-apiserver.log", "etcd.log"} <= logs
            assert kubeapi.PORT_TAKEN in (server.dir / "kube-apiserver.log.1").read_text()
