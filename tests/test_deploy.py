"""deploy/: what the manifests say, proven where it can be.

- static: kustomize builds; the DaemonSet holds its security promises; generated
  dashboards ConfigMaps are fresh; the secure Component wires the web config.
- lab (root): `planewatch serve`, installed as the image installs it and run as uid
  65534 with no_new_privs and the DaemonSet's capabilities as file capabilities,
  sees every lab pod; dropping each capability loses exactly what it guards.
- kube: on a real kube-apiserver, the manifests pass server-side dry-run and
  apply, and the ServiceAccount's real token can read what discovery reads and
  nothing more; under prometheus-operator's real schemas the ServiceMonitors and
  PrometheusRule come back unpruned, and broken variants are refused.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

import bcrypt
import pytest
import yaml

from exporters.webconfig import parse_web_config
from tests import kubeapi
from tests.conftest import free_port, parse_metrics, series, unique_prefix, wait_for

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SECURE = DEPLOY / "overlays" / "secure"
SA_USER = "system:serviceaccount:planewatch:planewatch"

sys.path.insert(0, str(DEPLOY))
import generate as dashboards_generate  # noqa: E402  deploy/generate.py


def kustomize(directory: Path) -> list[dict]:
    out = subprocess.run([kubeapi.require_kubectl(), "kustomize", str(directory)], check=True,
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
    kubeapi.require_kubectl()
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
#
# `planewatch serve` itself, run the way the image runs it: uid 65534, no_new_privs,
# the DaemonSet's capabilities as the bounding set, and a copy of Debian's python3
# carrying them as permitted-only file capabilities (deploy/Containerfile) that
# collector/caps.py makes effective.
#
# The runtime is rebuilt here as the image builds it: a venv of /usr/bin/python3.X
# (the project's .venv may be a pyenv interpreter under /root, which uid 65534 cannot
# enter), the project installed from a wheel, and the wheel's runtime dependencies
# taken from the project's .venv (same CPython ABI; hard links, so it costs no
# copy). Made once per module run in a world-readable temp dir, removed afterwards.

RUNTIME_SKIP = {".venv", ".git", "tests", "bench", "docs", "deploy", "build", "__pycache__"}


def _runtime_distributions() -> list:
    """planewatch's runtime requirements, transitively, as installed in this interpreter."""
    from importlib import metadata

    from packaging.requirements import Requirement
    seen, todo, found = set(), ["planewatch"], []
    while todo:
        dist = metadata.distribution(todo.pop())
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        found.append(dist)
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found[1:]                                    # planewatch itself comes from the wheel


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def runtime():
    if os.geteuid() != 0:
        pytest.skip("needs root: file capabilities, setpriv, network namespaces")
    missing = [t for t in ("setcap", "setpriv", "ip", "ping") if not shutil.which(t)]
    # Debian's interpreter of the .venv's version (3.11 on bookworm, as in the image;
    # 3.13 on trixie): the dependencies are linked from the .venv, same ABI.
    system_python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    assert not missing and os.access(system_python, os.X_OK), \
        f"missing {missing or system_python}: `make deps` installs them"
    objects = sorted((REPO / "ebpf" / "build").glob("*.bpf.o"))
    assert len(objects) >= 2, "no BPF objects in ebpf/build: `make -C ebpf`"
    root = Path(tempfile.mkdtemp(prefix=f"{unique_prefix('pwrt')}-"))
    try:
        root.chmod(0o755)
        src, venv, wheels = root / "src", root / "venv", root / "wheels"
        shutil.copytree(REPO, src, ignore=lambda d, names: [
            n for n in names if n in RUNTIME_SKIP and not (n == "build" and d.endswith("ebpf"))
            or n.endswith(".egg-info")])
        subprocess.run([system_python, "-m", "venv", "--without-pip", str(venv)], check=True)
        pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
        # built as `make deps` builds the editable install: setuptools>=77 from PyPI (pip's cache)
        subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(src)], check=True,
                       capture_output=True)
        subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                        "--no-index", *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
        site = next(venv.glob("lib/python3*/site-packages"))
        for dist in _runtime_distributions():
            for rel in dist.files or ():
                if not str(rel).startswith(".."):         # console scripts: not needed
                    _link_or_copy(Path(dist.locate_file(rel)), site / rel)
        shutil.rmtree(src)
        done = subprocess.run([str(venv / "bin" / "python"), "-c",
                               "import exporters.cli, aiohttp, ebpf.loader; print(ebpf.loader.OBJECTS_DIR)"],
                              capture_output=True, text=True, cwd="/")
        assert done.returncode == 0 and done.stdout.strip().startswith(str(site)), done
        yield {"root": root, "venv": venv, "system_python": system_python}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def capped_python(runtime, caps: set[str]) -> Path:
    """The image's planewatch-python: Debian's python3 copied into the venv's bin (so it finds
    the venv's pyvenv.cfg), `caps` as permitted-only file capabilities."""
    path = runtime["venv"] / "bin" / ("planewatch-python-" + ("-".join(sorted(c.lower() for c in caps)) or "nocaps"))
    if not path.exists():
        shutil.copy(runtime["system_python"], path)
        if caps:
            spec = ",".join(f"cap_{c.lower()}" for c in sorted(caps))
            subprocess.run(["setcap", f"{spec}+p", str(path)], check=True)
    return path


def as_pod_user(runtime, caps: set[str], *argv: str, file_caps: set[str] | None = None) -> list[str]:
    """What runc does for `runAsUser: 65534`, `allowPrivilegeEscalation: false`,
    `capabilities: {drop: [ALL], add: caps}`: the added set bounds (and, before exec,
    is permitted) and no_new_privs lets the file caps grant no more. Nothing may be
    exec'd in between (an `env` would lose every capability)."""
    bounding = ",".join(["-all"] + [f"+{c.lower()}" for c in sorted(caps)])
    python = capped_python(runtime, caps if file_caps is None else file_caps)
    return ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--no-new-privs",
            f"--bounding-set={bounding}", "--inh-caps=-all", "--", str(python), *argv]


POD_PINNED, POD_PROCESS = ("capns", "pinned"), ("capns", "process-only")


@pytest.fixture(scope="module")
def capability_lab(runtime):
    """Two pods, each with one veth towards a peer namespace, pinged so their counters move:
    - `pinned`: its netns pinned under /run/netns (found by MAC; needs SYS_ADMIN to enter);
    - `process-only`: an unpinned netns held by a uid-1000 process in the pod's cgroup
      (found through /proc/<pid>/ns/net of another uid: SYS_PTRACE, then SYS_ADMIN)."""
    tag = unique_prefix("pwc")
    pinned_ns, peer_ns = f"{tag}a", f"{tag}b"
    cgroup = Path(f"/sys/fs/cgroup/pids/{tag}-kubepods")
    uid_process = str(uuid.uuid5(uuid.NAMESPACE_URL, f"planewatch-test/{tag}/process-only"))
    uid_pinned = str(uuid.uuid5(uuid.NAMESPACE_URL, f"planewatch-test/{tag}/pinned"))
    holder = None
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    try:
        for ns in (pinned_ns, peer_ns):
            run("ip", "netns", "add", ns)
        holder = subprocess.Popen(["unshare", "--net", "setpriv", "--reuid", "1000", "--regid", "1000",
                                   "--clear-groups", "sleep", "900"])
        wait_for(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net")
                 and os.stat(f"/proc/{holder.pid}").st_uid == 1000, timeout=10, what="holder in its netns")
        (cgroup / f"pod{uid_process}" / "ctr").mkdir(parents=True)
        (cgroup / f"pod{uid_process}" / "ctr" / "cgroup.procs").write_text(str(holder.pid))
        pods = []
        for (namespace, name), uid, target, if_peer, mac, net in [
                (POD_PINNED, uid_pinned, pinned_ns, f"{tag}p0", "02:5c:a9:00:00:01", "169.254.61"),
                (POD_PROCESS, uid_process, str(holder.pid), f"{tag}p1", "02:5c:a9:00:00:02", "169.254.62")]:
            run("ip", "-n", peer_ns, "link", "add", if_peer, "type", "veth", "peer", "name", f"{tag}x",
                "address", mac, "netns", target)
            enter = ["ip", "-n", target] if target == pinned_ns else ["nsenter", "-t", target, "-n", "ip"]
            run(*enter, "link", "set", f"{tag}x", "name", "net1")
            run(*enter, "addr", "add", f"{net}.2/24", "dev", "net1")
            run(*enter, "link", "set", "net1", "up")
            run("ip", "-n", peer_ns, "addr", "add", f"{net}.1/24", "dev", if_peer)
            run("ip", "-n", peer_ns, "link", "set", if_peer, "up")
            run("ip", "netns", "exec", peer_ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", f"{net}.2")
            status = [{"name": "capns/plane", "interface": "net1", "mac": mac, "ips": [f"{net}.2"], "dns": {}}]
            pods.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": name, "namespace": namespace, "uid": uid, "annotations": {
                             "k8s.v1.cni.cncf.io/networks": "capns/plane@net1",
                             "k8s.v1.cni.cncf.io/network-status": json.dumps(status)}},
                         "spec": {"nodeName": "cap-node", "containers": [{"name": "c", "image": "x"}]},
                         "status": {"phase": "Running"}})
        pods_file = runtime["root"] / "pods.yaml"          # where uid 65534 can read it
        pods_file.write_text(yaml.safe_dump_all(pods))
        pods_file.chmod(0o644)
        yield {"pods_file": str(pods_file), "pinned_ns": f"/run/netns/{pinned_ns}"}
    finally:
        if holder:
            holder.kill()
            holder.wait()
        for d in sorted(cgroup.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            d.rmdir()
        for ns in (pinned_ns, peer_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def serve_metrics(runtime, lab, caps: set[str]) -> dict:
    """Start `planewatch serve` as the pod user with `caps`; once it is ready and BPF
    has had its chance to attach, the parsed /metrics."""
    port = free_port()
    proc = subprocess.Popen(
        as_pod_user(runtime, caps, str(runtime["venv"] / "bin" / "planewatch"), "serve",
                    "--web.listen-address", f"127.0.0.1:{port}", "--pods-file", lab["pods_file"],
                    "--node-name", "cap-node"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/",
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"})
    url = f"http://127.0.0.1:{port}"

    def get(path: str) -> str:
        with urllib.request.urlopen(url + path, timeout=5) as resp:
            return resp.read().decode()

    last: list = []

    def settled():
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stdout.read()}")
        try:
            get("/readyz")
            text = get("/metrics")
        except OSError as err:
            last[:] = [repr(err)]
            return None
        last[:] = [text]
        parsed = parse_metrics(text)
        ebpf_ok = series(parsed, "planewatch_ebpf_up") == {frozenset(): 1.0}
        want = len(series(parsed, "planewatch_interface_up"))
        attached = sum(series(parsed, "planewatch_ebpf_attached_interfaces").values())
        # done when BPF has attached to every interface it can see, or is down
        return parsed if (not ebpf_ok or attached >= want) else None
    try:
        try:
            return wait_for(settled, timeout=60, interval=0.5, what="serve ready with BPF settled")
        except AssertionError:
            proc.terminate()
            raise AssertionError(f"last answer: {last}; log: {proc.communicate(timeout=15)[0][-3000:]}") from None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def observed(parsed: dict) -> dict:
    """What a scrape shows per pod, and of BPF."""
    pods = {}
    for pod in (POD_PINNED, POD_PROCESS):
        labels = {"namespace": pod[0], "pod": pod[1]}
        rx = series(parsed, "planewatch_interface_receive_packets_total", interface="net1", **labels)
        ebpf_rx = series(parsed, "planewatch_ebpf_interface_receive_packets_total", **labels)
        pods[pod[1]] = {"netlink_rx": sum(rx.values()) if rx else None, "ebpf": bool(ebpf_rx)}
    info = [dict(k) for k in series(parsed, "planewatch_ebpf_info")]
    return {"pods": pods, "ebpf_up": series(parsed, "planewatch_ebpf_up").get(frozenset()),
            "attach_mode": info[0].get("attach_mode") if info else None}


@pytest.fixture(scope="module")
def serve_with(runtime, capability_lab):
    cache: dict[frozenset, dict] = {}

    def run(caps: set[str]) -> dict:
        key = frozenset(caps)
        if key not in cache:
            cache[key] = observed(serve_metrics(runtime, capability_lab, caps))
            print(f"\nserve as uid 65534 with {sorted(caps)}: {cache[key]}")
        return cache[key]
    return run


@pytest.mark.lab
def test_serve_as_uid_65534_with_the_daemonset_capabilities_sees_every_pod(serve_with, docs):
    got = serve_with(daemonset_capabilities(docs))
    for pod, seen in got["pods"].items():
        assert seen["netlink_rx"] and seen["netlink_rx"] >= 3, (pod, got)     # the pings, via setns + netlink
        assert seen["ebpf"], (pod, got)                                        # BPF loaded and attached in it
    assert got["ebpf_up"] == 1 and got["attach_mode"] in ("tcx", "clsact"), got


@pytest.mark.lab
def test_serve_without_capabilities_starts_and_sees_nothing(serve_with):
    got = serve_with(set())
    assert got["ebpf_up"] == 0, got
    assert all(seen["netlink_rx"] is None and not seen["ebpf"] for seen in got["pods"].values()), got


@pytest.mark.lab
@pytest.mark.parametrize("dropped", ["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"])
def test_each_capability_protects_exactly_its_part(serve_with, docs, dropped):
    full = serve_with(daemonset_capabilities(docs))
    got = serve_with(daemonset_capabilities(docs) - {dropped})
    if dropped == "SYS_ADMIN":          # no setns, no BPF: no pod's interfaces at all
        assert got["ebpf_up"] == 0 and all(
            s["netlink_rx"] is None and not s["ebpf"] for s in got["pods"].values()), got
    elif dropped == "SYS_PTRACE":       # another uid's /proc/<pid>/ns/net: the unpinned pod only
        assert got["pods"]["process-only"] == {"netlink_rx": None, "ebpf": False}, got
        assert got["pods"]["pinned"]["netlink_rx"] and got["pods"]["pinned"]["ebpf"], got
    else:                               # NET_ADMIN guards only the clsact fallback (below)
        assert full["attach_mode"] == "tcx" or full["attach_mode"] == "clsact"
        if full["attach_mode"] == "tcx":    # (counts differ between runs: IPv6 chatter)
            assert visible(got) == visible(full) and got["attach_mode"] == "tcx", (full, got)
        else:
            assert got["ebpf_up"] == 1 and not any(s["ebpf"] for s in got["pods"].values()), got
            assert all(s["netlink_rx"] for s in got["pods"].values()), got


def visible(got: dict) -> dict:
    return {pod: (s["netlink_rx"] is not None, s["ebpf"]) for pod, s in got["pods"].items()}


CLSACT_DRIVER = """
import socket, sys
from collector.caps import raise_effective
raise_effective()
from kernel.nsenter import in_netns
from ebpf.loader import Loader
netns = sys.argv[1]
with in_netns(netns):
    ifindex = socket.if_nametoindex("net1")
loader = Loader(attach_mode="clsact")
try:
    hook = loader.attach(netns, ifindex)
    print("attached", hook.mode)
    loader.detach(hook.netns_inode, ifindex)
except OSError as err:
    print("refused", err.errno)
    sys.exit(1)
"""


@pytest.mark.lab
def test_the_clsact_fallback_needs_net_admin(runtime, capability_lab, docs):
    """Kernels before 6.6 have no TCX: the loader's clsact path (serve picks it only on
    such a kernel) run as the pod user, with and without NET_ADMIN."""
    caps = daemonset_capabilities(docs)
    for granted, ok in ((caps, True), (caps - {"NET_ADMIN"}, False)):
        done = subprocess.run(as_pod_user(runtime, granted, "-c", CLSACT_DRIVER, capability_lab["pinned_ns"],
                                          file_caps=caps),
                              capture_output=True, text=True, timeout=60, cwd="/")
        assert (done.returncode == 0) == ok, (sorted(granted), done.stdout, done.stderr)
        assert done.stdout.split() == (["attached", "clsact"] if ok else ["refused", str(errno.EPERM)]), done

# ---------------------------------------------------------------- kube: a real API server

@pytest.fixture(scope="module")
def cluster(docs):
    """Our own kube-apiserver (not the session one: we create cluster-wide objects),
    with the CRDs the manifests use, and deploy/ really applied."""
    reason = kubeapi.kube_available()
    if reason:
        pytest.skip(reason)
    with kubeapi.KubeAPIServer() as kube:
        kube.create_nad_crd()
        kube.create_monitoring_crds()
        yield kube


def kubectl(kube, *args: str, kubeconfig: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([kubeapi.require_kubectl(), "--kubeconfig", kubeconfig or kube.kubeconfig(), *args],
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


# ---------------------------------------------------------------- kube: prometheus-operator schemas
#
# tests/fixtures/crds/{servicemonitor,prometheusrule}.yaml are upstream's structural
# schemas (transcribed, versions cited there). kube-apiserver 1.20 has no server-side
# field validation: under a structural schema it REJECTS wrong types, missing required
# fields, values outside an enum or pattern and duplicate list-map keys (422), and
# silently PRUNES unknown fields (a typo'd `intervall` is stored without it, and
# kubectl 1.32's --validate=strict against 1.20 lets it through too: seen). So the
# shipped objects are sent through a dry-run create and must come back with nothing
# pruned or changed; that comparison is what catches a typo in our own manifests.

MONITORING_PLURALS = {"ServiceMonitor": "servicemonitors", "PrometheusRule": "prometheusrules"}


def dry_run_create(kube, doc: dict) -> tuple[int, dict | str]:
    """Create `doc` (renamed into `default`, so it never collides with `applied`) with dryRun=All."""
    doc = {**doc, "metadata": {"name": "contract-" + doc["metadata"]["name"], "namespace": "default"}}
    return kube.request("POST", f"/apis/monitoring.coreos.com/v1/namespaces/default/"
                                f"{MONITORING_PLURALS[doc['kind']]}?dryRun=All", doc)


def lost(sent, got, path: str = "spec") -> list[str]:
    """Paths of `sent` that `got` lacks or holds differently (what the server pruned or
    rewrote). Fields the server adds (schema defaults) are not losses."""
    if isinstance(sent, dict):
        if not isinstance(got, dict):
            return [path]
        return [p for k, v in sent.items()
                for p in (lost(v, got[k], f"{path}.{k}") if k in got else [f"{path}.{k}"])]
    if isinstance(sent, list):
        if not isinstance(got, list) or len(got) != len(sent):
            return [path]
        return [p for i, (s, g) in enumerate(zip(sent, got)) for p in lost(s, g, f"{path}[{i}]")]
    return [] if sent == got else [path]


def test_lost_finds_pruned_and_rewritten_fields():
    sent = {"a": [{"b": 1, "c": "x"}], "d": {"e": True}}
    assert lost(sent, {"a": [{"b": 1, "c": "x", "added": 0}], "d": {"e": True}}) == []
    assert lost(sent, {"a": [{"b": 1}], "d": {"e": True}}) == ["spec.a[0].c"]
    assert lost(sent, {"a": [{"b": 2, "c": "x"}], "d": {}}) == ["spec.a[0].b", "spec.d.e"]
    assert lost(sent, {"a": [], "d": {"e": True}}) == ["spec.a"]


@pytest.fixture(scope="module")
def shipped_monitoring(docs, tmp_path_factory) -> list[dict]:
    """Every ServiceMonitor/PrometheusRule deploy/ ships: base, cluster, rules, and the
    secure Component's HTTPS + basic-auth ServiceMonitor."""
    secure = by_kind(secure_build(tmp_path_factory.mktemp("secure")))
    found = [d for kind in MONITORING_PLURALS for d in docs.get(kind, [])]
    found += [dict(d, metadata={**d["metadata"], "name": d["metadata"]["name"] + "-secure"})
              for d in secure["ServiceMonitor"] if d["spec"]["endpoints"][0].get("scheme") == "https"]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in found) == [
        ("PrometheusRule", "planewatch"), ("ServiceMonitor", "planewatch"),
        ("ServiceMonitor", "planewatch-cluster"), ("ServiceMonitor", "planewatch-secure")]
    return found


@pytest.mark.kube
def test_shipped_monitoring_objects_pass_the_real_schemas_unpruned(cluster, shipped_monitoring):
    for doc in shipped_monitoring:
        status, got = dry_run_create(cluster, doc)
        assert status == 201, (doc["metadata"]["name"], got)
        assert lost(doc["spec"], got["spec"]) == [], (doc["metadata"]["name"], got["spec"])


def _sm_endpoint(doc):
    return doc["spec"]["endpoints"][0]


def _first_rule(doc):
    return doc["spec"]["groups"][0]["rules"][0]


def _set(get, key, value):
    def mutate(doc):
        get(doc)[key] = value
    return mutate


def _delete(get, key):
    def mutate(doc):
        del get(doc)[key]
    return mutate


def _duplicate_group(doc):
    doc["spec"]["groups"].insert(1, {"name": doc["spec"]["groups"][0]["name"], "rules": []})


# (kind, what, mutation, the field the server names, its complaint)
REJECTED = [
    ("ServiceMonitor", "scheme upper-case", _set(_sm_endpoint, "scheme", "HTTPS"),
     "spec.endpoints.scheme", "Unsupported value"),
    ("ServiceMonitor", "interval in words", _set(_sm_endpoint, "interval", "15 seconds"),
     "spec.endpoints.interval", "should match"),
    ("ServiceMonitor", "scrapeTimeout as a number", _set(_sm_endpoint, "scrapeTimeout", 10),
     "spec.endpoints.scrapeTimeout", "must be of type string"),
    ("ServiceMonitor", "port number for the port name", _set(_sm_endpoint, "port", 9808),
     "spec.endpoints.port", "must be of type string"),
    ("ServiceMonitor", "no endpoints", _delete(lambda d: d["spec"], "endpoints"),
     "spec.endpoints", "Required value"),
    ("ServiceMonitor", "no selector", _delete(lambda d: d["spec"], "selector"),
     "spec.selector", "Required value"),
    ("ServiceMonitor", "basicAuth password without key",
     _set(_sm_endpoint, "basicAuth", {"username": {"name": "s", "key": "u"}, "password": {"name": "s"}}),
     "spec.endpoints.basicAuth.password.key", "Required value"),
    ("ServiceMonitor", "bearerTokenSecret as a string", _set(_sm_endpoint, "bearerTokenSecret", "token"),
     "spec.endpoints.bearerTokenSecret", "must be of type object"),
    ("ServiceMonitor", "TLS version spelt TLS1.2", _set(_sm_endpoint, "tlsConfig", {"minVersion": "TLS1.2"}),
     "spec.endpoints.tlsConfig.minVersion", "Unsupported value"),
    ("ServiceMonitor", "authorization credentials without key",
     _set(_sm_endpoint, "authorization", {"credentials": {"name": "s"}}),
     "spec.endpoints.authorization.credentials.key", "Required value"),
    ("ServiceMonitor", "relabel action unknown",
     _set(lambda d: _sm_endpoint(d)["relabelings"][0], "action", "rename"),
     "spec.endpoints.relabelings.action", "Unsupported value"),
    ("ServiceMonitor", "relabel source label not a label name",
     _set(lambda d: _sm_endpoint(d)["relabelings"][0], "sourceLabels", ["__meta-node"]),
     "spec.endpoints.relabelings.sourceLabels", "should match"),
    ("ServiceMonitor", "selector expression without operator",
     _set(lambda d: d["spec"], "selector", {"matchExpressions": [{"key": "app"}]}),
     "spec.selector.matchExpressions.operator", "Required value"),
    ("ServiceMonitor", "namespaceSelector names as a string",
     _set(lambda d: d["spec"], "namespaceSelector", {"matchNames": "planewatch"}),
     "spec.namespaceSelector.matchNames", "must be of type array"),
    ("PrometheusRule", "rule without expr", _delete(_first_rule, "expr"),
     "spec.groups.rules.expr", "Required value"),
    ("PrometheusRule", "expr as a list", _set(_first_rule, "expr", ["up"]),
     "spec.groups.rules.expr", "must validate at least one schema"),
    ("PrometheusRule", "for in words", _set(_first_rule, "for", "5 minutes"),
     "spec.groups.rules.for", "should match"),
    ("PrometheusRule", "label value a number", _set(_first_rule, "labels", {"severity": 1}),
     "spec.groups.rules.labels.severity", "must be of type string"),
    ("PrometheusRule", "annotations as a list", _set(_first_rule, "annotations", ["summary"]),
     "spec.groups.rules.annotations", "must be of type object"),
    ("PrometheusRule", "group without name", _delete(lambda d: d["spec"]["groups"][0], "name"),
     "spec.groups.name", "Required value"),
    ("PrometheusRule", "group with an empty name", _set(lambda d: d["spec"]["groups"][0], "name", ""),
     "spec.groups.name", "should be at least 1 chars long"),
    ("PrometheusRule", "two groups of one name", _duplicate_group,
     "spec.groups[1]", "Duplicate value"),
]


def _mutated(shipped: list[dict], kind: str, mutate) -> dict:
    doc = copy.deepcopy(next(d for d in shipped if d["kind"] == kind))
    mutate(doc)
    return doc


@pytest.mark.kube
@pytest.mark.parametrize("kind, what, mutate, field, complaint", REJECTED, ids=[r[1] for r in REJECTED])
def test_a_broken_monitoring_object_is_rejected(cluster, shipped_monitoring, kind, what, mutate,
                                                field, complaint):
    status, body = dry_run_create(cluster, _mutated(shipped_monitoring, kind, mutate))
    assert status == 422, body
    assert f"{field}:" in body["message"] or f"{field} in body" in body["message"], body["message"]
    assert complaint in body["message"], body["message"]


# A typo'd field name is no schema violation in 1.20: the server drops it. What the
# round-trip test above compares must show exactly that loss.
PRUNED = [
    ("ServiceMonitor", _set(_sm_endpoint, "intervall", "15s"), "spec.endpoints[0].intervall"),
    ("ServiceMonitor", _set(_sm_endpoint, "honourLabels", True), "spec.endpoints[0].honourLabels"),
    ("ServiceMonitor", _set(_sm_endpoint, "tlsConfig", {"server_name": "planewatch.planewatch.svc"}),
     "spec.endpoints[0].tlsConfig.server_name"),
    ("ServiceMonitor", _set(lambda d: d["spec"], "namespaceSelectors", {"any": True}),
     "spec.namespaceSelectors"),
    ("PrometheusRule", _set(_first_rule, "annotation", {"summary": "x"}), "spec.groups[0].rules[0].annotation"),
    ("PrometheusRule", _set(_first_rule, "keep_firing", "5m"), "spec.groups[0].rules[0].keep_firing"),
]


@pytest.mark.kube
@pytest.mark.parametrize("kind, mutate, path", PRUNED, ids=[p[2].rsplit(".", 1)[-1] for p in PRUNED])
def test_a_typo_d_field_is_pruned_and_the_round_trip_sees_it(cluster, shipped_monitoring, kind, mutate, path):
    doc = _mutated(shipped_monitoring, kind, mutate)
    status, got = dry_run_create(cluster, doc)
    assert status == 201, got
    assert lost(doc["spec"], got["spec"]) == [path]
