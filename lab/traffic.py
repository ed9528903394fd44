"""Traffic between lab namespaces, from Python: UDP datagrams sent from one
namespace to an address in another, where a socket receives them. Only lab
addresses are used; sockets are bound inside the namespaces through setns."""
from __future__ import annotations

import socket

from kernel.nsenter import in_netns


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def udp_exchange(src_netns: str, dst_netns: str, dst_ip: str, count: int = 10,
                 size: int = 100, port: int = 40000, timeout: float = 1.0) -> int:
    """Send `count` datagrams of `size` bytes; return how many arrived."""
    fam = _family(dst_ip)
    with in_netns(f"/run/netns/{dst_netns}"):
        rx = socket.socket(fam, socket.SOCK_DGRAM)
    with in_netns(f"/run/netns/{src_netns}"):
        tx = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        rx.bind((dst_ip, port))
        rx.settimeout(timeout)
        payload = b"p" * size
        for _ in range(count):
            tx.sendto(payload, (dst_ip, port))
        got = 0
        try:
            while got < count:
                rx.recv(65535)
                got += 1
        except socket.timeout:
            pass
        return got
    finally:
        rx.close()
        tx.close()


def udp_send(src_netns: str, dst_ip: str, count: int = 10, size: int = 100, port: int = 40001) -> None:
    """Fire datagrams at an address (nothing need listen: e.g. to provoke drops)."""
    with in_netns(f"/run/netns/{src_netns}"):
        tx = socket.socket(_family(dst_ip), socket.SOCK_DGRAM)
    try:
        for _ in range(count):
            try:
                tx.sendto(b"x" * size, (dst_ip, port))
            except OSError:        # an ICMP error from a previous datagram surfaces here
                pass
    finally:
        tx.close()
