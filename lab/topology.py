"""The lab: network namespaces shaped like pods on a Multus node.

Everything lives in namespaces the lab creates, named `<prefix>-...`; nothing is
added to the machine's own namespace. One "node" namespace holds the host side:

  br0   bridge, the cluster default network (pods' eth0 are veth ports), gateway .1
  sig0  veth whose peer is in the `<prefix>-sigpeer` namespace (a signaling peer);
        pods' net1 are macvlans (bridge mode) on it — the signaling network
  br1   bridge, the data network (pods' net2 are veth ports), IPv4 + IPv6
  br2   bridge, the storage network (net3 in scale pods)

Each network has a /16 so large labs fit: host i gets 10.<base+n>.<i // 240>.<10 + i % 240>.
The state file lists what was made; `down` removes exactly that.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
import zlib
from dataclasses import asdict, dataclass, field, replace

STATE_DIR = "/run/planewatch-lab"


@dataclass(frozen=True)
class NetworkSpec:
    key: str            # short name in the lab ("default", "signaling", ...)
    nad: str            # ns/name as network-status names it ("" for the default network)
    kind: str           # veth-bridge | macvlan
    host_dev: str       # bridge or macvlan parent in the node namespace
    octet: int          # second octet of the /16
    plane: str
    ipv6: bool = False


NAD_NAMESPACE = "telco"
DEFAULT_NETWORK_NAME = "k8s-pod-network"
NETWORKS = {
    "default": NetworkSpec("default", DEFAULT_NETWORK_NAME, "veth-bridge", "br0", 70, "management"),
    "signaling": NetworkSpec("signaling", f"{NAD_NAMESPACE}/signaling", "macvlan", "sig0", 71, "signaling"),
    "data": NetworkSpec("data", f"{NAD_NAMESPACE}/data", "veth-bridge", "br1", 72, "data", ipv6=True),
    "storage": NetworkSpec("storage", f"{NAD_NAMESPACE}/storage", "veth-bridge", "br2", 73, "storage"),
}


@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    interfaces: tuple[tuple[str, str], ...]          # (ifname in pod, network key)
    requests_extra: tuple[str, ...] = ()             # requested networks that will not be attached
    vfs: tuple[tuple[str, str, str], ...] = ()       # SR-IOV VFs: (ifname or "", nad, pci address)
    fixed_ips: tuple[tuple[str, str], ...] = ()      # (ifname, IPv4) instead of the lab's choice


def demo_pods() -> list[PodSpec]:
    return [
        PodSpec(NAD_NAMESPACE, "upf-a", (("eth0", "default"), ("net1", "signaling"), ("net2", "data"))),
        PodSpec(NAD_NAMESPACE, "upf-b", (("eth0", "default"), ("net1", "signaling"), ("net2", "data"))),
        PodSpec("default", "plain-c", (("eth0", "default"),)),
        PodSpec(NAD_NAMESPACE, "smf-d", (("eth0", "default"), ("net1", "signaling")),
                requests_extra=(f"{NAD_NAMESPACE}/storage",)),
    ]


SRIOV_NAD = f"{NAD_NAMESPACE}/n3-sriov"


def sriov_pods() -> list[PodSpec]:
    """A DPDK user-plane pod: its VFs live only in the SR-IOV fixture sysfs tree
    (lab/sriov_fixture.py): one bound to vfio-pci (no netdev anywhere), one mlx5."""
    return [PodSpec(NAD_NAMESPACE, "dpdk-upf", (("eth0", "default"),),
                    vfs=(("", SRIOV_NAD, "0000:3b:02.1"), ("net3", SRIOV_NAD, "0000:5e:00.2")))]


def with_ip_conflict(pods: list[PodSpec]) -> list[PodSpec]:
    """smf-d's net1 gets upf-a's signaling address: the mistake host-local IPAM
    makes across nodes, seen here on one."""
    first = address(NETWORKS["signaling"], 0)
    return [replace(p, fixed_ips=(("net1", first),)) if p.name == "smf-d" else p for p in pods]


def scale_pods(n: int) -> list[PodSpec]:
    four = (("eth0", "default"), ("net1", "signaling"), ("net2", "data"), ("net3", "storage"))
    return [PodSpec(NAD_NAMESPACE, f"cnf-{i:03d}", four) for i in range(n)]


@dataclass
class LabState:
    prefix: str
    node_ns: str
    peer_ns: str
    pod_ns: dict[str, str] = field(default_factory=dict)         # "ns/name" -> netns name
    addresses: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # pod -> ifname -> ips
    macs: dict[str, dict[str, str]] = field(default_factory=dict)
    pods_file: str = ""
    specs: list = field(default_factory=list)

    def path(self) -> str:
        return os.path.join(STATE_DIR, f"{self.prefix}.json")

    def save(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        with open(self.path(), "w") as f:
            json.dump(asdict(self), f, indent=1)

    @classmethod
    def load(cls, prefix: str) -> "LabState | None":
        try:
            with open(os.path.join(STATE_DIR, f"{prefix}.json")) as f:
                return cls(**json.load(f))
        except FileNotFoundError:
            return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def nsexec(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=check, capture_output=True, text=True)


def address(net: NetworkSpec, host: int, v6: bool = False) -> str:
    if v6:
        return f"fd00:{net.octet}::{host + 10:x}"
    return f"10.{net.octet}.{host // 240}.{10 + host % 240}"


def mac_address(prefix: str, pod_index: int, if_index: int) -> str:
    """Locally administered, stable for a prefix, distinct between labs."""
    h = zlib.crc32(prefix.encode()) & 0xFFFF        # two labs share MACs 1 time in 65536
    return f"02:{h >> 8:02x}:{h & 0xFF:02x}:{pod_index >> 8:02x}:{pod_index & 0xFF:02x}:{if_index:02x}"


def gateway(net: NetworkSpec) -> str:
    return f"10.{net.octet}.255.254"


def pod_uid(prefix: str, namespace: str, name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"planewatch-lab/{prefix}/{namespace}/{name}"))


def sysctl(ns: str, key: str, value: str) -> None:
    nsexec(ns, "sysctl", "-qw", f"{key}={value}")


def up(prefix: str = "pwlab", pods: list[PodSpec] | None = None) -> LabState:
    """Create the lab. On any failure, removes what it made and re-raises."""
    if len(prefix) > 8 or not prefix.replace("-", "").isalnum():
        raise ValueError("lab prefix: up to 8 letters/digits (interface names are short)")
    if LabState.load(prefix):
        raise RuntimeError(f"a lab named {prefix} is up already: `python -m lab down --prefix {prefix}`")
    pods = demo_pods() if pods is None else pods
    state = LabState(prefix, f"{prefix}-node", f"{prefix}-sigpeer", specs=[asdict(p) for p in pods])
    state.save()                       # saved first so `down` can clean a half-built lab
    try:
        _build_node(state)
        for i, spec in enumerate(pods):
            _build_pod(state, spec, i)
            state.save()
    except BaseException:
        down(prefix)
        raise
    return state


def _build_node(state: LabState) -> None:
    node, peer = state.node_ns, state.peer_ns
    for ns in (node, peer):
        ip("netns", "add", ns)
    for ns in (node, peer):
        ip("-n", ns, "link", "set", "lo", "up")
        sysctl(ns, "net.ipv4.conf.all.rp_filter", "0")
        sysctl(ns, "net.ipv4.conf.default.rp_filter", "0")
    sysctl(node, "net.ipv4.ip_forward", "1")
    for net in NETWORKS.values():
        if net.kind == "veth-bridge":
            ip("-n", node, "link", "add", net.host_dev, "type", "bridge")
            ip("-n", node, "link", "set", net.host_dev, "up")
            ip("-n", node, "addr", "add", f"{gateway(net)}/16", "dev", net.host_dev)
    sig = NETWORKS["signaling"]
    ip("-n", node, "link", "add", sig.host_dev, "type", "veth", "peer", "name", "sigpeer", "netns", peer)
    ip("-n", node, "link", "set", sig.host_dev, "up")
    ip("-n", peer, "link", "set", "sigpeer", "up")
    ip("-n", peer, "addr", "add", f"{gateway(sig)}/16", "dev", "sigpeer")


def _build_pod(state: LabState, spec: PodSpec, index: int) -> None:
    node = state.node_ns
    ns = f"{state.prefix}-p{index}"
    key = f"{spec.namespace}/{spec.name}"
    ip("netns", "add", ns)
    state.pod_ns[key] = ns
    ip("-n", ns, "link", "set", "lo", "up")
    for k in ("all", "default"):
        sysctl(ns, f"net.ipv4.conf.{k}.rp_filter", "0")
    state.addresses[key], state.macs[key] = {}, {}
    for if_index, (ifname, netkey) in enumerate(spec.interfaces):
        net = NETWORKS[netkey]
        mac = mac_address(state.prefix, index, if_index)
        tmp = f"{state.prefix[:4]}{index}{ifname}"[:15]
        if net.kind == "veth-bridge":
            host = f"{state.prefix[:4]}{index}h{ifname[-1]}"[:15]
            ip("-n", node, "link", "add", host, "type", "veth", "peer", "name", tmp, "netns", ns,
               "address", mac)
            ip("-n", node, "link", "set", host, "master", net.host_dev)
            ip("-n", node, "link", "set", host, "up")
        else:
            ip("-n", node, "link", "add", tmp, "address", mac, "link", net.host_dev,
               "type", "macvlan", "mode", "bridge")
            ip("-n", node, "link", "set", tmp, "netns", ns)
        ip("-n", ns, "link", "set", tmp, "name", ifname)
        ip("-n", ns, "link", "set", ifname, "up")
        fixed = dict(spec.fixed_ips).get(ifname)
        addrs = [fixed or address(net, index)] + ([address(net, index, v6=True)] if net.ipv6 else [])
        for a in addrs:
            plen = 64 if ":" in a else 16
            ip("-n", ns, "addr", "add", f"{a}/{plen}", "dev", ifname, *(["nodad"] if ":" in a else []))
        if netkey == "default":
            ip("-n", ns, "route", "add", "default", "via", gateway(net))
        state.addresses[key][ifname] = addrs
        state.macs[key][ifname] = mac


def down(prefix: str = "pwlab") -> list[str]:
    """Remove every namespace the lab recorded (and the state). Returns what was removed."""
    state = LabState.load(prefix)
    if state is None:
        return []
    removed = []
    for ns in [*state.pod_ns.values(), state.peer_ns, state.node_ns]:
        if ip("netns", "del", ns, check=False).returncode == 0:
            removed.append(ns)
    # a namespace added but not yet recorded (failure mid-pod): names are ours by prefix+index
    for i in range(len(state.specs)):
        ns = f"{prefix}-p{i}"
        if ns not in removed and os.path.exists(f"/run/netns/{ns}"):
            ip("netns", "del", ns, check=False)
            removed.append(ns)
    if state.pods_file and os.path.exists(state.pods_file):
        os.unlink(state.pods_file)
    shutil.rmtree(os.path.join(STATE_DIR, f"{prefix}-sysfs"), ignore_errors=True)
    os.unlink(state.path())
    return removed


def warm_up(state: LabState, count: int = 5) -> int:
    """A little traffic: every pod sends UDP to the first pod on each network they share.
    Returns the datagrams that arrived."""
    from lab.traffic import udp_exchange
    keys = list(state.pod_ns)
    got = 0
    for src in keys[1:]:
        for ifname in state.addresses[src]:
            target = _same_network_ip(state, keys[0], src, ifname)
            if target:
                got += udp_exchange(state.pod_ns[src], state.pod_ns[keys[0]], target, count)
    return got


def keep_traffic_flowing(state: LabState, stop, period: float = 1.0, count: int = 5) -> None:
    """Until `stop` (a threading.Event) is set: every `period` seconds, warm_up's
    pattern with `count` datagrams per pair, so rates and eBPF counters move."""
    while not stop.wait(period):
        try:
            warm_up(state, count)
        except OSError:         # the lab is being torn down
            return


def _same_network_ip(state: LabState, target_pod: str, src_pod: str, ifname: str) -> str:
    src_net = _network_of(state, src_pod, ifname)
    for t_if, t_ips in state.addresses[target_pod].items():
        if _network_of(state, target_pod, t_if) == src_net:
            return t_ips[0]
    return ""


def _network_of(state: LabState, pod: str, ifname: str) -> str:
    for spec in state.specs:
        if f"{spec['namespace']}/{spec['name']}" == pod:
            return dict((i, n) for i, n in spec["interfaces"]).get(ifname, "")
    return ""
