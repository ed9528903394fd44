"""A free TCP port on 127.0.0.1, for the servers tests and benches start. (The
port is free when asked; a server started right after takes it.)

Below the kernel's ephemeral range (net.ipv4.ip_local_port_range): a port
from that range can be taken, between the asking and the server's bind, as
the source port of any outgoing connection on the machine. It happened: the
real node's kube-apiserver connected to etcd first and then could not bind
its own port ("address already in use").
"""
from __future__ import annotations

import random
import socket

LOW = 20000         # under the ephemeral range; above the well-known and most registered servers


def ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    high = ephemeral_start()
    if high - LOW >= 1000:
        for _ in range(200):
            port = random.randrange(LOW, high)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:          # a machine whose ephemeral range starts low: the old way
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
