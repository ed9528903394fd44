"""Configuration files of the real node (tests/node.py): PKI, kubeconfig, containerd,
kubelet and the CNI default network. Pure text; every path is inside the node's dir.

Addresses: the node's bridge carries NODE_IP (10.237.N.1/24), which is also the
first address of the service range, so the `kubernetes` Service's ClusterIP is an
address the pods reach on-link without kube-proxy; a socat stand-in forwards its
port 443 to the API server on 127.0.0.1. Pods get 10.237.N.16-250 (isGateway false,
ipMasq false: no forwarding, no NAT, nothing touches the host's traffic)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

SANDBOX_IMAGE = "registry.k8s.io/pause:3.6"


class Net:
    def __init__(self, name: str, n: int):
        self.name, self.n = name, n
        self.subnet = f"10.237.{n}.0/24"
        self.node_ip = f"10.237.{n}.1"
        self.service_range = f"10.237.{n}.0/28"     # the kubernetes Service gets .1
        self.bridge = f"{name}br"                  # the default network
        self.macvlan_master = f"{name}m0"          # one end of our veth pair
        self.macvlan_peer = f"{name}m1"
        self.macvlan_subnet = f"10.238.{n}.0/24"
        self.net_bridge = f"{name}b1"              # the second secondary network
        self.net_bridge_subnet = f"10.239.{n}.0/24"

    def links(self) -> list[str]:
        return [self.bridge, self.macvlan_master, self.macvlan_peer, self.net_bridge]


# ---------------------------------------------------------------- PKI

def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


def _cert(d: Path, name: str, subj: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl(d, "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subj)
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "7", "-extfile", f"{name}.ext")


def make_pki(d: Path, net: Net) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.cnf").write_text("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n"
                              "CN = planewatch-node-ca\n[v3_ca]\nbasicConstraints = critical,CA:TRUE\n"
                              "keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n")
    _openssl(d, "req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "7", "-config", "ca.cnf", "-extensions", "v3_ca")
    server = "basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n"
    _cert(d, "apiserver", "/CN=kube-apiserver", server + "extendedKeyUsage = serverAuth\n"
          f"subjectAltName = IP:127.0.0.1,IP:{net.node_ip},DNS:localhost,DNS:kubernetes,"
          "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
          "DNS:kubernetes.default.svc.cluster.local\n")
    _cert(d, "kubelet", f"/CN={net.name}", server + "extendedKeyUsage = serverAuth\n"
          f"subjectAltName = IP:{net.node_ip},DNS:{net.name}\n")
    _cert(d, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
          server + "extendedKeyUsage = clientAuth\n")
    _openssl(d, "genrsa", "-out", "sa.key", "2048")
    _openssl(d, "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")


def kubeconfig(server: str, ca: Path, token: str) -> str:
    """JSON, which is valid kubeconfig YAML and readable by the stand-in CNI plugin."""
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "node",
        "clusters": [{"name": "node", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "node", "context": {"cluster": "node", "user": "admin"}}],
    }, indent=2)


# ---------------------------------------------------------------- containerd

def containerd_toml(d: Path) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
oom_score = 0
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  level = "info"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[{cri}]
  sandbox_image = "{SANDBOX_IMAGE}"
  # No CAP_SYS_RESOURCE here: nothing may lower oom_score_adj (recipe trap 1).
  restrict_oom_score_adj = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{d}/runc"
[{cri}.cni]
  bin_dir = "{d}/cni/bin"
  conf_dir = "{d}/cni/net.d"
  max_conf_num = 1
"""


def cni_conflist(d: Path, net: Net) -> str:
    default = {
        "name": "planewatch-node-pods", "type": "bridge", "bridge": net.bridge,
        "isGateway": False, "ipMasq": False, "hairpinMode": False,
        "ipam": {"type": "host-local", "dataDir": f"{d}/cni/ipam",
                 "ranges": [[{"subnet": net.subnet, "rangeStart": f"10.237.{net.n}.16",
                              "rangeEnd": f"10.237.{net.n}.250"}]]},
    }
    return json.dumps({"cniVersion": "0.4.0", "name": "planewatch-node", "plugins": [{
        "type": "multus-standin", "kubeconfig": f"{d}/kubeconfig.json",
        "cacheDir": f"{d}/cni/standin", "netnsLog": f"{d}/cni/netns.log",
        "delegates": [default]}]}, indent=2)


def nad_configs(d: Path, net: Net) -> dict[str, dict]:
    """Two secondary networks: macvlan on our veth, and a bridge of ours."""
    return {
        "macvlan-net": {"cniVersion": "0.4.0", "name": "macvlan-net", "type": "macvlan",
                        "master": net.macvlan_master, "mode": "bridge",
                        "ipam": {"type": "host-local", "dataDir": f"{d}/cni/ipam",
                                 "ranges": [[{"subnet": net.macvlan_subnet}]]}},
        "bridge-net": {"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge",
                       "bridge": net.net_bridge, "isGateway": False, "ipMasq": False,
                       "ipam": {"type": "host-local", "dataDir": f"{d}/cni/ipam",
                                "ranges": [[{"subnet": net.net_bridge_subnet}]]}},
    }


# ---------------------------------------------------------------- kubelet

def kubelet_config(d: Path, net: Net, port: int, healthz_port: int) -> str:
    return json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": net.node_ip, "port": port, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": healthz_port,
        "tlsCertFile": f"{d}/pki/kubelet.crt", "tlsPrivateKeyFile": f"{d}/pki/kubelet.key",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": f"{d}/pki/ca.crt"}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{net.name}",
        "failSwapOn": False,
        # kubelet would add iptables chains to the host: not ours to change (trap 5).
        "makeIPTablesUtilChains": False,
        # No CAP_SYS_RESOURCE: kubelet's default -999 cannot be set (trap 1).
        "oomScoreAdj": 0,
        "volumePluginDir": f"{d}/volume-plugins",
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "nodeStatusUpdateFrequency": "4s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "0s",
        "resolvConf": "/etc/resolv.conf",
    }, indent=2)
