"""A real single-node Kubernetes for the tests, and for a developer by hand:

    python -m tests.node up [NAME]     (make node-up)    prints how to reach it
    python -m tests.node down [NAME]   (make node-down)  removes everything it made

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet v1.20.2
(built once from Debian bookworm's `kubernetes` source, tests/node_bins.py) and the
host's containerd (1.6 on Debian 12, 1.7 on Debian 13; 2.x has no CRI v1alpha2 for
this kubelet and is refused with that reason), runc and Debian's CNI plugins
(/usr/lib/cni on both), with a bridge default network and the
stand-in meta-plugin (tests/tools/cni/multus-standin) for secondary networks. Every
daemon is started here, its PID (and start time, against PID reuse) recorded in
DIR/state.json, and stopped by PID. Tear-down removes the processes, kubelet's
mounts, the cni-* namespaces our sandboxes used, our links and cgroups, and puts
back the sysctls kubelet rewrites; the test fixture and `down` then check that
nothing is left (tests/node_teardown.py residue). Measured traps: ../shared/recipes/real-node.md.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tests import node_config as cfg
from tests import node_images
from tests.node_bins import CNI_DIR, kube_binaries, runtime_incompatibility
from tests.node_teardown import (
    cgroup_roots,
    kill_recorded,
    other_nodes,
    propagation,
    residue,
    restore_if_last,
    save_sysctls,
    snapshot,
    starttime,
    teardown_host,
)
from tests.ports import free_port

BASE = Path(os.environ.get("PLANEWATCH_NODE_DIR", "/var/lib/planewatch-node"))
STANDIN = Path(__file__).resolve().parent / "tools" / "cni" / "multus-standin"
READY_SECONDS = 120
SYSTEM_NAMESPACES = {"default", "kube-system", "kube-public", "kube-node-lease"}


class Node:
    def __init__(self, name: str = "pwnode"):
        self.name = name
        self.dir = BASE / name
        # 10.237.N.0/24: N from the name, so two nodes of different names do not collide.
        self.net = cfg.Net(name, 20 + zlib.crc32(name.encode()) % 200)
        self.state_path = self.dir / "state.json"
        self.state: dict = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    # ------------------------------------------------------------ state

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.rename(self.state_path)

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.state['ports']['apiserver']}"

    @property
    def kubeconfig(self) -> str:
        return str(self.dir / "kubeconfig.json")

    @property
    def containerd_sock(self) -> str:
        return str(self.dir / "containerd.sock")

    # ------------------------------------------------------------ up

    def up(self) -> "Node":
        if self.state:
            self.down()                      # a leftover of a killed run under the same name
        t0 = time.monotonic()
        bins = kube_binaries()
        self.state = {"name": self.name, "pids": {}, "timings": {}, "preexisting": {
            p: os.path.exists(p) for p in ("/var/lib/cni", "/run/containerd", "/var/log/pods",
                                           "/var/log/containers", "/run/netns")},
            "propagation": propagation()}
        self._save()
        try:
            self._up(bins)
        except BaseException:
            print(self.log_tails(), file=sys.stderr)
            self.down(keep_logs=True)
            raise
        self.state["timings"]["up"] = round(time.monotonic() - t0, 1)
        self._save()
        return self

    def _up(self, bins: dict[str, str]) -> None:
        if reason := runtime_incompatibility():
            raise RuntimeError(f"node {self.name}: {reason}")
        d, net = self.dir, self.net
        for sub in ("pki", "logs", "cni/bin", "cni/net.d", "cni/ipam", "cni/standin",
                    "kubelet", "volume-plugins", "etcd"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        cfg.make_pki(d / "pki", net)
        token = secrets.token_hex(16)
        (d / "pki" / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
        ports = {k: free_port() for k in ("etcd", "etcd-peer", "apiserver", "kubelet",
                                          "kubelet-healthz", "controller-manager", "scheduler")}
        self.state.update(token=token, ports=ports, node_ip=net.node_ip, links=net.links(),
                          cgroup=f"/{self.name}", sysctls=save_sysctls(BASE))
        self._save()
        self._host_network()
        for root in cgroup_roots():                      # kubelet's --cgroup-root must exist
            (Path(root) / self.name).mkdir(exist_ok=True)
            # A new v1 cpuset starts empty and no task could join it: inherit the root's.
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (Path(root) / knob).exists():
                    (Path(root) / self.name / knob).write_text((Path(root) / knob).read_text())
        (d / "kubeconfig.json").write_text(cfg.kubeconfig(
            f"https://127.0.0.1:{ports['apiserver']}", d / "pki" / "ca.crt", token))

        etcd = f"http://127.0.0.1:{ports['etcd']}"
        peer = f"http://127.0.0.1:{ports['etcd-peer']}"
        self._spawn("etcd", [bins["etcd"], "--name", "default", "--data-dir", str(d / "etcd"),
                             "--listen-client-urls", etcd, "--advertise-client-urls", etcd,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", f"default={peer}", "--listen-metrics-urls", "",
                             "--log-level", "warn", "--logger", "zap"],
                    ready=lambda: _http_ok(etcd + "/health"))
        p = d / "pki"
        self._spawn("kube-apiserver", [
            bins["kube-apiserver"], f"--etcd-servers={etcd}", "--bind-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}", f"--advertise-address={net.node_ip}",
            f"--tls-cert-file={p}/apiserver.crt", f"--tls-private-key-file={p}/apiserver.key",
            f"--client-ca-file={p}/ca.crt", f"--token-auth-file={p}/tokens.csv",
            "--authorization-mode=Node,RBAC", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={p}/sa.pub", f"--service-account-signing-key-file={p}/sa.key",
            f"--service-cluster-ip-range={net.service_range}", "--endpoint-reconciler-type=none",
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-certificate-authority={p}/ca.crt",
            f"--kubelet-client-certificate={p}/apiserver-kubelet-client.crt",
            f"--kubelet-client-key={p}/apiserver-kubelet-client.key",
            f"--cert-dir={d}/apiserver-certs"],
            ready=lambda: self.request("GET", "/readyz")[0] == 200)
        # kube-proxy stand-in for the one Service pods use: ClusterIP:443 -> API server.
        self._spawn("kube-proxy-standin", [
            "socat", f"TCP-LISTEN:443,bind={net.node_ip},reuseaddr,fork",
            f"TCP:127.0.0.1:{ports['apiserver']}"])
        (d / "containerd.toml").write_text(cfg.containerd_toml(d))
        for plugin in CNI_DIR.iterdir():
            (d / "cni" / "bin" / plugin.name).symlink_to(plugin)
        (d / "cni" / "bin" / "multus-standin").symlink_to(STANDIN)
        (d / "cni" / "net.d" / "10-planewatch-node.conflist").write_text(cfg.cni_conflist(d, net))
        self._spawn("containerd", ["containerd", "--config", str(d / "containerd.toml")],
                    ready=lambda: self.ctr("version", check=False).returncode == 0)
        t = time.monotonic()
        node_images.import_base_images(self)
        self.state["timings"]["base-images"] = round(time.monotonic() - t, 1)
        kc = ["--kubeconfig", self.kubeconfig]
        self._spawn("kube-controller-manager", [
            bins["kube-controller-manager"], *kc, "--bind-address=127.0.0.1",
            f"--secure-port={ports['controller-manager']}", "--port=0", "--leader-elect=false",
            f"--service-account-private-key-file={p}/sa.key", f"--root-ca-file={p}/ca.crt",
            "--use-service-account-credentials=false", "--controllers=*,-csrsigning"])
        self._spawn("kube-scheduler", [
            bins["kube-scheduler"], *kc, "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}", "--port=0", "--leader-elect=false"])
        (d / "kubelet.json").write_text(cfg.kubelet_config(d, net, ports["kubelet"],
                                                           ports["kubelet-healthz"]))
        self._spawn("kubelet", [
            bins["kubelet"], *kc, "--config", str(d / "kubelet.json"),
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{self.containerd_sock}",
            f"--image-service-endpoint=unix://{self.containerd_sock}",
            f"--node-ip={net.node_ip}", f"--hostname-override={self.name}",
            f"--root-dir={d}/kubelet", f"--cert-dir={d}/kubelet/pki", "--v=1"],
            ready=self.node_ready)
        # The controller-manager makes the `default` ServiceAccount pods need.
        self._wait("kube-controller-manager", lambda: self.request(
            "GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200)

    def _host_network(self) -> None:
        net = self.net
        # The DaemonSet mounts /run/netns with HostToContainer propagation, which the
        # runtime refuses unless the source is a shared (or slave) mount; `ip netns add`
        # makes it one, a fresh machine may not have it yet: do what iproute2 does.
        if not _is_mountpoint("/run/netns"):
            os.makedirs("/run/netns", exist_ok=True)
            subprocess.run(["mount", "--bind", "/run/netns", "/run/netns"], check=True)
            self.state["made_netns_mount"] = True
            self._save()
        subprocess.run(["mount", "--make-shared", "/run/netns"], check=True)
        ip = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True)
        ip("link", "add", net.bridge, "type", "bridge")
        ip("addr", "add", f"{net.node_ip}/24", "dev", net.bridge)
        ip("link", "set", net.bridge, "up")
        ip("link", "add", net.macvlan_master, "type", "veth", "peer", "name", net.macvlan_peer)
        ip("link", "set", net.macvlan_master, "up")
        ip("link", "set", net.macvlan_peer, "up")

    def _spawn(self, name: str, argv: list[str], ready=None) -> None:
        t = time.monotonic()
        with open(self.dir / "logs" / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    cwd=self.dir, start_new_session=True)
        self.state["pids"][name] = {"pid": proc.pid, "start": starttime(proc.pid)}
        self._save()
        self._procs = getattr(self, "_procs", {})
        self._procs[name] = proc
        if ready:
            self._wait(name, ready)
        self.state["timings"][name] = round(time.monotonic() - t, 1)

    def _wait(self, name: str, ready) -> None:
        deadline = time.monotonic() + READY_SECONDS
        proc = self._procs[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode})")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready in {READY_SECONDS}s")

    # ------------------------------------------------------------ access

    def request(self, method: str, path: str, body=None,
                ctype: str = "application/json") -> tuple[int, dict | str]:
        ctx = ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.crt"))
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api_url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.state['token']}", "Content-Type": ctype})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=15) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def api_client(self):
        import kubernetes.client
        c = kubernetes.client.Configuration()
        c.host = self.api_url
        c.ssl_ca_cert = str(self.dir / "pki" / "ca.crt")
        c.api_key = {"authorization": self.state["token"]}
        c.api_key_prefix = {"authorization": "Bearer"}
        return kubernetes.client.ApiClient(c)

    def node_ready(self) -> bool:
        status, body = self.request("GET", f"/api/v1/nodes/{self.name}")
        return status == 200 and any(c["type"] == "Ready" and c["status"] == "True"
                                     for c in body.get("status", {}).get("conditions", []))

    def ctr(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", self.containerd_sock, "--namespace", "k8s.io",
                               *args], check=check, capture_output=True, **kw)

    def alive(self, name: str) -> bool:
        rec = self.state.get("pids", {}).get(name)
        return bool(rec) and starttime(rec["pid"]) == rec["start"]

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.dir / "logs").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    # ------------------------------------------------------------ down

    def down(self, keep_logs: bool = False) -> None:
        """Remove everything; keep_logs copies the daemons' logs to
        /tmp/planewatch-node-NAME-logs first (the only thing then left)."""
        if not self.state:
            return
        phases, t = {}, time.monotonic()

        def phase(name):
            nonlocal t
            phases[name] = round(time.monotonic() - t, 1)
            t = time.monotonic()
        restore_if_last(self)
        if self.alive("kube-apiserver") and self.alive("kubelet"):
            self._delete_workloads()
        phase("workloads")
        kill_recorded(self.state.get("pids", {}),
                      ["kubelet", "kube-scheduler", "kube-controller-manager", "kube-apiserver",
                       "kube-proxy-standin", "etcd"])
        phase("daemons")
        if self.alive("containerd"):
            self._stop_sandboxes()
        kill_recorded(self.state.get("pids", {}), ["containerd"])
        for proc in getattr(self, "_procs", {}).values():
            proc.poll()                  # reap the daemons this process started
        phase("containerd")
        teardown_host(self)
        phase("host")
        logs = Path(f"/tmp/planewatch-node-{self.name}-logs")
        shutil.rmtree(logs, ignore_errors=True)
        if keep_logs and (self.dir / "logs").exists():
            shutil.copytree(self.dir / "logs", logs)
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            BASE.rmdir()                 # only when no other node lives there
        except OSError:
            pass
        phase("files")
        self.down_timings = phases
        self.state = {}

    def _delete_workloads(self, timeout: float = 90) -> None:
        """Through the API, so kubelet stops every sandbox and CNI DEL runs."""
        status, body = self.request("GET", "/api/v1/pods")
        body = body if status == 200 and isinstance(body, dict) else {}
        self.state["pod_uids"] = [p["metadata"]["uid"] for p in body.get("items", [])]
        self._save()
        _, nss = self.request("GET", "/api/v1/namespaces")
        for ns in nss.get("items", []):
            name = ns["metadata"]["name"]
            if name not in SYSTEM_NAMESPACES:
                self.request("DELETE", f"/api/v1/namespaces/{name}")
        for ns in SYSTEM_NAMESPACES:
            for kind in ("apis/apps/v1/namespaces/{}/daemonsets", "apis/apps/v1/namespaces/{}/deployments",
                         "apis/apps/v1/namespaces/{}/replicasets"):
                self.request("DELETE", "/" + kind.format(ns))
        # No grace: nothing is drained on a node being thrown away; kubelet still stops
        # each sandbox (CNI DEL) before the pod leaves the API.
        for ns in {p["metadata"]["namespace"] for p in body.get("items", [])} | SYSTEM_NAMESPACES:
            self.request("DELETE", f"/api/v1/namespaces/{ns}/pods", {"gracePeriodSeconds": 0})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.request("GET", "/api/v1/pods")
            if status == 200 and not body.get("items"):
                break
            time.sleep(0.5)
        else:
            left = [f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in body.get("items", [])]
            print(f"node {self.name}: pods still in the API after {timeout} s: {left}", file=sys.stderr)
        # Sandboxes are stopped (CNI DEL, netns removed) just after the pods leave the API.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(Path(n).exists() for n in self.used_netns()):
            time.sleep(0.5)

    def _stop_sandboxes(self) -> None:
        tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.decode().split()
        for task in tasks:
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        for task in tasks:
            self.ctr("tasks", "delete", "-f", task, check=False)

    def used_netns(self) -> list[str]:
        log = self.dir / "cni" / "netns.log"
        return sorted({n for n in log.read_text().split() if n}) if log.exists() else []


def _is_mountpoint(path: str) -> bool:
    return any(line.split()[4] == path
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    node = Node(argv[1] if len(argv) > 1 else "pwnode")
    if argv[0] == "down":
        snap = snapshot(node) if node.state else None
        node.down(keep_logs=True)
        others = bool(other_nodes(node))
        if snap and (left := residue(snap, other_nodes=others)):
            print(f"node {node.name}: down, but left: {left}", file=sys.stderr)
            return 1
        print(f"node {node.name}: down, nothing left ({getattr(node, 'down_timings', {})} s); "
              f"logs kept in /tmp/planewatch-node-{node.name}-logs")
        return 0
    node.up()
    print(f"node {node.name} is up in {node.state['timings']['up']} s\n"
          f"  export KUBECONFIG={node.kubeconfig}\n"
          f"  ctr --address {node.containerd_sock} -n k8s.io images ls\n"
          f"  logs: {node.dir}/logs   stop: python -m tests.node down {node.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
