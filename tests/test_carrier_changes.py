"""Carrier changes of pod interfaces: IFLA_CARRIER_CHANGES on a real veth whose
peer is flapped, against pyroute2's decoding, then through the netlink source."""
from __future__ import annotations

import subprocess

import pytest
from pyroute2 import IPRoute

from collector.model import Attachment, InterfaceView, Link, Pod, PodView
from collector.netns_pool import NetnsPool
from collector.registry import Config, Snapshot
from collector.sources.netlink import NetlinkSource
from exporters.exposition import render
from kernel.nsenter import in_netns
from tests.conftest import unique_prefix


@pytest.fixture
def pair(root):
    p = unique_prefix("pwcc")
    a, b = f"{p}-a", f"{p}-b"
    cmds = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
            ["ip", "-n", a, "link", "add", "net1", "type", "veth", "peer", "name", "peer1", "netns", b],
            ["ip", "-n", a, "link", "set", "net1", "up"], ["ip", "-n", b, "link", "set", "peer1", "up"]]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def flap(ns: str, dev: str, times: int) -> None:
    for _ in range(times):
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "down"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)


def pyroute2_carrier_changes(ns: str, dev: str) -> int:
    with in_netns(f"/run/netns/{ns}"):
        ipr = IPRoute()
    try:
        return ipr.link("get", ifname=dev)[0].get("carrier_changes")
    finally:
        ipr.close()


def test_carrier_changes_follow_the_kernel_and_reach_metrics(pair):
    a, b = pair
    pool = NetnsPool()
    try:
        ns = pool.open(f"/run/netns/{a}")
        ns.refresh(0.0)
        link = next(l for l in ns.links if l.name == "net1")
        before = link.carrier_changes
        assert before == pyroute2_carrier_changes(a, "net1")
        flap(b, "peer1", 3)                     # each flap: carrier down, then up on our side
        assert ns.stale(1.0)                    # the kernel told the link-event socket
        ns.refresh(1.0)
        link = next(l for l in ns.links if l.name == "net1")
        assert link.carrier_changes == pyroute2_carrier_changes(a, "net1") == before + 6
        att = Attachment("tenant", "upf", "uid-1", "tenant/n3", "net1", plane="data")
        view = PodView(Pod("tenant", "upf", "uid-1", attachments=(att,)), netns_path=ns.path,
                       netns_inode=ns.inode, interfaces=(InterfaceView(att, Link(link.ifindex, "net1")),))
        text = render(NetlinkSource(Config()).collect(Snapshot((view,), netns=pool))).decode()
        want = ('planewatch_interface_carrier_changes_total{namespace="tenant",pod="upf",network="tenant/n3",'
                f'interface="net1",plane="data"}} {before + 6}')
        assert want in text.splitlines()
        assert "# TYPE planewatch_interface_carrier_changes_total counter" in text
    finally:
        pool.keep_only(set())
