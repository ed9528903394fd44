"""deploy/: what the manifests say, proven where it can be.

- static: kustomize builds; the DaemonSet holds its security promises; generated
  dashboards ConfigMaps are fresh; the secure Component wires the web config.
- lab (root): the DaemonSet's exact capability set, given to a non-root process
  through file capabilities like the image does, suffices for every kernel access
  the collector makes, and each capability is needed by at least one of them.
- kube: on a real kube-apiserver, the manifests pass server-side dry-run and
  apply, and the ServiceAccount's real token can read what discovery reads and
  nothing more.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import bcrypt
import pytest
import yaml

from exporters.webconfig import parse_web_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SECURE = DEPLOY / "overlays" / "secure"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
SA_USER = "system:serviceaccount:planewatch:planewatch"

sys.path.insert(0, str(DEPLOY))
import generate as dashboards_generate  # noqa: E402  deploy/generate.py


def kustomize(directory: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], check=True,
                         capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    return kinds


def secure_build(tmp_path: Path) -> list[dict]:
    """Build deploy/ + the secure Component from a kustomization of our own, the way
    docs/deploy.md tells users to (kustomize wants relative paths)."""
    rel = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{rel}]\ncomponents: [{rel}/overlays/secure]\n")
    return kustomize(tmp_path)


@pytest.fixture(scope="module")
def docs() -> dict[str, list[dict]]:
    if not os.access(KUBECTL, os.X_OK):
        pytest.skip("kubectl missing")
    return by_kind(kustomize(DEPLOY))


def container(kinds) -> dict:
    return kinds["DaemonSet"][0]["spec"]["template"]["spec"]["containers"][0]


def daemonset_capabilities(kinds) -> set[str]:
    return set(container(kinds)["securityContext"]["capabilities"]["add"])


# ---------------------------------------------------------------- static

def test_everything_lands_in_the_planewatch_namespace(docs):
    assert {k for k in docs} >= {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                 "DaemonSet", "Service", "ServiceMonitor", "PrometheusRule"}
    for kind, items in docs.items():
        for item in items:
            if kind not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                assert item["metadata"]["namespace"] == "planewatch", (kind, item["metadata"])


def test_clusterrole_reads_pods_and_nads_only(docs):
    rules = docs["ClusterRole"][0]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {(g, r, v) for g, r in (("", "pods"),
                                               ("k8s.cni.cncf.io", "network-attachment-definitions"))
                       for v in ("get", "list", "watch")}
    subject = docs["ClusterRoleBinding"][0]["subjects"][0]
    assert (subject["kind"], subject["namespace"], subject["name"]) == \
        ("ServiceAccount", "planewatch", "planewatch")


def test_daemonset_security_promises(docs):
    pod = docs["DaemonSet"][0]["spec"]["template"]["spec"]
    ctr = container(docs)
    sc = ctr["securityContext"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert not sc.get("privileged")
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert daemonset_capabilities(docs) == {"SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"}
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    assert mounts["/host/run/netns"]["mountPropagation"] == "HostToContainer"
    assert all(m.get("readOnly") for p, m in mounts.items() if p.startswith("/host/"))
    hostpaths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert hostpaths == {"/run/netns", "/proc", "/sys"}       # no /sys/fs/bpf: nothing is pinned
    assert {"--path.procfs=/host/proc", "--path.sysfs=/host/sys",
            "--path.netns=/host/run/netns"} <= set(ctr["args"])
    env = {e["name"]: e for e in ctr["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ctr["resources"]["limits"] == {"cpu": "500m", "memory": "192Mi"}
    assert ctr["resources"]["requests"] == {"cpu": "25m", "memory": "80Mi"}


def test_service_and_servicemonitor_find_the_pods(docs):
    pod_labels = docs["DaemonSet"][0]["spec"]["template"]["metadata"]["labels"]
    svc = docs["Service"][0]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9808, "targetPort": "metrics",
                                     "protocol": "TCP"}]
    assert {"name": "metrics", "containerPort": 9808, "protocol": "TCP"} in container(docs)["ports"]
    sm = docs["ServiceMonitor"][0]["spec"]
    assert sm["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    endpoint = sm["endpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node",
            "action": "replace"} in endpoint["relabelings"]


def test_containerfile_grants_exactly_the_daemonset_capabilities(docs):
    text = (DEPLOY / "Containerfile").read_text()
    assert "setcap ${CAPS}+p " in text      # permitted only: collector/caps.py raises them
    setcap = re.search(r"^ARG CAPS=(\S+)$", text, re.M).group(1)
    file_caps = {c.removeprefix("cap_").upper() for c in setcap.split(",")}
    assert file_caps == daemonset_capabilities(docs)
    assert re.search(r"^USER 65534", text, re.M)


def test_dashboards_configmaps_are_fresh(docs):
    current = (DEPLOY / "base" / "monitoring" / "grafana-dashboards.yaml").read_text()
    assert current == dashboards_generate.generate(), "run python3 deploy/generate.py"
    found = sorted(p.name for p in dashboards_generate.DASHBOARDS.glob("*.json"))
    maps = [c for c in docs.get("ConfigMap", []) if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert sorted(k for c in maps for k in c["data"]) == found
    for cm in maps:
        for name, text in cm["data"].items():
            assert json.loads(text) == json.loads((dashboards_generate.DASHBOARDS / name).read_text())


def test_configmap_names_are_dns_labels():
    for stem, name in [("planewatch-overview", "planewatch-dashboard-overview"),
                       ("Plane_Loss", "planewatch-dashboard-plane-loss")]:
        assert dashboards_generate.configmap_name(stem) == name


def test_secure_component_mounts_the_web_config(tmp_path):
    kinds = by_kind(secure_build(tmp_path))
    ctr, pod = container(kinds), kinds["DaemonSet"][0]["spec"]["template"]["spec"]
    web_secret = next(s for s in kinds["Secret"] if s["metadata"]["name"].startswith("planewatch-web-config"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["web-config"]["secret"]["secretName"] == web_secret["metadata"]["name"]
    assert volumes["tls"]["secret"]["secretName"] == "planewatch-tls"
    assert "--web.config.file=/etc/planewatch/web/web-config.yml" in ctr["args"]
    assert ctr["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    endpoint = kinds["ServiceMonitor"][0]["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https" and endpoint["basicAuth"]["password"]["name"] == "planewatch-scrape"
    assert any(s["metadata"]["name"] == "planewatch-scrape" for s in kinds["Secret"])


def test_secure_web_config_is_valid_and_fails_closed():
    doc = yaml.safe_load((SECURE / "web-config.yml").read_text())
    tls, users, _ = parse_web_config(doc, "/etc/planewatch/web")
    assert tls["cert_file"] == "/etc/planewatch/tls/tls.crt"
    placeholder = dict(line.split("=", 1) for line in
                       (SECURE / "scrape-credentials.env").read_text().split())["password"]
    # The committed pair must not match: an unedited overlay must not be scrapable.
    assert not bcrypt.checkpw(placeholder.encode(), users["prometheus"])


# ---------------------------------------------------------------- lab: capabilities

# Stdlib only: it runs under a system interpreter as uid 65534. Each action prints
# "OK ..." or "FAIL <errno> ..." and exits 0/1.
PROBE = r'''
import ctypes, os, socket, struct, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)

def check(ret, what):
    if ret < 0 or ret is None:
        e = ctypes.get_errno() if ret in (-1, None) else -ret
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret

def enter(path):
    check(libc.setns(os.open(path, os.O_RDONLY), 0x40000000), "setns")

def netlink(msg_type, flags, body):
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    s.send(struct.pack("IHHII", 16 + len(body), msg_type, flags, 1, 0) + body)
    count = 0
    while True:
        data, off = s.recv(65536), 0
        while off < len(data):
            length, kind = struct.unpack_from("IH", data, off)
            if kind == 3:
                return count
            if kind == 2:
                err = struct.unpack_from("i", data, off + 16)[0]
                if err:
                    raise OSError(-err, f"netlink {msg_type}: {os.strerror(-err)}")
                return count
            count, off = count + 1, off + ((length + 3) & ~3)

def links():  # RTM_GETLINK dump with IFLA_EXT_MASK=RTEXT_FILTER_VF, as the sources ask
    return netlink(18, 0x301, struct.pack("BxHiII", 0, 0, 0, 0, 0) + struct.pack("HHI", 8, 29, 1))

def setns_netlink(path):
    enter(path)
    return f"links={links()} rp_filter={open('/proc/sys/net/ipv4/conf/all/rp_filter').read().strip()}"

def procns(pid):
    enter(f"/proc/{pid}/ns/net")
    return f"links={links()}"

def clsact(path, ifname):  # RTM_NEWQDISC clsact: the tc fallback for kernels without TCX
    enter(path)
    tcmsg = struct.pack("BxHiIII", 0, 0, socket.if_nametoindex(ifname), 0xFFFF0000, 0xFFFFFFF1, 0)
    kind = struct.pack("HH", 11, 1) + b"clsact\0\0"
    netlink(36, 0x1 | 0x4 | 0x400 | 0x200, tcmsg + kind)   # RTM_NEWQDISC, create+excl
    netlink(37, 0x1 | 0x4, tcmsg + kind)                    # RTM_DELQDISC: leave no trace
    return "clsact added and removed"

def bpf():
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.libbpf_set_print(None)
    for name, res, args in [("bpf_object__open_file", ctypes.c_void_p, (ctypes.c_char_p, ctypes.c_void_p)),
                            ("bpf_object__load", ctypes.c_int, (ctypes.c_void_p,)),
                            ("bpf_object__find_program_by_name", ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_char_p)),
                            ("bpf_program__fd", ctypes.c_int, (ctypes.c_void_p,)),
                            ("bpf_program__attach", ctypes.c_void_p, (ctypes.c_void_p,)),
                            ("bpf_link_create", ctypes.c_int, (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p))]:
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    return lib

def load(lib, path, prog):
    obj = check(lib.bpf_object__open_file(path.encode(), None), "open")
    check(lib.bpf_object__load(obj), "load")
    return lib.bpf_object__find_program_by_name(obj, prog.encode())

def bpf_tcx(obj, path, ifname):
    lib = bpf()
    fd = lib.bpf_program__fd(load(lib, obj, "tcx_ingress"))
    enter(path)
    check(lib.bpf_link_create(fd, socket.if_nametoindex(ifname), 46, None), "tcx attach")
    return "tcx attached"

def bpf_tracing(obj):
    lib = bpf()
    check(lib.bpf_program__attach(load(lib, obj, "count_drop")), "attach")
    return "tp_btf attached"

try:
    print("OK", globals()[sys.argv[1]](*sys.argv[2:]))
except OSError as e:
    print("FAIL", e.errno, e)
    sys.exit(1)
'''


def _system_python() -> str | None:
    """An interpreter uid 65534 can run (a pyenv under /root cannot be)."""
    for candidate in ("/usr/bin/python3.11", "/usr/bin/python3"):
        if os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return None


@pytest.fixture(scope="module")
def capability_lab(docs):
    """A netns with a veth, a uid-1000 process in it, the probe, BPF objects and an
    interpreter copy carrying the DaemonSet's capabilities as file caps (as in the image)."""
    python = _system_python()
    missing = [t for t in ("setcap", "setpriv", "ip") if not shutil.which(t)]
    if os.geteuid() != 0 or not python or missing:
        pytest.skip(f"needs root, a system python3 and {missing or 'setcap/setpriv/ip'}")
    tag = f"pwd{os.getpid() % 10000:04d}"
    ns_a, ns_b, veth = f"{tag}a", f"{tag}b", f"{tag}v0"
    work = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    sleeper = None
    try:
        work.chmod(0o755)
        # the probe starts as `planewatch serve` does: permitted caps made effective
        (work / "probe.py").write_text((REPO / "collector" / "caps.py").read_text()
                                       + "\nraise_effective()\n" + PROBE)
        shutil.copy(python, work / "python")
        for cmd in (["ip", "netns", "add", ns_a], ["ip", "netns", "add", ns_b],
                    ["ip", "link", "add", veth, "netns", ns_a, "type", "veth", "peer", "name",
                     f"{tag}v1", "netns", ns_b],
                    ["ip", "-n", ns_a, "link", "set", veth, "up"]):
            subprocess.run(cmd, check=True, capture_output=True)
        sleeper = subprocess.Popen(["ip", "netns", "exec", ns_a, "setpriv", "--reuid", "1000",
                                    "--regid", "1000", "--clear-groups", "sleep", "600"])
        objs = _build_bpf(work / "bpf")
        yield {"work": work, "ns": f"/run/netns/{ns_a}", "veth": veth, "pid": sleeper.pid, "bpf": objs}
    finally:
        if sleeper:
            sleeper.kill()
            sleeper.wait()
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def _build_bpf(out: Path) -> Path | None:
    """Build ebpf/*.bpf.c into `out` (not into the repo); None when the toolchain is absent."""
    if not (shutil.which("clang") and shutil.which("bpftool") and os.path.exists("/sys/kernel/btf/vmlinux")):
        return None
    done = subprocess.run(["make", "-s", "-C", str(REPO / "ebpf"), f"BUILD={out}"], capture_output=True)
    if done.returncode != 0:
        return None
    out.chmod(0o755)
    return out


def interpreter_with(lab, caps: set[str]) -> Path:
    """A copy of the interpreter with `caps` as permitted file capabilities (+p), as the image has."""
    name = "python-" + ("-".join(sorted(c.lower() for c in caps)) or "nocaps")
    path = lab["work"] / name
    if not path.exists():
        shutil.copy(lab["work"] / "python", path)
        if caps:
            spec = ",".join(f"cap_{c.lower()}" for c in sorted(caps))
            subprocess.run(["setcap", f"{spec}+p", str(path)], check=True)
    return path


def probe(lab, caps: set[str], *args: str, file_caps: set[str] | None = None) -> tuple[bool, str]:
    """Run one probe action as uid 65534 with no_new_privs and bounding set `caps`:
    what runc does for `runAsUser: 65534`, `allowPrivilegeEscalation: false`,
    `capabilities: {drop: [ALL], add: caps}` (the added set is also permitted before exec)."""
    python = interpreter_with(lab, caps if file_caps is None else file_caps)
    bounding = ",".join(["-all"] + [f"+{c.lower()}" for c in sorted(caps)])
    done = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--no-new-privs",
         f"--bounding-set={bounding}", "--inh-caps=-all", "--",
         str(python), str(lab["work"] / "probe.py"), *args],
        capture_output=True, text=True, timeout=60)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def kernel_accesses(lab) -> dict[str, tuple[str, ...]]:
    actions = {
        "setns+netlink": ("setns_netlink", lab["ns"]),
        "/proc/<pid>/ns/net of another uid": ("procns", str(lab["pid"])),
        "clsact qdisc": ("clsact", lab["ns"], lab["veth"]),
    }
    if lab["bpf"]:
        actions["BPF tc load + TCX attach"] = ("bpf_tcx", str(lab["bpf"] / "interface_traffic.bpf.o"),
                                               lab["ns"], lab["veth"])
        actions["BPF tp_btf load + attach"] = ("bpf_tracing", str(lab["bpf"] / "packet_drops.bpf.o"))
    return actions


@pytest.mark.lab
def test_daemonset_capabilities_suffice_for_every_kernel_access(capability_lab, docs):
    caps = daemonset_capabilities(docs)
    for name, args in kernel_accesses(capability_lab).items():
        ok, out = probe(capability_lab, caps, *args)
        assert ok, f"{name} failed with {sorted(caps)}: {out}"
    ok, out = probe(capability_lab, set(), "setns_netlink", capability_lab["ns"])
    assert not ok and "Operation not permitted" in out      # the probe can fail at all


@pytest.mark.lab
def test_image_file_caps_beyond_the_pod_set_still_start(capability_lab, docs):
    """The image's caps are permitted-only (+p): a pod that adds fewer still runs,
    and only the feature of the missing capability is lost."""
    caps = daemonset_capabilities(docs)
    ok, out = probe(capability_lab, caps - {"NET_ADMIN"}, "setns_netlink", capability_lab["ns"],
                    file_caps=caps)
    assert ok, out
    ok, out = probe(capability_lab, caps - {"NET_ADMIN"}, "clsact", capability_lab["ns"],
                    capability_lab["veth"], file_caps=caps)
    assert not ok and "Operation not permitted" in out, out


@pytest.mark.lab
@pytest.mark.parametrize("dropped, breaks", [
    ("SYS_ADMIN", None),                      # None: everything (no setns, no BPF)
    ("SYS_PTRACE", {"/proc/<pid>/ns/net of another uid"}),
    ("NET_ADMIN", {"clsact qdisc"}),
])
def test_each_capability_is_needed(capability_lab, docs, dropped, breaks):
    caps = daemonset_capabilities(docs) - {dropped}
    accesses = kernel_accesses(capability_lab)
    outputs = {name: probe(capability_lab, caps, *args) for name, args in accesses.items()}
    failed = {name for name, (ok, _) in outputs.items() if not ok}
    assert failed == (set(accesses) if breaks is None else breaks), (dropped, outputs)
    assert all("Operation not permitted" in out or "Permission denied" in out
               for name, (ok, out) in outputs.items() if not ok), outputs


# ---------------------------------------------------------------- kube: a real API server

@pytest.fixture(scope="module")
def cluster(docs):
    """Our own kube-apiserver (not the session one: we create cluster-wide objects),
    with the CRDs the manifests use, and deploy/ really applied."""
    from tests import kubeapi
    reason = kubeapi.kube_available()
    if reason:
        pytest.skip(reason)
    with kubeapi.KubeAPIServer() as kube:
        kube.create_nad_crd()
        kube.create_monitoring_crds()
        yield kube


def kubectl(kube, *args: str, kubeconfig: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([KUBECTL, "--kubeconfig", kubeconfig or kube.kubeconfig(), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def applied(cluster):
    # Server-side dry-run cannot create the namespace it then puts objects in
    # (NamespaceLifecycle admission): the namespace goes first, for real.
    done = kubectl(cluster, "apply", "-f", str(DEPLOY / "base" / "namespace.yaml"))
    assert done.returncode == 0, done.stderr
    dry = kubectl(cluster, "apply", "--dry-run=server", "-k", str(DEPLOY))
    assert dry.returncode == 0, dry.stderr
    real = kubectl(cluster, "apply", "--server-side", "-k", str(DEPLOY))
    assert real.returncode == 0, real.stderr
    return dry.stdout + real.stdout


@pytest.fixture(scope="module")
def sa_kubeconfig(cluster, applied, tmp_path_factory) -> tuple[str, str]:
    """A real token of the planewatch ServiceAccount (TokenRequest API), and a kubeconfig."""
    from tests.kubeapi import kubeconfig_doc
    status, body = cluster.request(
        "POST", "/api/v1/namespaces/planewatch/serviceaccounts/planewatch/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
         "spec": {"expirationSeconds": 3600}})
    assert status == 201, body
    token = body["status"]["token"]
    path = tmp_path_factory.mktemp("sa") / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig_doc(cluster.url, cluster.ca_path, "planewatch", token)))
    return str(path), token


@pytest.fixture(scope="module")
def pods_on_two_nodes(cluster, applied):
    for name, node in (("web-a", "node-a"), ("web-b", "node-b")):
        status, body = cluster.request("POST", "/api/v1/namespaces/default/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]}})
        assert status == 201, body
    status, body = cluster.request(
        "POST", "/apis/k8s.cni.cncf.io/v1/namespaces/default/network-attachment-definitions",
        {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
         "metadata": {"name": "signaling"}, "spec": {"config": '{"cniVersion":"0.3.1","type":"macvlan"}'}})
    assert status == 201, body


@pytest.mark.kube
def test_manifests_apply_on_a_real_api_server(cluster, applied):
    for kind, name in [("daemonset", "planewatch"), ("service", "planewatch"),
                       ("servicemonitor", "planewatch"), ("prometheusrule", "planewatch"),
                       ("serviceaccount", "planewatch")]:
        done = kubectl(cluster, "-n", "planewatch", "get", kind, name, "-o", "name")
        assert done.returncode == 0, (kind, done.stderr)
    done = kubectl(cluster, "get", "clusterrolebinding", "planewatch", "-o", "jsonpath={.subjects}")
    assert "planewatch" in done.stdout


@pytest.mark.kube
def test_secure_component_passes_server_dry_run(cluster, applied, tmp_path):
    rel = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{rel}]\ncomponents: [{rel}/overlays/secure]\n")
    done = kubectl(cluster, "apply", "--dry-run=server", "-k", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "secret/planewatch-scrape" in done.stdout


def sa_call(cluster, token: str, method: str, path: str, body: dict | None = None) -> int:
    import ssl
    import urllib.error
    import urllib.request
    req = urllib.request.Request(cluster.url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    ctx = ssl.create_default_context(cafile=cluster.ca_path)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.kube
def test_service_account_reads_what_discovery_reads(cluster, sa_kubeconfig, pods_on_two_nodes):
    kubeconfig, token = sa_kubeconfig
    done = kubectl(cluster, "get", "pods", "-A", "--field-selector", "spec.nodeName=node-a",
                   "-o", "name", kubeconfig=kubeconfig)
    assert done.returncode == 0 and done.stdout.split() == ["pod/web-a"], done
    # A watch with the node's field selector: only node-a's pod comes.
    from kubernetes import client, watch
    api = client.CoreV1Api(cluster.api_client())
    api.api_client.configuration.api_key = {"authorization": token}
    events = list(watch.Watch().stream(api.list_pod_for_all_namespaces, field_selector="spec.nodeName=node-a",
                                       timeout_seconds=1))
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "web-a")]
    with pytest.raises(client.ApiException) as refused:     # and that client really is the SA
        api.list_namespaced_secret("default")
    assert refused.value.status == 403
    done = kubectl(cluster, "get", "network-attachment-definitions", "-A", "-o", "name",
                   kubeconfig=kubeconfig)
    assert done.returncode == 0 and "signaling" in done.stdout, done


@pytest.mark.kube
@pytest.mark.parametrize("method, path, body", [
    ("GET", "/api/v1/namespaces/default/secrets", None),
    ("GET", "/api/v1/namespaces/planewatch/secrets/planewatch-scrape", None),
    ("GET", "/api/v1/configmaps", None),
    ("GET", "/api/v1/nodes", None),
    ("POST", "/api/v1/namespaces/default/pods",
     {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "evil"},
      "spec": {"containers": [{"name": "c", "image": "x"}]}}),
    ("DELETE", "/api/v1/namespaces/default/pods/web-a", None),
    ("PUT", "/api/v1/namespaces/default/pods/web-a/status", {}),
    ("POST", "/api/v1/namespaces/default/pods/web-a/exec?command=sh", None),
    ("DELETE", "/apis/k8s.cni.cncf.io/v1/namespaces/default/network-attachment-definitions/signaling", None),
])
def test_service_account_is_refused_everything_else(cluster, sa_kubeconfig, pods_on_two_nodes,
                                                    method, path, body):
    assert sa_call(cluster, sa_kubeconfig[1], method, path, body) == 403


@pytest.mark.kube
def test_rbac_cannot_confine_the_list_to_one_node(cluster, sa_kubeconfig, pods_on_two_nodes):
    """Field selectors are not an authorization dimension: the token that lists
    node-a's pods lists every node's pods too (docs/deploy.md, "RBAC limits")."""
    assert sa_call(cluster, sa_kubeconfig[1], "GET", "/api/v1/pods") == 200
    assert sa_call(cluster, sa_kubeconfig[1], "GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-b") == 200


@pytest.mark.kube
@pytest.mark.parametrize("verb, resource, allowed", [
    ("list", "pods", True), ("watch", "pods", True), ("get", "pods", True),
    ("list", "network-attachment-definitions.k8s.cni.cncf.io", True),
    ("create", "pods", False), ("patch", "pods", False), ("get", "secrets", False),
    ("create", "pods/exec", False), ("list", "ippools.whereabouts.cni.cncf.io", False),
])
def test_can_i_agrees(cluster, applied, verb, resource, allowed):
    done = kubectl(cluster, "auth", "can-i", verb, resource, "--all-namespaces", f"--as={SA_USER}")
    assert done.stdout.strip() == ("yes" if allowed else "no"), done
