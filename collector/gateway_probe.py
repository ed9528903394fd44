"""Active gateway probes: ARP (IPv4) or a neighbour solicitation (IPv6), from
inside a pod's netns, to that attachment's own gateways only.

Why ARP/NDP and not ICMP echo: a gateway that filters ping still has to answer
ARP/NDP to forward anything, and the answer is what the pod's kernel needs to
send at all. One request is one packet; there are no retries (a lost request is
a lost probe).

Off by default: collector/sources/neighbours.py starts the `Prober` only for the planes
named in --collector.neighbours.probe-planes. Every probe takes a token from
one per-node bucket (`TokenBucket`, packets per second), so the node's probe
rate is bounded whatever the number of pods. Probing runs on its own thread,
never in a scrape; a scrape only reads the counters.

Targets are validated by the caller (`neighbours.probe_targets`): a target is an
attachment's annotated gateway or a next hop of its routes, on-link for that
interface (inside one of its connected prefixes, or IPv6 link-local).
"""
from __future__ import annotations

import bisect
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from kernel.nsenter import in_netns

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
ARPOP_REQUEST, ARPOP_REPLY = 1, 2
ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT = 135, 136
ND_OPT_SOURCE_LINKADDR = 1
# Sub-millisecond LANs: 50 us .. 100 ms; a probe slower than the timeout is lost.
RTT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

_ARP = struct.Struct("!HHBBH6s4s6s4s")


@dataclass(frozen=True)
class Target:
    labels: tuple[str, ...]         # ATTACHMENT_LABELS values
    gateway: str
    netns_path: str
    netns_inode: int
    ifname: str
    ifindex: int
    mac: str                        # the pod interface's own MAC (ARP sender)
    source: str                     # the pod's address on the gateway's subnet

    @property
    def key(self) -> tuple:
        return self.labels + (self.gateway,)


# --- packets (pure) -----------------------------------------------------------------

def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    return _ARP.pack(1, 0x0800, 6, 4, ARPOP_REQUEST, _mac_bytes(src_mac), socket.inet_aton(src_ip),
                     b"\0" * 6, socket.inet_aton(target_ip))


def is_arp_reply(payload: bytes, src_ip: str, target_ip: str) -> bool:
    """An ARP reply from target_ip (to us, or a gratuitous one from it)."""
    if len(payload) < _ARP.size:
        return False
    htype, ptype, hlen, plen, op, _sha, spa, _tha, tpa = _ARP.unpack_from(payload)
    return (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, ARPOP_REPLY) \
        and spa == socket.inet_aton(target_ip) and tpa in (socket.inet_aton(src_ip), spa)


def solicited_node(address: str) -> str:
    """ff02::1:ffXX:XXXX, the multicast group a node listens on for `address` (RFC 4291)."""
    low = ipaddress.IPv6Address(address).packed[-3:]
    return str(ipaddress.IPv6Address(b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + low))


def neighbour_solicitation(target_ip: str, src_mac: str) -> bytes:
    """ICMPv6 NS with the source link-layer option; the kernel fills the checksum."""
    return (struct.pack("!BBHI", ND_NEIGHBOR_SOLICIT, 0, 0, 0)
            + socket.inet_pton(socket.AF_INET6, target_ip)
            + bytes((ND_OPT_SOURCE_LINKADDR, 1)) + _mac_bytes(src_mac))


def is_neighbour_advert(payload: bytes, target_ip: str) -> bool:
    return len(payload) >= 24 and payload[0] == ND_NEIGHBOR_ADVERT and payload[1] == 0 \
        and payload[8:24] == socket.inet_pton(socket.AF_INET6, target_ip)


# --- I/O: one probe ---------------------------------------------------------------------

def _open_in(target: Target, family: int, kind: int, proto: int) -> socket.socket:
    """A socket made inside the target's netns, after checking the path still names
    the netns the snapshot saw (a pinned name can be reused by another pod)."""
    fd = os.open(target.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino != target.netns_inode:
            raise FileNotFoundError(f"{target.netns_path} is another netns now")
        with in_netns(fd):
            return socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    finally:
        os.close(fd)


def _await(sock: socket.socket, deadline: float, match) -> float | None:
    """perf_counter() when a matching packet arrives, None at the deadline."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return None
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return None
        payload = sock.recv(2048)
        at = time.perf_counter()
        if match(payload):
            return at


def probe_arp(target: Target, timeout: float) -> float | None:
    """RTT in seconds of one ARP request to the gateway, None when unanswered."""
    sock = _open_in(target, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ARP))
    with sock:
        sock.bind((target.ifname, ETH_P_ARP))
        request = arp_request(target.mac, target.source, target.gateway)
        sent = time.perf_counter()
        sock.sendto(request, (target.ifname, ETH_P_ARP, 0, 0, b"\xff" * 6))
        got = _await(sock, sent + timeout, lambda p: is_arp_reply(p, target.source, target.gateway))
    return None if got is None else got - sent


def probe_ndp(target: Target, timeout: float) -> float | None:
    """RTT in seconds of one neighbour solicitation, None when unanswered."""
    sock = _open_in(target, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, target.ifname.encode())
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)   # RFC 4861: 255 or dropped
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, target.ifindex)
        request = neighbour_solicitation(target.gateway, target.mac)
        sent = time.perf_counter()
        sock.sendto(request, (solicited_node(target.gateway), 0, 0, target.ifindex))
        got = _await(sock, sent + timeout, lambda p: is_neighbour_advert(p, target.gateway))
    return None if got is None else got - sent


def probe_once(target: Target, timeout: float) -> float | None:
    return (probe_ndp if ":" in target.gateway else probe_arp)(target, timeout)


# --- rate bound and results -------------------------------------------------------------

class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self.tokens, self._at = burst, clock()

    def wait_time(self) -> float:
        """Take a token and return 0, or return how long until one is there."""
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class Results:
    """Per target: probes with a known outcome, unanswered ones, the RTT histogram."""

    probes: int = 0
    failures: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(RTT_BUCKETS))
    rtt_sum: float = 0.0
    last_ok: bool | None = None

    def record(self, rtt: float | None) -> None:
        self.probes += 1
        self.last_ok = rtt is not None
        if rtt is None:
            self.failures += 1
            return
        i = bisect.bisect_left(RTT_BUCKETS, rtt)
        if i < len(self.buckets):
            self.buckets[i] += 1
        self.rtt_sum += rtt

    def cumulative(self) -> list[int]:
        out, n = [], 0
        for b in self.buckets:
            n += b
            out.append(n)
        return out


class Prober:
    """A thread that probes each target every `interval` seconds, within the bucket."""

    def __init__(self, rate: float, interval: float, timeout: float = 1.0, probe=probe_once,
                 clock=time.monotonic):
        self.interval, self.timeout = interval, timeout
        self.bucket = TokenBucket(rate, max(1.0, rate), clock)
        self._probe, self._clock = probe, clock
        self._targets: dict[tuple, Target] = {}
        self._due: dict[tuple, float] = {}
        self.results: dict[tuple, Results] = {}
        self.delayed = 0            # probes that waited for a token: the bound at work
        self.denied = False         # no CAP_NET_RAW: warned once
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_targets(self, targets: list[Target]) -> None:
        with self._lock:
            self._targets = {t.key: t for t in targets}
            for key in [k for k in self.results if k not in self._targets]:
                del self.results[key]
            self._due = {k: self._due.get(k, 0.0) for k in self._targets}
        if targets and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gateway-probe", daemon=True)
            self._thread.start()
        self._wake.set()

    def snapshot(self) -> list[tuple[Target, Results]]:
        with self._lock:
            return [(self._targets[k], Results(r.probes, r.failures, list(r.buckets), r.rtt_sum, r.last_ok))
                    for k, r in self.results.items() if k in self._targets]

    def _next(self) -> tuple[Target | None, float]:
        """The most overdue target, or how long until one is due."""
        with self._lock:
            if not self._due:
                return None, 1.0
            key = min(self._due, key=lambda k: self._due[k])
            wait = self._due[key] - self._clock()
            if wait > 0:
                return None, wait
            self._due[key] = self._clock() + self.interval
            return self._targets[key], 0.0

    def step(self) -> float:
        """Probe at most one due target; seconds to sleep before the next step."""
        target, wait = self._next()
        if target is None:
            return wait
        token_wait = self.bucket.wait_time()
        while token_wait > 0:
            self.delayed += 1
            if self._stop.wait(token_wait):
                return 0.0
            token_wait = self.bucket.wait_time()
        try:
            rtt = self._probe(target, self.timeout)
        except PermissionError as err:      # AF_PACKET and raw ICMPv6 need CAP_NET_RAW
            if not self.denied:
                log.warning("gateway probes are off: %s (CAP_NET_RAW is needed)", err)
            self.denied = True
            return 0.0
        except OSError as err:      # the pod or its interface went away: no outcome
            log.debug("probe %s via %s: %s", target.gateway, target.ifname, err)
            return 0.0
        with self._lock:
            if target.key in self._targets:
                self.results.setdefault(target.key, Results()).record(rtt)
        return 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.step()
            except Exception:
                log.exception("gateway probe")
                wait = 1.0
            if wait > 0:
                self._wake.wait(min(wait, 1.0))
                self._wake.clear()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
