"""Root-free tables for the netlink and attachments sources (kernel replies built
here, byte by byte, from the uapi layouts), and the scrape wrapper's promise: a
source that raises costs its own series and `success`, never the scrape."""
from __future__ import annotations

import asyncio
import struct

import pytest
from aiohttp.test_utils import TestClient, TestServer

from collector.model import Attachment, InterfaceView, Link, Pod, PodView
from collector.registry import Config, Snapshot
from kernel.rtnl import LinkStats, RtnlSocket
from tests.conftest import parse_metrics, series
from tests.replay import Replay, ReplaySocket

RTM_NEWSTATS, RTM_GETSTATS, NLMSG_DONE = 92, 94, 3
NLM_F_MULTI = 0x2


def _nlmsg(kind: int, payload: bytes, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, NLM_F_MULTI, seq, 0) + payload


def stats_reply(rows: dict[int, tuple[int, ...]]) -> bytes:
    """RTM_NEWSTATS messages: struct if_stats_msg, then IFLA_STATS_LINK_64 holding
    struct rtnl_link_stats64, whose first eight u64 are (include/uapi/linux/if_link.h)
    rx_packets, tx_packets, rx_bytes, tx_bytes, rx_errors, tx_errors, rx_dropped, tx_dropped
    (the rest of the 24 or more fields here: zeros)."""
    out = b""
    for ifindex, first8 in rows.items():
        stats64 = struct.pack("=8Q", *first8) + bytes(8 * 16)
        attr = struct.pack("=HH", 4 + len(stats64), 1) + stats64
        out += _nlmsg(RTM_NEWSTATS, struct.pack("=BBHII", 0, 0, 0, ifindex, 1) + attr)
    return out + _nlmsg(NLMSG_DONE, struct.pack("=i", 0))


class Namespace:
    """What the netlink source reads of a kept namespace: the socket and the link table."""

    def __init__(self, inode: int, links: list[LinkStats], reply: bytes):
        import base64
        self.inode = inode
        self.by_index = {l.ifindex: l for l in links}
        self.rtnl = RtnlSocket(ReplaySocket({str(RTM_GETSTATS): [base64.b64encode(reply).decode()]}, "table"))

    def stats64(self, ifindexes: set[int]) -> dict[int, tuple[int, ...]]:
        """A small namespace: one RTM_GETSTATS dump (collector/netns_pool.py Namespace.stats64)."""
        return self.rtnl.stats64()

    def dump_cap(self, ifindexes: set[int]) -> int:
        """0: the netlink source asks stats64() here, not the C batch, which needs a
        real socket (kernel/nlbatch.py; tests/test_nlbatch.py replays its decoding)."""
        return 0


class Pool(dict):
    pass


def _pod(*atts: tuple[str, str, str]) -> Pod:
    return Pod("telco", "upf", "uid-1", attachments=tuple(
        Attachment("telco", "upf", "uid-1", network, ifname, default=network == "default", plane=plane)
        for network, ifname, plane in atts))


def _link(ifindex: int, name: str, up: bool = True, mtu: int = 1500, carrier: int = 0) -> LinkStats:
    return LinkStats(ifindex, name, "02:00:00:00:00:%02x" % ifindex, mtu, up, "veth", carrier_changes=carrier)


# One row per case: the links the pod holds, the counters the kernel sends, and
# what /metrics must say, written out by hand.
NETLINK_CASES = {
    "every counter in its place": dict(
        links=[_link(2, "eth0", carrier=3), _link(3, "net1", up=False, mtu=9000)],
        stats={2: (1, 2, 3, 4, 5, 6, 7, 8), 3: (10, 20, 30, 40, 50, 60, 70, 80)},
        want={
            ("eth0", "planewatch_interface_receive_packets_total"): 1,
            ("eth0", "planewatch_interface_transmit_packets_total"): 2,
            ("eth0", "planewatch_interface_receive_bytes_total"): 3,
            ("eth0", "planewatch_interface_transmit_bytes_total"): 4,
            ("eth0", "planewatch_interface_receive_errors_total"): 5,
            ("eth0", "planewatch_interface_transmit_errors_total"): 6,
            ("eth0", "planewatch_interface_receive_drops_total"): 7,
            ("eth0", "planewatch_interface_transmit_drops_total"): 8,
            ("eth0", "planewatch_interface_up"): 1,
            ("eth0", "planewatch_interface_mtu_bytes"): 1500,
            ("eth0", "planewatch_interface_carrier_changes_total"): 3,
            ("net1", "planewatch_interface_receive_packets_total"): 10,
            ("net1", "planewatch_interface_transmit_drops_total"): 80,
            ("net1", "planewatch_interface_up"): 0,
            ("net1", "planewatch_interface_mtu_bytes"): 9000,
        }),
    "an interface the kernel has no stats for is left out": dict(
        links=[_link(2, "eth0"), _link(3, "net1")],
        stats={2: (1, 1, 1, 1, 0, 0, 0, 0)},
        want={("eth0", "planewatch_interface_up"): 1, ("net1", "planewatch_interface_up"): None}),
    "loopback and unannotated links are not the pod's to report": dict(
        links=[_link(1, "lo"), _link(2, "eth0"), _link(9, "extra0")],
        stats={1: (5,) * 8, 2: (1,) * 8, 9: (7,) * 8},
        want={("eth0", "planewatch_interface_receive_packets_total"): 1,
              ("lo", "planewatch_interface_receive_packets_total"): None,
              ("extra0", "planewatch_interface_receive_packets_total"): None}),
    "a renamed link (same ifindex, other name) is not the annotated one": dict(
        links=[_link(2, "eth0")],
        stats={2: (1,) * 8},
        view_links={"net1": Link(2, "net1")},
        want={("net1", "planewatch_interface_up"): None}),
}


@pytest.mark.parametrize("case", NETLINK_CASES, ids=list(NETLINK_CASES))
def test_netlink_source_table(case):
    from collector.sources.netlink import NetlinkSource
    c = NETLINK_CASES[case]
    pod = _pod(("default", "eth0", "management"), ("telco/signaling", "net1", "signaling"))
    by_name = {l.name: Link(l.ifindex, l.name) for l in c["links"]}
    by_name.update(c.get("view_links", {}))
    views = tuple(InterfaceView(a, by_name.get(a.interface)) for a in pod.attachments)
    pool = Pool({42: Namespace(42, c["links"], stats_reply(c["stats"]))})
    snapshot = Snapshot(pods=(PodView(pod, "/run/netns/x", 42, "netns-dir:mac", views),), netns=pool)
    from exporters.exposition import render
    parsed = parse_metrics(render(NetlinkSource(Config()).collect(snapshot)).decode())
    for (ifname, name), value in c["want"].items():
        got = series(parsed, name, interface=ifname)
        if value is None:
            assert got == {}, (ifname, name)
        else:
            assert list(got.values()) == [value], (ifname, name, got)


def test_netlink_source_pod_gone_mid_scrape_is_no_failure():
    """The namespace's socket fails (the pod went away): nothing for that pod, no raise."""
    from collector.sources.netlink import NetlinkSource
    pod = _pod(("default", "eth0", "management"))
    ns = Namespace(42, [_link(2, "eth0")], b"")
    ns.rtnl = RtnlSocket(ReplaySocket({}, "gone"))         # no recorded reply: OSError
    views = (InterfaceView(pod.attachments[0], Link(2, "eth0")),)
    fams = NetlinkSource(Config()).collect(Snapshot(pods=(PodView(pod, "/x", 42, "cgroup", views),),
                                                    netns=Pool({42: ns})))
    from exporters.exposition import render
    text = render(fams).decode()
    assert "# TYPE planewatch_interface_up gauge" in text and "planewatch_interface_up{" not in text


ATTACHMENT_CASES = {
    "resolved pod, one secondary network": dict(
        resolved=True, want={
            ("planewatch_pod_netns_resolved", (("namespace", "telco"), ("pod", "upf"))): 1,
            ("planewatch_pod_interface_info", (("interface", "net1"), ("mac", "02:00:00:00:00:03"),
                                               ("ips", "10.1.0.5/24"))): 1,
            ("planewatch_pod_ip_info", (("ip", "10.1.0.5"), ("interface", "net1"))): 1,
        }),
    "unresolved pod is still listed, resolved 0": dict(
        resolved=False, want={
            ("planewatch_pod_netns_resolved", (("namespace", "telco"), ("pod", "upf"))): 0,
            ("planewatch_pod_interface_info", (("interface", "net1"),)): 1,
        }),
}


@pytest.mark.parametrize("case", ATTACHMENT_CASES, ids=list(ATTACHMENT_CASES))
def test_attachments_source_table(case):
    from collector.sources.attachments import AttachmentsSource
    from exporters.exposition import render
    c = ATTACHMENT_CASES[case]
    att = Attachment("telco", "upf", "uid-1", "telco/data", "net1", mac="02:00:00:00:00:03",
                     ips=("10.1.0.5/24",), plane="data")
    pod = Pod("telco", "upf", "uid-1", attachments=(att,))
    view = PodView(pod, "/run/netns/x", 42, "netns-dir:mac", (InterfaceView(att, Link(3, "net1")),)) \
        if c["resolved"] else PodView(pod, interfaces=(InterfaceView(att, None),))
    parsed = parse_metrics(render(AttachmentsSource(Config()).collect(Snapshot(pods=(view,)))).decode())
    for (name, labels), value in c["want"].items():
        got = series(parsed, name, **dict(labels))
        assert list(got.values()) == [value], (name, labels, got)


# --- a source that raises --------------------------------------------------------------

@pytest.fixture
def replay(tmp_path):
    from lab.sriov_fixture import write_sriov_fixture
    sysfs, netns, procfs = tmp_path / "sysfs", tmp_path / "netns", tmp_path / "proc"
    netns.mkdir()
    procfs.mkdir()
    write_sriov_fixture(str(sysfs))
    r = Replay(str(sysfs), str(netns), str(procfs))
    yield r
    r.close()


# a family each source exports on the recording, to see it go and the others stay
OWN_FAMILY = {"attachments": "planewatch_pod_interface_info", "netlink": "planewatch_interface_up",
              "neighbours": "planewatch_gateway_neighbour_state", "routes": "planewatch_interface_rp_filter",
              "sriov": "planewatch_vf_info", "rdma": "planewatch_rdma_port_info", "ebpf": "planewatch_ebpf_up"}


@pytest.mark.parametrize("broken", sorted(OWN_FAMILY))
def test_a_raising_source_costs_its_series_not_the_scrape(replay, broken):
    def boom(snapshot):
        raise RuntimeError(f"{broken} broke")
    replay.server.scraper.sources[broken].collect = boom

    async def get():
        async with TestClient(TestServer(replay.server.app)) as client:
            resp = await client.get("/metrics")
            return resp.status, await resp.text()
    status, text = asyncio.run(get())
    assert status == 200
    parsed = parse_metrics(text)
    success = {dict(l)["collector"]: v for l, v in series(parsed, "planewatch_scrape_collector_success").items()}
    assert success[broken] == 0
    assert {n: v for n, v in success.items() if n != broken} == {n: 1 for n in success if n != broken}
    for name, family in OWN_FAMILY.items():
        present = bool(series(parsed, family))
        assert present == (name != broken), (name, family)
