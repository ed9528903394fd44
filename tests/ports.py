"""A free TCP port on 127.0.0.1, for the servers tests and benches start. (The
port is free when asked; a server started right after takes it.)

Outside the kernel's ephemeral range (net.ipv4.ip_local_port_range): a port
from that range can be taken, between the asking and the server's bind, as
the source port of any outgoing connection on the machine. It happened: the
real node's kube-apiserver connected to etcd first and then could not bind
its own port ("address already in use"). Below the range when there is room
there, else above it; the old way (port 0, from the range itself) only on a
machine with room on neither side.

A port is handed out once per process: two servers asked for ports before
either binds (etcd's two and kube-apiserver's) must not get the same one.
What this cannot prevent (another program on the machine binding the port in
between) the servers that fail on it start again on other ports
(tests/kubeapi.py).
"""
from __future__ import annotations

import random
import socket

LOW = 20000         # above the well-known and most registered servers
ROOM = 1000         # a side of the ephemeral range with fewer ports is not used

_given: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first, last = (int(v) for v in f.read().split()[:2])
        return first, last
    except (OSError, ValueError):
        return 32768, 60999


def pool() -> range:
    """The ports free_port chooses from: under the ephemeral range if there is room
    from LOW up to it, else over it, else under it down to 1024; empty if none."""
    first, last = ephemeral_range()
    for span in (range(LOW, first), range(last + 1, 65536), range(1024, min(first, LOW))):
        if len(span) >= ROOM:
            return span
    return range(0)


def free_port() -> int:
    span = pool()
    for _ in range(200):
        port = random.choice(span) if span else 0
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 in 200 tries ({span})")
