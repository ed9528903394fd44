"""Knowing when to read a pod netns again: one socket per netns subscribed to the
rtnetlink notifications that can change what planewatch reads there, and one
epoll over all of them.

Three readers keep results per netns between scrapes: the link and address
tables (collector/netns_pool.py), the gateways' next hops
(collector/sources/neighbours.py) and the routing analysis
(collector/sources/routes.py). Each used to hold a socket per netns and try a
non-blocking recv on it every scrape: at 250 pods, 750 sockets and 750 failing
recvs a scrape (6 % of its CPU). Now a netns has one socket whose `generation`
goes up whenever notifications arrived; a reader keeps the generation it read
at, and one epoll_wait a scrape finds the few sockets with something pending.
"""
from __future__ import annotations

import select
import socket

from kernel.nsenter import in_netns
from kernel.rtnl import drain, new_socket

# RTNLGRP_* numbers (bit n-1 of the bind mask): link, IPv4 addresses, IPv4 routes,
# IPv4 rules, IPv6 addresses, IPv6 routes, IPv6 rules, IPv4 and IPv6 netconf (an
# rp_filter or forwarding change is announced there). Not neighbours: they change
# all the time and are read at every scrape anyway.
GROUPS = (1, 5, 7, 8, 9, 11, 19, 24, 25)
MASK = sum(1 << (g - 1) for g in GROUPS)
# A pod flapping routes overflows this; the overflow (ENOBUFS) counts as a change.
RCVBUF = 1 << 16


class NetnsEvents:
    """The notification socket of one netns and how many times something arrived."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.generation = 0

    @classmethod
    def open(cls, netns: str | int) -> "NetnsEvents":
        with in_netns(netns):
            return cls(new_socket(MASK, nonblocking=True, rcvbuf=RCVBUF))

    @classmethod
    def quiet(cls) -> "NetnsEvents":
        """Subscribed to nothing, so never a change (tests/replay.py: no kernel to watch)."""
        return cls(new_socket(0, nonblocking=True, rcvbuf=None))

    def fileno(self) -> int:
        return self._sock.fileno()

    def update(self) -> int:
        """Read what is pending; the generation after it. A reader calls this just
        before it reads the netns, so what it reads covers what was drained."""
        if drain(self._sock):
            self.generation += 1
        return self.generation

    def close(self) -> None:
        self._sock.close()


class ChangeWatch:
    """What one reader last read of each netns: whether the kernel announced a
    change there since. `ns` is a collector/netns_pool.Namespace (inode, events)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[NetnsEvents, int]] = {}     # netns inode -> (its events, generation)

    def changed(self, ns) -> bool:
        """True when something changed since the last call that said so, or the
        netns is new to this reader (or was reopened under the same inode); the
        pending notifications are drained first, so what the reader reads next
        covers them."""
        seen = self._seen.get(ns.inode)
        if seen is not None and seen[0] is ns.events and seen[1] == ns.events.generation:
            return False
        self._seen[ns.inode] = (ns.events, ns.events.update())
        return True

    def forget(self, inode: int) -> None:
        """The next `changed` for this netns says True (its read failed)."""
        self._seen.pop(inode, None)

    def keep_only(self, inodes: set[int]) -> None:
        for inode in [i for i in self._seen if i not in inodes]:
            del self._seen[inode]


class EventPoller:
    """One epoll over many NetnsEvents: `poll()` updates those with something pending."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._by_fd: dict[int, NetnsEvents] = {}

    def add(self, events: NetnsEvents) -> None:
        fd = events.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._by_fd[fd] = events

    def remove(self, events: NetnsEvents) -> None:
        """Before the socket is closed (its fd number may be reused at once)."""
        fd = events.fileno()
        if self._by_fd.get(fd) is events:
            del self._by_fd[fd]
            self._epoll.unregister(fd)

    def poll(self) -> None:
        """Level-triggered: a socket is reported while anything is unread, an
        overflow too (EPOLLERR), and what arrives after this is found next time."""
        if not self._by_fd:
            return
        for fd, _ in self._epoll.poll(0, len(self._by_fd)):
            events = self._by_fd.get(fd)
            if events is not None:
                events.update()

    def __len__(self) -> int:
        return len(self._by_fd)

    def close(self) -> None:
        self._epoll.close()
        self._by_fd.clear()
