"""planewatch's own image and DaemonSet on a real node (tests/node.py): kubelet and
containerd make the pods, the stand-in meta-plugin their secondary networks, and
the collector must see them as it would in production."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, parse_metrics, series, unique_prefix

WORKLOAD_NS = "pwtraffic"
PODS = ("pod-a", "pod-b")
SECONDARY = {"macvlan-net": ("net1", "signaling"), "bridge-net": ("net2", "data")}
DEFAULT_NETWORK = "planewatch-node-pods"
COUNTERS = {"receive_packets": "rx_packets", "receive_bytes": "rx_bytes",
            "transmit_packets": "tx_packets", "transmit_bytes": "tx_bytes"}
PINGS = 7
CAPS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
        "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
        "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
        "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
        "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
        "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
        "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
        "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40}


def sh(*args: str, **kw) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def kubectl() -> str:
    venv = Path(REPO) / ".venv" / "bin" / "kubectl"
    return str(venv) if venv.exists() else "kubectl"


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def node(request):
    from tests.node import Node
    from tests.node_bins import node_unavailable
    if reason := node_unavailable():
        pytest.skip(reason)
    n = Node(unique_prefix("pwn"))
    n.up()
    failed_before = request.session.testsfailed
    try:
        yield n
    finally:
        print(f"\nreal node timings (s): {n.state.get('timings')}")
        t = time.monotonic()
        failed = request.session.testsfailed > failed_before
        if failed:
            print(n.log_tails())
        from tests.node_teardown import other_nodes, residue, snapshot
        snap = snapshot(n)
        n.down(keep_logs=failed)
        print(f"real node tear-down: {time.monotonic() - t:.1f} s {n.down_timings}")
        left = residue(snap, other_nodes=bool(other_nodes(n)))
        assert not left, f"the node's tear-down left: {left}"


@pytest.fixture(scope="module")
def deployed(node):
    """deploy/ applied as the README says (kustomize, server-side), with only the image
    reference changed (and imagePullPolicy: Never: there is no registry)."""
    from tests.kubeapi import NAD_CRD, PROMETHEUSRULE_CRD, SERVICEMONITOR_CRD
    from tests.node_images import PLANEWATCH_IMAGE, import_archive, planewatch_image
    t = time.monotonic()
    archive, timings = planewatch_image()
    import_archive(node, archive, base_name=PLANEWATCH_IMAGE.rsplit(":", 1)[0])
    images = node.ctr("images", "ls", "-q").stdout.decode().split()
    assert PLANEWATCH_IMAGE in images, images
    timings["image-total"] = round(time.monotonic() - t, 1)
    for crd in (NAD_CRD, SERVICEMONITOR_CRD, PROMETHEUSRULE_CRD):
        sh(kubectl(), "--kubeconfig", node.kubeconfig, "apply", "-f", str(crd))
    sh(kubectl(), "--kubeconfig", node.kubeconfig, "wait", "--for=condition=established",
       "--timeout=60s", "crd", "--all")
    name, tag = PLANEWATCH_IMAGE.rsplit(":", 1)
    with tempfile.TemporaryDirectory() as tmp:
        pull_never = [{"op": "replace", "path": "/spec/template/spec/containers/0/imagePullPolicy",
                       "value": "Never"}]
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(Path(REPO) / "deploy", tmp)],
            "images": [{"name": "ghcr.io/planewatch/planewatch", "newName": name, "newTag": tag}],
            "patches": [{"target": {"kind": kind}, "patch": json.dumps(pull_never)}
                        for kind in ("DaemonSet", "Deployment")]}))
        t = time.monotonic()
        sh(kubectl(), "--kubeconfig", node.kubeconfig, "apply", "--server-side", "-k", tmp)
    ds = wait(lambda: ready_pod(node, "planewatch", "app.kubernetes.io/name=planewatch"), 180,
              "the planewatch DaemonSet pod to be Ready")
    timings["daemonset-ready"] = round(time.monotonic() - t, 1)
    print(f"\nplanewatch image and DaemonSet timings (s): {timings}")
    return ds


@pytest.fixture(scope="module")
def workload(node, deployed):
    """Two busybox pods, each with two secondary networks through NADs."""
    from tests.node_config import nad_configs
    from tests.node_images import BUSYBOX_IMAGE
    objs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": WORKLOAD_NS}}]
    for nad, conf in nad_configs(node.dir, node.net).items():
        objs.append({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                     "metadata": {"name": nad, "namespace": WORKLOAD_NS,
                                  "annotations": {"planewatch.io/plane": SECONDARY[nad][1]}},
                     "spec": {"config": json.dumps(conf)}})
    for pod in PODS:
        objs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": pod, "namespace": WORKLOAD_NS,
            "annotations": {"k8s.v1.cni.cncf.io/networks": ",".join(SECONDARY)}},
            "spec": {"terminationGracePeriodSeconds": 0, "containers": [{
                "name": "sleep", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                "command": ["sleep", "3600"]}]}})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(objs, f)
        f.flush()
        sh(kubectl(), "--kubeconfig", node.kubeconfig, "apply", "-f", f.name)
    pods = {p: wait(lambda p=p: ready_pod(node, WORKLOAD_NS, name=p), 120, f"{p} Ready")
            for p in PODS}
    return pods


# ---------------------------------------------------------------- helpers

def ready_pod(node, ns: str, selector: str = "", name: str = "") -> dict | None:
    path = f"/api/v1/namespaces/{ns}/pods" + (f"/{name}" if name else f"?labelSelector={selector}")
    status, body = node.request("GET", path)
    if status != 200:
        return None
    for pod in ([body] if name else body["items"]):
        conds = pod.get("status", {}).get("conditions") or []
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
            return pod
    return None


def container_pid(node, pod: dict) -> int:
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    for line in node.ctr("tasks", "ls").stdout.decode().splitlines()[1:]:
        task, pid, _ = line.split()
        if task == cid:
            return int(pid)
    raise AssertionError(f"no task for container {cid}")


def pinned_netns(pid: int) -> str:
    """The /run/netns pin containerd made whose inode is the process's netns."""
    inode = os.stat(f"/proc/{pid}/ns/net").st_ino
    pins = [p for p in Path("/run/netns").glob("cni-*") if p.stat().st_ino == inode]
    assert len(pins) == 1, pins
    return pins[0].name


def get(pod: dict, path: str, port: int = 9808) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{pod['status']['podIP']}:{port}{path}", timeout=30) as r:
        return r.read()


def scrape(pod: dict) -> dict:
    return parse_metrics(get(pod, "/metrics").decode())


def kernel_stats(netns: str) -> dict[str, dict[str, int]]:
    links = json.loads(sh("ip", "-n", netns, "-s", "-j", "link", "show"))
    return {l["ifname"]: {f"{d}_{u}": l["stats64"][d][u] for d in ("rx", "tx")
                          for u in ("packets", "bytes")} for l in links}


def value(m: dict, name: str, **labels) -> float:
    found = series(m, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return next(iter(found.values()))


def held_links(pid: int) -> set[int]:
    """Ids of the BPF links a process holds open (link fds show `link_id:` in fdinfo)."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("link_id:"):
                ids.add(int(line.split()[1]))
    return ids


def tcx_links() -> set[int]:
    """Ids of BPF links whose program is planewatch's TCX/tc program."""
    progs = {p["id"]: p.get("name", "") for p in json.loads(sh("bpftool", "-j", "prog", "show") or "[]")}
    return {l["id"] for l in json.loads(sh("bpftool", "-j", "link", "show") or "[]")
            if progs.get(l.get("prog_id")) in ("tcx_ingress", "tcx_egress")}


def quiet_scrape(ds: dict, netns: dict[str, str]):
    """Kernel counters, a scrape, kernel counters again; kept when nothing moved in between."""
    for _ in range(30):
        k0 = {p: kernel_stats(n) for p, n in netns.items()}
        m = scrape(ds)
        k1 = {p: kernel_stats(n) for p, n in netns.items()}
        if k0 == k1:
            return k1, m
        time.sleep(1)
    raise AssertionError("counters never quiet around a scrape")


# ---------------------------------------------------------------- tests

def test_daemonset_pod_runs_non_root_with_only_the_granted_capabilities(node, deployed):
    ds_yaml = yaml.safe_load((Path(REPO) / "deploy/base/daemonset.yaml").read_text())
    sc = ds_yaml["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    granted = sum(1 << CAPS[c] for c in sc["capabilities"]["add"])
    assert sc["capabilities"]["drop"] == ["ALL"]
    status = Path(f"/proc/{container_pid(node, deployed)}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    fields = {k: v.split() for k, v in fields.items()}
    assert fields["Uid"] == ["65534"] * 4 and fields["Gid"] == ["65534"] * 4
    for cap_set in ("CapEff", "CapPrm", "CapBnd"):
        assert int(fields[cap_set][0], 16) == granted, (cap_set, fields[cap_set], hex(granted))
    assert int(fields["CapInh"][0], 16) == 0 and int(fields["CapAmb"][0], 16) == 0
    assert fields["NoNewPrivs"] == ["1"]


def test_cluster_deployment_runs_the_image_with_no_capability(node, deployed):
    """deploy/cluster runs `planewatch cluster` from the same image with every capability
    dropped: the interpreter's permitted-only file capabilities neither block its exec
    nor grant it anything. (Not Ready here: no Whereabouts CRD, so no IPPool list.)"""
    selector = "app.kubernetes.io/name=planewatch-cluster"

    def serving() -> dict | None:
        status, body = node.request("GET", f"/api/v1/namespaces/planewatch/pods?labelSelector={selector}")
        for pod in body.get("items", []) if status == 200 else []:
            statuses = pod.get("status", {}).get("containerStatuses") or []
            if statuses and "running" in statuses[0].get("state", {}) and pod["status"].get("podIP"):
                try:
                    if get(pod, "/healthz", 9809) == b"ok\n":
                        return pod
                except OSError:
                    pass
        return None
    pod = wait(serving, 120, "the planewatch-cluster pod to answer /healthz")
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    status = Path(f"/proc/{container_pid(node, pod)}/status").read_text()
    fields = {k: v.split() for k, v in (line.split(":", 1) for line in status.splitlines())}
    assert fields["Uid"] == ["65534"] * 4
    for cap_set in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(fields[cap_set][0], 16) == 0, (cap_set, fields[cap_set])
    assert fields["NoNewPrivs"] == ["1"]


def test_metrics_show_every_runtime_made_attachment(node, deployed, workload):
    status, body = node.request("GET", "/api/v1/pods")
    expected = set()
    for pod in body["items"]:
        raw = (pod["metadata"].get("annotations") or {}).get("k8s.v1.cni.cncf.io/network-status")
        if pod["spec"].get("hostNetwork") or not raw:
            continue
        for entry in json.loads(raw):
            expected.add((pod["metadata"]["namespace"], pod["metadata"]["name"],
                          entry["name"], entry["interface"]))
    # The stand-in wrote what Multus 4 writes for the workload pods.
    for name in PODS:
        st = json.loads(workload[name]["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"])
        assert [(e["name"], e["interface"], e.get("default", False), e["dns"]) for e in st] == [
            (DEFAULT_NETWORK, "eth0", True, {}),
            (f"{WORKLOAD_NS}/macvlan-net", "net1", False, {}),
            (f"{WORKLOAD_NS}/bridge-net", "net2", False, {})]
    assert len({e for e in expected if e[0] == WORKLOAD_NS}) == 6

    def seen():
        m = scrape(deployed)
        got = {(dict(l)["namespace"], dict(l)["pod"], dict(l)["network"], dict(l)["interface"])
               for l in series(m, "planewatch_interface_receive_packets_total")}
        return m if expected <= got else None
    m = wait(seen, 60, f"all attachments in /metrics: {sorted(expected)}")
    for name in PODS:
        for nad, (ifname, plane) in {**SECONDARY, "": ("eth0", "management")}.items():
            network = f"{WORKLOAD_NS}/{nad}" if nad else DEFAULT_NETWORK
            assert value(m, "planewatch_interface_receive_packets_total", namespace=WORKLOAD_NS,
                         pod=name, network=network, interface=ifname) >= 0
            assert series(m, "planewatch_interface_up", namespace=WORKLOAD_NS, pod=name,
                          network=network, interface=ifname, plane=plane)


def test_resolved_through_the_cgroup_uid(node, deployed, workload):
    """containerd runs CNI ADD (which writes network-status) before the pod's first
    process starts, so a pod seen at once may first be matched by MAC in the netns
    dir; the collector must then settle on the exact path, the cgroup UID."""
    def by_cgroup():
        debug = json.loads(get(deployed, "/debug/attachments"))    # a fresh snapshot
        pods = {(p["namespace"], p["pod"]): p for p in debug["pods"]}
        ours = [pods.get((WORKLOAD_NS, n), {}) for n in PODS]
        return ours if all(p.get("resolved_by") == "cgroup" for p in ours) else None
    entries = wait(by_cgroup, 60, "both workload pods resolved through their cgroup")
    for name, entry in zip(PODS, entries):
        pid = container_pid(node, workload[name])
        assert entry["netns_inode"] == os.stat(f"/proc/{pid}/ns/net").st_ino
        assert entry["netns"] == f"/host/run/netns/{pinned_netns(pid)}"     # the stable pin
        assert all(a["found_in_netns"] for a in entry["attachments"])


def test_counters_equal_the_kernel_after_traffic_between_pods(node, deployed, workload):
    netns = {p: pinned_netns(container_pid(node, workload[p])) for p in PODS}
    status = {p: {e["interface"]: e for e in json.loads(
        workload[p]["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"])} for p in PODS}
    for ifname in ("eth0", "net1", "net2"):
        sh("ip", "netns", "exec", netns["pod-a"], "ping", "-c", "3", "-i", "0.2", "-W", "2",
           status["pod-b"][ifname]["ips"][0])
    kernel, m = quiet_scrape(deployed, netns)
    for p in PODS:
        for ifname in ("eth0", "net1", "net2"):
            for metric, key in COUNTERS.items():
                got = value(m, f"planewatch_interface_{metric}_total", namespace=WORKLOAD_NS,
                            pod=p, interface=ifname)
                assert got == kernel[p][ifname][key], (p, ifname, metric)
            assert kernel[p][ifname]["tx_packets"] >= 3


def test_ebpf_counts_the_packets_sent(node, deployed, workload):
    netns = {p: pinned_netns(container_pid(node, workload[p])) for p in PODS}
    dest = json.loads(workload["pod-b"]["metadata"]["annotations"][
        "k8s.v1.cni.cncf.io/network-status"])[1]["ips"][0]            # pod-b's net1
    labels = lambda p: dict(namespace=WORKLOAD_NS, pod=p, interface="net1")

    def attached():
        # Programs attach to a pod's interfaces once its namespace is resolved: a pod
        # is counted from its first series on.
        m = scrape(deployed)
        return value(m, "planewatch_ebpf_up") == 1 and all(
            series(m, "planewatch_ebpf_interface_receive_packets_total", **labels(p)) for p in PODS)
    wait(attached, 60, "planewatch_ebpf_up 1 and eBPF series for both pods' net1")
    for _ in range(10):
        k0, m0 = quiet_scrape(deployed, netns)
        sh("ip", "netns", "exec", netns["pod-a"], "ping", "-c", str(PINGS), "-i", "0.2", "-W", "2", dest)
        k1, m1 = quiet_scrape(deployed, netns)
        kd = {(p, key): k1[p]["net1"][key] - k0[p]["net1"][key] for p in PODS for key in COUNTERS.values()}
        if all(kd[(p, f"{d}_packets")] == PINGS for p in PODS for d in ("rx", "tx")):
            break
    else:
        pytest.fail(f"kernel net1 counters never moved by exactly {PINGS} echo/reply pairs: {kd}")
    for p in PODS:
        for metric, key in COUNTERS.items():
            name = f"planewatch_ebpf_interface_{metric}_total"
            assert value(m1, name, **labels(p)) - value(m0, name, **labels(p)) == kd[(p, key)], (p, name)


def test_nothing_stays_attached_after_the_daemonset_is_deleted(node, deployed, workload):
    netns = {p: pinned_netns(container_pid(node, workload[p])) for p in PODS}

    def tc_programs() -> dict:
        out = {}
        for p, ns in netns.items():
            for dev in ("eth0", "net1", "net2"):
                ifindex = json.loads(sh("ip", "-n", ns, "-j", "link", "show", dev))[0]["ifindex"]
                nets = json.loads(sh("ip", "netns", "exec", ns, "bpftool", "-j", "net", "show"))
                tc = [t for n in nets for t in n.get("tc", []) if t.get("ifindex") == ifindex]
                # No clsact qdisc at all is an error for tc, and no filter either.
                filters = "".join(subprocess.run(
                    ["tc", "-n", ns, "filter", "show", "dev", dev, hook], capture_output=True,
                    text=True).stdout.strip() for hook in ("ingress", "egress"))
                out[(p, dev)] = (tc, filters)
        return out

    during = tc_programs()
    # The BPF links the collector's process holds (other tests on the machine may hold
    # their own): TCX ingress + egress on each of the six workload interfaces, or tc
    # filters on kernels without TCX.
    ours = held_links(container_pid(node, deployed)) & tcx_links()
    assert len(ours) >= 2 * 6 or all(t or f for t, f in during.values()), (ours, during)
    t = time.monotonic()
    sh(kubectl(), "--kubeconfig", node.kubeconfig, "-n", "planewatch", "delete", "daemonset",
       "planewatch", "--wait=true", "--timeout=120s")
    deleted = time.monotonic() - t
    wait(lambda: node.request("GET", "/api/v1/namespaces/planewatch/pods?labelSelector="
                              "app.kubernetes.io/name=planewatch")[1]["items"] == [], 120,
         "the DaemonSet pod to be gone")
    print(f"\nDaemonSet deleted in {deleted:.1f} s, its pod gone after {time.monotonic() - t:.1f} s")
    def attached():
        return ours & tcx_links(), {k: v for k, v in tc_programs().items() if v[0] or v[1]}
    deadline = time.monotonic() + 20             # link release after exit is RCU-lazy
    while any(left := attached()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == (set(), {}), f"still attached after the DaemonSet is gone: {left}"
