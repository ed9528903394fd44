"""clsact + cls_bpf over raw rtnetlink: the fallback for kernels without TCX (< 6.6).

Unlike TCX links these filters outlive the process (even SIGKILL), so the
loader removes them explicitly on detach and close. Every call expects the
calling thread to be inside the target netns already (the socket binds to the
netns it is created in). Messages are built here rather than through
pyroute2 because only five fixed requests are needed; framing, attributes and
the socket are kernel/rtnl.py's, the one netlink codec.
"""
from __future__ import annotations

import errno
import socket
import struct

from kernel.rtnl import RtnlSocket, attrs, new_socket, pack_attr

RTM_NEWQDISC, RTM_DELQDISC = 36, 37
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
NLA_F_NESTED = 0x8000

TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 6, 7, 8
TCA_BPF_FLAG_ACT_DIRECT = 1

TC_H_CLSACT = 0xFFFFFFF1
CLSACT_HANDLE = 0xFFFF0000
PARENT_INGRESS = 0xFFFFFFF2
PARENT_EGRESS = 0xFFFFFFF3
ETH_P_ALL = 0x0003
# Our filters' priority: fixed so detach can delete exactly ours, high so
# filters others installed with small priorities keep running first.
FILTER_PRIO = 0xC0DE
FILTER_NAME = "planewatch"

_TCMSG = struct.Struct("=BBHiIII")


_attr = pack_attr


def _tcmsg(ifindex: int, handle: int, parent: int, info: int) -> bytes:
    return _TCMSG.pack(socket.AF_UNSPEC, 0, 0, ifindex, handle, parent, info)


def filter_info(prio: int = FILTER_PRIO) -> int:
    return (prio << 16) | socket.htons(ETH_P_ALL)


def clsact_message(ifindex: int) -> bytes:
    return _tcmsg(ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0) + _attr(TCA_KIND, b"clsact\0")


def bpf_filter_message(ifindex: int, parent: int, prog_fd: int) -> bytes:
    options = (_attr(TCA_BPF_FD, struct.pack("=I", prog_fd))
               + _attr(TCA_BPF_NAME, FILTER_NAME.encode() + b"\0")
               + _attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT)))
    return (_tcmsg(ifindex, 0, parent, filter_info())
            + _attr(TCA_KIND, b"bpf\0") + _attr(TCA_OPTIONS | NLA_F_NESTED, options))


class TcSocket(RtnlSocket):
    """One rtnetlink socket, opened in the calling thread's netns."""

    def __init__(self):
        super().__init__(new_socket(rcvbuf=None))


def add_clsact(tc: TcSocket, ifindex: int) -> bool:
    """Create the clsact qdisc; False when one was already there (not ours to remove)."""
    try:
        tc.request(RTM_NEWQDISC, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, clsact_message(ifindex))
    except FileExistsError:
        return False
    return True


def add_bpf_filter(tc: TcSocket, ifindex: int, parent: int, prog_fd: int) -> None:
    tc.request(RTM_NEWTFILTER, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
               bpf_filter_message(ifindex, parent, prog_fd))


def delete_bpf_filter(tc: TcSocket, ifindex: int, parent: int) -> None:
    body = _tcmsg(ifindex, 0, parent, filter_info()) + _attr(TCA_KIND, b"bpf\0")
    try:
        tc.request(RTM_DELTFILTER, NLM_F_ACK, body)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            raise


def count_filters(tc: TcSocket, ifindex: int, parent: int) -> int:
    return len(tc.request(RTM_GETTFILTER, NLM_F_DUMP, _tcmsg(ifindex, 0, parent, 0)))


def _attrs(buf: bytes, start: int) -> dict[int, bytes]:
    return {kind: buf[vs:ve] for kind, vs, ve in attrs(buf, start, len(buf))}


def is_ours(payload: bytes) -> bool:
    """A filter message for one of our cls_bpf filters: our priority, kind bpf
    and the name we give (TCA_BPF_NAME "planewatch")."""
    if len(payload) < _TCMSG.size:
        return False
    info = _TCMSG.unpack_from(payload, 0)[6]
    attrs = _attrs(payload, _TCMSG.size)
    if info >> 16 != FILTER_PRIO or attrs.get(TCA_KIND, b"").rstrip(b"\0") != b"bpf":
        return False
    options = _attrs(attrs.get(TCA_OPTIONS, b""), 0)
    return options.get(TCA_BPF_NAME, b"").rstrip(b"\0") == FILTER_NAME.encode()


def remove_stale(ifindex: int) -> int:
    """Remove cls_bpf filters a previous planewatch left on `ifindex` (clsact
    filters outlive a SIGKILLed process); returns how many hooks (ingress,
    egress) had one. Call before attaching: any filter of ours there is stale."""
    removed = 0
    with TcSocket() as tc:
        for parent in (PARENT_INGRESS, PARENT_EGRESS):
            try:
                found = tc.request(RTM_GETTFILTER, NLM_F_DUMP, _tcmsg(ifindex, 0, parent, 0))
            except OSError as err:
                if err.errno in (errno.EINVAL, errno.ENOENT, errno.ENODEV):    # no clsact qdisc
                    continue
                raise
            if any(is_ours(p) for p in found):
                delete_bpf_filter(tc, ifindex, parent)
                removed += 1
    return removed


def delete_clsact(tc: TcSocket, ifindex: int) -> None:
    try:
        tc.request(RTM_DELQDISC, NLM_F_ACK, clsact_message(ifindex))
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            raise


def attach(ifindex: int, ingress_fd: int, egress_fd: int) -> bool:
    """Attach both programs; returns whether the clsact qdisc was created here."""
    with TcSocket() as tc:
        created = add_clsact(tc, ifindex)
        try:
            add_bpf_filter(tc, ifindex, PARENT_INGRESS, ingress_fd)
            add_bpf_filter(tc, ifindex, PARENT_EGRESS, egress_fd)
        except OSError:
            _remove(tc, ifindex, created)
            raise
        return created


def detach(ifindex: int, created_clsact: bool) -> None:
    """Remove our filters, and the qdisc when we created it and nothing else uses it."""
    with TcSocket() as tc:
        _remove(tc, ifindex, created_clsact)


def _remove(tc: TcSocket, ifindex: int, created_clsact: bool) -> None:
    delete_bpf_filter(tc, ifindex, PARENT_INGRESS)
    delete_bpf_filter(tc, ifindex, PARENT_EGRESS)
    if created_clsact and not (count_filters(tc, ifindex, PARENT_INGRESS)
                               or count_filters(tc, ifindex, PARENT_EGRESS)):
        delete_clsact(tc, ifindex)
