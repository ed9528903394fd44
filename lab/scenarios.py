"""Routing scenarios on a running lab: each function changes the lab's own
namespaces (pods, node, signaling peer) and returns a `Change` whose `revert()`
undoes exactly what it did, last change first. A function that fails half-way
reverts itself before raising.

1. `loose_rp_filter`      the correct set-up: replies leave by the interface the
                          request came in on (connected subnet), rp_filter loose
2. `more_specific_route`  a peer on the signaling subnet reached by a more
                          specific route via eth0 → route_mismatch on net1
3. `off_subnet_peer`      a client (a pod) sends from an off-subnet address over
                          the signaling network; the server's reply follows its
                          default route via eth0 → asymmetric packets, and the
                          client's strict rp_filter drops them (IP_RPFILTER)
4. `overlapping_subnet`   a second address on net2 inside net1's subnet
5. `policy_routing_fix`   the fix: a policy routing table for net1's source
6. `signaling_via_peer`   the normal set-up of a routed plane: every signaling pod
                          routes a service prefix via the signaling peer, the
                          plane's gateway (a route next hop, not in the annotation)
7. `gateway_blackhole`    the signaling peer stops answering ARP (the NOARP flag
                          on its interface: no carrier change, no traffic needed)

`udp_request_reply` sends real datagrams and answers them, from whatever
address the server's routing picks, like any UDP service.
"""
from __future__ import annotations

import contextlib
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Callable

from kernel.nsenter import in_netns
from lab.topology import NETWORKS, LabState, gateway, ip, nsexec

SIGNALING_GATEWAY = gateway(NETWORKS["signaling"])       # the signaling peer (router)
DEFAULT_GATEWAY = gateway(NETWORKS["default"])


@dataclass
class Change:
    """What a scenario did, as undo steps."""

    name: str
    info: dict = field(default_factory=dict)
    undo: list[Callable[[], None]] = field(default_factory=list)

    def ip(self, ns: str, *args: str, undo: tuple[str, ...] | None = None) -> None:
        """`ip -n ns args`, and `ip -n ns undo` on revert."""
        ip("-n", ns, *args)
        if undo:
            self.undo.append(lambda: ip("-n", ns, *undo, check=False))

    def sysctl(self, ns: str, key: str, value: str) -> None:
        old = nsexec(ns, "sysctl", "-n", key).stdout.strip()
        nsexec(ns, "sysctl", "-qw", f"{key}={value}")
        self.undo.append(lambda: nsexec(ns, "sysctl", "-qw", f"{key}={old}", check=False))

    def revert(self) -> None:
        while self.undo:
            self.undo.pop()()


def _building(change: Change, build: Callable[[Change], None]) -> Change:
    try:
        build(change)
    except BaseException:
        change.revert()
        raise
    return change


@contextlib.contextmanager
def applied(change: Change):
    try:
        yield change
    finally:
        change.revert()


def pod_ns(state: LabState, pod: str) -> str:
    return state.pod_ns[pod]


def pod_ip(state: LabState, pod: str, ifname: str) -> str:
    return next(a for a in state.addresses[pod][ifname] if ":" not in a)


def lab_subnet(address: str) -> str:
    """Every lab network is a /16 (lab/topology.py)."""
    return str(ipaddress.ip_network(f"{address}/16", strict=False))


# --- 1. the correct set-up -----------------------------------------------------------

def loose_rp_filter(state: LabState, pods: tuple[str, ...] = ("telco/upf-a", "telco/upf-b")) -> Change:
    """rp_filter=2 (loose) everywhere in the given pods: what a multi-homed pod should have."""
    def build(c: Change) -> None:
        for pod in pods:
            ns = pod_ns(state, pod)
            c.sysctl(ns, "net.ipv4.conf.all.rp_filter", "2")
            for ifname in state.addresses[pod]:
                c.sysctl(ns, f"net.ipv4.conf.{ifname}.rp_filter", "2")
    return _building(Change("loose_rp_filter"), build)


# --- 2. a more specific route steals part of the signaling subnet --------------------

def more_specific_route(state: LabState, pod: str = "telco/upf-a", prefix: str = "10.71.5.0/24") -> Change:
    def build(c: Change) -> None:
        c.ip(pod_ns(state, pod), "route", "add", prefix, "via", DEFAULT_GATEWAY, "dev", "eth0",
             undo=("route", "del", prefix, "via", DEFAULT_GATEWAY, "dev", "eth0"))
        c.info.update(pod=pod, prefix=prefix)
    return _building(Change("more_specific_route"), build)


# --- 3. an off-subnet peer on the signaling network ----------------------------------

def off_subnet_peer(state: LabState, server: str = "telco/upf-a", client: str = "telco/smf-d",
                    address: str = "10.99.0.1", client_rp_filter: int = 1, server_rp_filter: int = 0) -> Change:
    """The client holds `address` (not on any lab subnet) and reaches the server's
    net1 directly over the macvlan network. The server has no route for it but
    its default via eth0, so its reply goes eth0 → node → the client's eth0,
    where the client's reverse path for the server's net1 address is net1.
    The node and the signaling peer know where `address` lives (as routers of
    a real network would): the node via the client's eth0, the peer via the
    client's net1 (used once the server routes net1's source by net1)."""
    s_ns, c_ns = pod_ns(state, server), pod_ns(state, client)
    server_ip = pod_ip(state, server, "net1")

    def build(c: Change) -> None:
        c.ip(c_ns, "addr", "add", f"{address}/32", "dev", "lo", undo=("addr", "del", f"{address}/32", "dev", "lo"))
        # a permanent neighbour: the server must not need to ARP-validate an off-subnet sender
        c.ip(c_ns, "neigh", "replace", server_ip, "lladdr", state.macs[server]["net1"], "dev", "net1",
             "nud", "permanent", undo=("neigh", "del", server_ip, "dev", "net1"))
        for ns, key, value in ((c_ns, "net.ipv4.conf.all.rp_filter", client_rp_filter),
                               (c_ns, "net.ipv4.conf.eth0.rp_filter", 0),
                               (c_ns, "net.ipv4.conf.net1.rp_filter", 0),
                               (s_ns, "net.ipv4.conf.all.rp_filter", server_rp_filter),
                               (s_ns, "net.ipv4.conf.net1.rp_filter", 0),
                               (s_ns, "net.ipv4.conf.eth0.rp_filter", 0)):
            c.sysctl(ns, key, str(value))
        # routers: no ICMP redirects (the server would learn a host route and we test routing tables)
        for ns in (state.node_ns, state.peer_ns):
            c.sysctl(ns, "net.ipv4.conf.all.send_redirects", "0")
        c.sysctl(state.node_ns, "net.ipv4.conf.br0.send_redirects", "0")
        c.sysctl(state.peer_ns, "net.ipv4.conf.sigpeer.send_redirects", "0")
        c.sysctl(state.peer_ns, "net.ipv4.ip_forward", "1")
        c.ip(state.node_ns, "route", "add", f"{address}/32", "via", pod_ip(state, client, "eth0"), "dev", "br0",
             undo=("route", "del", f"{address}/32"))
        c.ip(state.peer_ns, "route", "add", f"{address}/32", "via", pod_ip(state, client, "net1"),
             "dev", "sigpeer", undo=("route", "del", f"{address}/32"))
        c.info.update(server=server, client=client, address=address, server_ip=server_ip,
                      server_ns=s_ns, client_ns=c_ns)
    return _building(Change("off_subnet_peer"), build)


# --- 4. overlapping subnets -----------------------------------------------------------

def overlapping_subnet(state: LabState, pod: str = "telco/upf-b", ifname: str = "net2",
                       address: str = "10.71.200.11", prefixlen: int = 24) -> Change:
    """A second address on `ifname` inside net1's subnet, in the kernel and in
    `state.addresses` (so a rewritten pods file annotates it, as Multus would
    for an IPAM range that overlaps another network's)."""
    def build(c: Change) -> None:
        c.ip(pod_ns(state, pod), "addr", "add", f"{address}/{prefixlen}", "dev", ifname,
             undo=("addr", "del", f"{address}/{prefixlen}", "dev", ifname))
        state.addresses[pod][ifname].append(address)
        c.undo.append(lambda: state.addresses[pod][ifname].remove(address))
        c.info.update(pod=pod, interface=ifname, address=address)
    return _building(Change("overlapping_subnet"), build)


# --- 5. the fix -------------------------------------------------------------------------

def policy_routing_fix(state: LabState, pod: str = "telco/upf-a", ifname: str = "net1", table: int = 102,
                       via: str = SIGNALING_GATEWAY) -> Change:
    """Traffic from the interface's address is routed by a table of its own:
    its subnet and a default route via that network's gateway."""
    ns = pod_ns(state, pod)
    src = pod_ip(state, pod, ifname)

    def build(c: Change) -> None:
        c.ip(ns, "rule", "add", "from", src, "table", str(table), "priority", "1000",
             undo=("rule", "del", "from", src, "table", str(table), "priority", "1000"))
        c.ip(ns, "route", "add", lab_subnet(src), "dev", ifname, "table", str(table),
             undo=("route", "flush", "table", str(table)))
        c.ip(ns, "route", "add", "default", "via", via, "dev", ifname, "table", str(table))
        c.info.update(pod=pod, interface=ifname, table=table, source=src)
    return _building(Change("policy_routing_fix"), build)


# --- 6./7. a routed plane, and its gateway gone silent --------------------------------

SIGNALING_SERVICES = "10.99.0.0/16"     # only the lab's peer namespace is on that path


def signaling_pods(state: LabState) -> list[str]:
    return [pod for pod, spec in zip(state.pod_ns, state.specs)
            if ("net1", "signaling") in [tuple(i) for i in spec["interfaces"]]]


def signaling_via_peer(state: LabState, prefix: str = SIGNALING_SERVICES) -> Change:
    def build(c: Change) -> None:
        for pod in signaling_pods(state):
            c.ip(pod_ns(state, pod), "route", "add", prefix, "via", SIGNALING_GATEWAY, "dev", "net1",
                 undo=("route", "del", prefix, "via", SIGNALING_GATEWAY, "dev", "net1"))
        c.info.update(prefix=prefix, gateway=SIGNALING_GATEWAY, pods=signaling_pods(state))
    return _building(Change("signaling_via_peer"), build)


def gateway_blackhole(state: LabState) -> Change:
    """The signaling peer keeps its link and address but answers no ARP request:
    a dead router behind a live switch port, as a pod sees it."""
    def build(c: Change) -> None:
        c.ip(state.peer_ns, "link", "set", "sigpeer", "arp", "off", undo=("link", "set", "sigpeer", "arp", "on"))
        c.info.update(gateway=SIGNALING_GATEWAY, plane="signaling")
    return _building(Change("gateway_blackhole"), build)


def send_once(pod_netns: str, destination: str, port: int = 40998) -> None:
    """One datagram from the pod: what any client retry does, and what makes the pod's
    kernel resolve the gateway (an entry only goes failed when something is sent)."""
    with in_netns(f"/run/netns/{pod_netns}"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        try:
            sock.sendto(b"hello", (destination, port))
        except OSError:         # EHOSTUNREACH from an entry already failed: the point
            pass


# --- traffic -----------------------------------------------------------------------------

def udp_request_reply(client_ns: str, client_ip: str, server_ns: str, server_ip: str, count: int = 20,
                      port: int = 40100, timeout: float = 0.5) -> tuple[int, int]:
    """`count` requests from client_ip to server_ip:port, each answered by the
    server with `sendto` (the kernel picks the reply's route). Returns
    (requests the server got, replies the client got)."""
    with in_netns(f"/run/netns/{server_ns}"):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with in_netns(f"/run/netns/{client_ns}"):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        server.bind((server_ip, port))
        client.bind((client_ip, 0))
        server.settimeout(timeout)
        client.settimeout(timeout)
        served = answered = 0
        for i in range(count):
            client.sendto(b"req%d" % i, (server_ip, port))
            try:
                data, peer = server.recvfrom(2048)
            except socket.timeout:
                continue
            served += 1
            server.sendto(b"rep" + data[3:], peer)
            try:
                client.recv(2048)
                answered += 1
            except socket.timeout:
                pass
        return served, answered
    finally:
        server.close()
        client.close()
