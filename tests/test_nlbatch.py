"""kernel/nlbatch.c: the C batch of RTM_GETSTATS dumps, against the Python path
(RtnlSocket.stats64) on real namespaces, and against replies written here on a
socket pair, framing faults and all (a tenant cannot write netlink replies, but
the decoder must not trust a length it did not check)."""
from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import threading

import pytest

from kernel import nlbatch
from kernel.rtnl import RtnlSocket
from lab.traffic import udp_exchange
from tests.conftest import unique_prefix

NLMSG_ERROR, NLMSG_DONE, RTM_NEWSTATS, RTM_GETSTATS = 2, 3, 92, 94


def test_library_is_built():
    """`make test` builds it (the Makefile's deps): a collector that silently ran
    the Python path would pass every other test here."""
    assert nlbatch.available(), nlbatch._lib_state


@pytest.fixture
def namespaces(root):
    p = unique_prefix("pwnb")
    names = [f"{p}-{i}" for i in range(3)]
    try:
        for ns in names:
            subprocess.run(["ip", "netns", "add", ns], check=True)
        a, b, c = names
        for cmd in (["ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b],
                    ["ip", "-n", a, "addr", "add", "10.253.0.1/24", "dev", "eth0"],
                    ["ip", "-n", b, "addr", "add", "10.253.0.2/24", "dev", "eth0"],
                    ["ip", "-n", a, "link", "set", "eth0", "up"], ["ip", "-n", b, "link", "set", "eth0", "up"],
                    ["ip", "-n", a, "link", "add", "net1", "type", "veth", "peer", "name", "net1p"]):
            subprocess.run(cmd, check=True)
        for i in range(20):         # more links than a cap of 16 holds
            subprocess.run(["ip", "-n", c, "link", "add", f"d{i}", "type", "veth", "peer", "name", f"p{i}"],
                           check=True)
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_same_counters_as_the_python_path(namespaces):
    a, b, c = namespaces
    assert udp_exchange(b, a, "10.253.0.1", count=25, size=400) == 25
    socks = [RtnlSocket.open(f"/run/netns/{ns}") for ns in namespaces]
    try:
        python = [s.stats64() for s in socks]
        batch = nlbatch.stats64_dumps(socks, [64, 64, 64])
        python_again = [s.stats64() for s in socks]
        # and each socket still answers the Python path after the C one used it
        assert [set(s.stats64()) for s in socks] == [set(x) for x in python]
    finally:
        for s in socks:
            s.close()
    assert [len(x) for x in batch] == [4, 2, 41]      # lo, eth0 (+ net1, net1p); c: lo, 20 veth pairs
    for before, got, after in zip(python, batch, python_again):
        assert set(got) == set(before)
        for ifindex, counters in got.items():
            assert len(counters) == 8
            assert all(lo <= x <= hi for lo, x, hi in zip(before[ifindex], counters, after[ifindex])), ifindex
    eth0 = max(batch[0].values(), key=lambda counters: counters[0])
    assert eth0[0] >= 25 and eth0[2] >= 25 * 400     # rx packets, rx bytes of the datagrams received


def test_more_links_than_the_cap_is_none_and_the_socket_stays_usable(namespaces):
    socks = [RtnlSocket.open(f"/run/netns/{ns}") for ns in namespaces]
    try:
        got = nlbatch.stats64_dumps(socks, [8, 8, 16])
        assert got[2] is None and len(got[0]) == 4 and len(got[1]) == 2
        assert len(socks[2].stats64()) == 41        # the dump was read to its end
    finally:
        for s in socks:
            s.close()


def test_a_failing_socket_is_its_own_error(namespaces):
    good = RtnlSocket.open(f"/run/netns/{namespaces[1]}")
    closed = RtnlSocket.open(f"/run/netns/{namespaces[0]}")
    closed.close()
    try:
        got = nlbatch.stats64_dumps([closed, good], [8, 8])
    finally:
        good.close()
    assert isinstance(got[0], OSError) and got[0].errno == errno.EBADF
    assert isinstance(got[1], dict) and len(got[1]) == 2


# ---- replies written by hand on a socket pair: the C side sends its request
# into one end and reads whatever was queued for it there

def _msg(mtype: int, seq: int, payload: bytes, flags: int = 2) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(payload), mtype, flags, seq, 0) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _stats(ifindex: int, counters=None, attr_type: int = 1, extra: bytes = b"") -> bytes:
    body = struct.pack("=BBHII", 0, 0, 0, ifindex, 1)
    if counters is not None:
        value = struct.pack("=8Q", *counters) + bytes(8 * 16)
        body += struct.pack("=HH", 4 + len(value), attr_type) + value
    return body + extra


class Pair:
    """An RtnlSocket-shaped end of a datagram socket pair, and the other end."""

    def __init__(self):
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.rtnl = RtnlSocket(self.ours)

    def queue(self, *datagrams: bytes) -> None:
        for d in datagrams:
            self.kernel.send(d)

    def request(self) -> bytes:
        return self.kernel.recv(4096)

    def close(self):
        self.ours.close()
        self.kernel.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def _next_seq(rtnl: RtnlSocket) -> int:
    return (rtnl._seq + 1) & 0xFFFFFFFF


def _c_and_python(pair: Pair, datagrams: list[bytes], cap: int = 64):
    """The C batch's answer, then the Python path's for the same replies."""
    seq = _next_seq(pair.rtnl)
    pair.queue(*[d.replace(b"SEQ!", struct.pack("=I", seq)) for d in datagrams])
    c = nlbatch.stats64_dumps([pair.rtnl], [cap])[0]
    request = pair.request()
    length, mtype, flags, rseq, _ = struct.unpack_from("=IHHII", request)
    assert (length, mtype, flags & 0x301, rseq) == (len(request), RTM_GETSTATS, 0x301, seq)
    seq = _next_seq(pair.rtnl)
    pair.queue(*[d.replace(b"SEQ!", struct.pack("=I", seq)) for d in datagrams])
    try:
        py: object = pair.rtnl.stats64()
    except OSError as err:
        py = err
    pair.request()
    return c, py


def _with_seq(mtype: int, payload: bytes, flags: int = 2) -> bytes:
    """A message whose sequence number is filled in when queued (b"SEQ!")."""
    return _msg(mtype, 0x21514553, payload, flags).replace(struct.pack("=I", 0x21514553), b"SEQ!", 1)


def test_decoding_matches_the_python_path(pair):
    rows = {3: tuple(range(1, 9)), 7: (2**64 - 1, 0, 5, 6, 7, 8, 9, 10)}
    part1 = _with_seq(RTM_NEWSTATS, _stats(3, rows[3])) + _msg(RTM_NEWSTATS, 999, _stats(5, [1] * 8))
    part2 = (_with_seq(RTM_NEWSTATS, _stats(7, rows[7], attr_type=1 | 0x8000))      # NLA_F_NESTED set
             + _with_seq(RTM_NEWSTATS, _stats(9))                                   # no stats64: zeros
             + _with_seq(NLMSG_DONE, struct.pack("=i", 0)))
    c, py = _c_and_python(pair, [part1, part2])
    assert c == py == {3: rows[3], 7: rows[7], 9: (0,) * 8}   # ifindex 5 had another sequence number


def test_a_stats_attribute_past_its_message_is_not_read(pair):
    # claims 4 + 64 + 128 bytes where the message holds 20: zeros, not memory past it
    lying = struct.pack("=BBHII", 0, 0, 0, 4, 1) + struct.pack("=HH", 196, 1) + bytes(16)
    short = struct.pack("=BBHII", 0, 0, 0, 6, 1) + struct.pack("=HH", 12, 1) + bytes(8)
    c, py = _c_and_python(pair, [_with_seq(RTM_NEWSTATS, lying) + _with_seq(RTM_NEWSTATS, short)
                                 + _with_seq(NLMSG_DONE, struct.pack("=i", 0))])
    assert c == py == {4: (0,) * 8, 6: (0,) * 8}


def test_a_header_longer_than_its_datagram_is_ebadmsg(pair):
    bad = struct.pack("=IHHII", 4000, RTM_NEWSTATS, 2, _next_seq(pair.rtnl), 0) + _stats(1, [1] * 8)
    pair.queue(bad)
    got = nlbatch.stats64_dumps([pair.rtnl], [8])[0]
    assert isinstance(got, OSError) and got.errno == errno.EBADMSG


def test_an_error_reply_is_its_errno_and_eintr_starts_the_dump_over(pair):
    seq = _next_seq(pair.rtnl)
    pair.queue(_msg(NLMSG_ERROR, seq, struct.pack("=i", -errno.EINTR) + bytes(16)),
               _msg(RTM_NEWSTATS, seq + 1, _stats(2, [4] * 8)) + _msg(NLMSG_DONE, seq + 1, struct.pack("=i", 0)))
    assert nlbatch.stats64_dumps([pair.rtnl], [8]) == [{2: (4,) * 8}]
    assert pair.request() and pair.request()                # asked twice
    seq = _next_seq(pair.rtnl)
    pair.queue(_msg(NLMSG_ERROR, seq, struct.pack("=i", -errno.EPERM) + bytes(16)))
    got = nlbatch.stats64_dumps([pair.rtnl], [8])[0]
    assert isinstance(got, OSError) and got.errno == errno.EPERM
    # the next Python request does not take a sequence number the batch used
    assert _next_seq(pair.rtnl) == seq + nlbatch.DUMP_TRIES


def test_python_path_when_the_library_is_missing(pair, monkeypatch):
    monkeypatch.setattr(nlbatch, "_lib", None)
    monkeypatch.setattr(nlbatch, "_lib_state", "not loaded: test")
    seq = _next_seq(pair.rtnl)
    pair.queue(_msg(RTM_NEWSTATS, seq, _stats(3, [7] * 8)) + _msg(NLMSG_DONE, seq, struct.pack("=i", 0)))
    assert nlbatch.stats64_dumps([pair.rtnl], [1]) == [{3: (7,) * 8}]
    seq = _next_seq(pair.rtnl)
    pair.queue(_msg(RTM_NEWSTATS, seq, _stats(3, [7] * 8)) + _msg(RTM_NEWSTATS, seq, _stats(4, [7] * 8))
               + _msg(NLMSG_DONE, seq, struct.pack("=i", 0)))
    assert nlbatch.stats64_dumps([pair.rtnl], [1]) == [None]     # over the cap, as the C path says


def test_no_library_env_means_the_python_path(monkeypatch):
    monkeypatch.setattr(nlbatch, "_lib", None)
    monkeypatch.setattr(nlbatch, "_lib_state", "")
    monkeypatch.setenv("PLANEWATCH_NO_NLBATCH", "1")
    assert not nlbatch.available()
    assert "PLANEWATCH_NO_NLBATCH" in nlbatch._lib_state


def test_library_path_is_inside_the_package():
    assert os.path.dirname(os.path.dirname(nlbatch.LIBRARY)) == os.path.dirname(nlbatch.__file__)


def test_netlink_source_reads_the_same_with_the_batch_started_early(namespaces):
    """What the scraper does (prefetch(), other sources, collect()) against the
    source alone and the Python path, on the same namespaces: the same series,
    each value within the Python path's reads before and after. Namespace c
    holds more links than a dump is asked for: its counters come per interface."""
    from collector.model import Attachment, InterfaceView, Link, Pod, PodView
    from collector.netns_pool import NetnsPool
    from collector.registry import Config, Snapshot
    from collector.sources.netlink import NetlinkSource
    from exporters.exposition import render
    from tests.conftest import parse_metrics

    a, b, c = namespaces
    pool = NetnsPool()
    try:
        views = []
        for ns_name, ifnames in ((a, ("eth0", "net1")), (b, ("eth0",)), (c, ("d3",))):
            ns = pool.open(f"/run/netns/{ns_name}")
            ns.refresh(0.0)
            atts = tuple(Attachment("t", ns_name, f"uid-{ns_name}", f"t/{n}", n, plane="data") for n in ifnames)
            by_name = {l.name: l for l in ns.links}
            views.append(PodView(Pod("t", ns_name, f"uid-{ns_name}", attachments=atts), netns_path=ns.path,
                                 netns_inode=ns.inode, interfaces=tuple(
                                     InterfaceView(att, Link(by_name[att.interface].ifindex, att.interface))
                                     for att in atts)))
        assert [pool.get(v.netns_inode).dump_cap({i.link.ifindex for i in v.interfaces}) > 0 for v in views] \
            == [True, True, False]
        snapshot = Snapshot(tuple(views), netns=pool)

        def read(native: bool, early: bool) -> dict:
            source = NetlinkSource(Config())
            source.native = native
            try:
                if early:
                    source.prefetch(snapshot)
                    assert source._started.started_for is snapshot
                return parse_metrics(render(source.collect(snapshot)).decode())
            finally:
                source.close()

        assert udp_exchange(b, a, "10.253.0.1", count=10, size=200) == 10
        before = read(False, False)
        early, late = read(True, True), read(True, False)
        # a namespace whose batch socket cannot be opened (no fd left): that pod
        # read the Python way, the others still in the batch
        ns_b = pool.get(views[1].netns_inode)
        assert ns_b.batch_rtnl is not None
        ns_b.batch_rtnl.close()
        ns_b.batch_rtnl = None

        def no_fd():
            raise OSError(24, "Too many open files")
        ns_b.batch_socket = no_fd
        without_b = read(True, True)
        del ns_b.batch_socket
        after = read(False, False)
    finally:
        pool.keep_only(set())
    assert len(before) == 4 * 11 and set(early) == set(late) == set(without_b) == set(before) == set(after)
    for key in before:
        assert before[key] <= early[key] <= late[key] <= without_b[key] <= after[key], key
    rx = [v for (name, labels), v in early.items()
          if name == "planewatch_interface_receive_packets_total" and ("pod", a) in labels
          and ("interface", "eth0") in labels]
    assert rx and rx[0] >= 10


# ---- Requests (gets) on a socket pair

RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30


def test_gets_answers_in_order_across_datagrams_and_a_sequence_wrap(pair):
    pair.rtnl._seq = 0xFFFFFFFE             # the three requests are numbered ffffffff, 0, 1
    gets = nlbatch.Requests([(pair.rtnl, RTM_GETNEIGH, [b"a" * 12, b"b" * 12, b"c" * 12])])
    first = gets.first[0]
    assert first == 0xFFFFFFFF
    pair.queue(_msg(RTM_NEWNEIGH, first, b"one!" * 3, flags=0) + _msg(RTM_NEWNEIGH, 77, b"other"),
               _msg(NLMSG_ERROR, 0, struct.pack("=i", -errno.ENOENT) + bytes(16)),
               _msg(RTM_NEWNEIGH, 1, b"three" * 2, flags=0))
    gets.run(RTM_NEWNEIGH)
    got = [(i, buf[s:e]) for i, buf, s, e in gets.answers(0, RTM_NEWNEIGH)]
    assert got == [(0, b"one!" * 3), (2, b"three" * 2)]
    sent = pair.request()
    assert [struct.unpack_from("=I", sent, off + 8)[0] for off in (0, 28, 56)] == [0xFFFFFFFF, 0, 1]


def test_gets_with_no_room_are_asked_again(pair, monkeypatch):
    monkeypatch.setattr(nlbatch.Requests, "ANSWER_ROOM", 0)
    gets = nlbatch.Requests([(pair.rtnl, RTM_GETNEIGH, [b"x" * 12])])
    gets.cap = 8                                    # less than one answer
    first = gets.first[0]
    pair.queue(_msg(RTM_NEWNEIGH, first, b"big answer" + bytes(40)))
    gets.run(RTM_NEWNEIGH)
    assert gets.result[0] == -errno.ENOSPC
    assert pair.request()                           # asked once, answer read (the socket stays usable)
    pair.queue(_msg(RTM_NEWNEIGH, first + 1, b"again"))
    threads = []
    requests = pair.rtnl._requests

    def on_which_thread(*args):
        threads.append(threading.current_thread().name)
        return requests(*args)
    monkeypatch.setattr(pair.rtnl, "_requests", on_which_thread)
    got = [(i, buf[s:e]) for i, buf, s, e in gets.answers(0, RTM_NEWNEIGH)]
    assert got == [(0, b"again")]
    assert len(threads) == 1 and threads[0].startswith("nlbatch")     # the batch sockets' one reader


def test_gets_with_a_lying_header_are_ebadmsg(pair):
    gets = nlbatch.Requests([(pair.rtnl, RTM_GETNEIGH, [b"x" * 12])])
    pair.queue(struct.pack("=IHHII", 500, RTM_NEWNEIGH, 0, gets.first[0], 0) + b"short")
    gets.run(RTM_NEWNEIGH)
    with pytest.raises(OSError) as err:
        list(gets.answers(0, RTM_NEWNEIGH))
    assert err.value.errno == errno.EBADMSG


def test_without_the_library_no_batch_socket_nor_thread(namespaces, monkeypatch):
    """The fallback is the old path: the scrape thread's own socket, no second
    socket per netns, nothing on the batch thread."""
    from collector.model import Attachment, InterfaceView, Link, Pod, PodView
    from collector.netns_pool import NetnsPool
    from collector.registry import Config, Snapshot
    from collector.sources.neighbours import NeighboursSource
    from collector.sources.netlink import NetlinkSource
    from exporters.exposition import render

    monkeypatch.setattr(nlbatch, "_lib", None)
    monkeypatch.setattr(nlbatch, "_lib_state", "not loaded: test")
    submitted = []
    monkeypatch.setattr(nlbatch, "submit", lambda *a: submitted.append(a))
    pool = NetnsPool()
    try:
        ns = pool.open(f"/run/netns/{namespaces[0]}")
        ns.refresh(0.0)
        eth0 = next(l for l in ns.links if l.name == "eth0")
        att = Attachment("t", "a", "uid-a", "t/eth0", "eth0", gateway=("10.253.0.2",), plane="data")
        view = PodView(Pod("t", "a", "uid-a", attachments=(att,)), netns_path=ns.path, netns_inode=ns.inode,
                       interfaces=(InterfaceView(att, Link(eth0.ifindex, "eth0")),))
        snapshot = Snapshot((view,), netns=pool)
        netlink, neighbours = NetlinkSource(Config()), NeighboursSource(Config())
        netlink.prefetch(snapshot)
        neighbours.prefetch(snapshot)
        text = render(netlink.collect(snapshot) + neighbours.collect(snapshot)).decode()
        assert ns.batch_rtnl is None and submitted == []
    finally:
        pool.keep_only(set())
    assert 'planewatch_interface_receive_packets_total{namespace="t",pod="a"' in text
    assert 'gateway="10.253.0.2",state="none"} 1' in text
