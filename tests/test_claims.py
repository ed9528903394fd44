"""Claims two pods make on one thing (collector/claims.py), on /metrics: a VF two
annotations name goes to neither, and an IP is checked against the claimant's
own namespace. The attack is the annotation a tenant can write."""
from __future__ import annotations

from collector.model import Attachment, DeviceInfo, InterfaceView, Link, Pod, PodView
from collector.registry import Config, Snapshot
from collector.sources.attachments import AttachmentsSource
from collector.sources.sriov import vf_attachments
from exporters.exposition import render
from tests.conftest import parse_metrics, series

VF = DeviceInfo(type="pci", version="1.1.0", pci_address="0000:af:02.3")


def view(i, att_kwargs, link=None, inode=0, addresses=None, conflicts=()):
    uid = f"c1a1m000-0000-4000-8000-{i:012d}"
    att = Attachment("ran", f"du-{i}", uid, "ran/fronthaul", "net1", **att_kwargs)
    pod = Pod("ran", f"du-{i}", uid, attachments=(att,))
    return PodView(pod, f"/run/netns/x{i}" if inode else "", inode, "netns-dir:mac" if inode else "",
                   (InterfaceView(att, link),), conflicts=conflicts, addresses=addresses or {})


def metrics(views):
    return parse_metrics(render(AttachmentsSource(Config()).collect(Snapshot(tuple(views)))).decode())


def test_one_vf_claimed_by_two_pods_is_counted_for_neither():
    honest = view(1, dict(device=VF, ips=("10.40.0.1",)))
    copycat = view(2, dict(device=VF, ips=("10.40.0.2",)))
    other = view(3, dict(device=DeviceInfo(type="pci", pci_address="0000:af:02.4")))
    assert [addr for _, addr, _ in vf_attachments(Snapshot((honest, copycat, other)))] == ["0000:af:02.4"]
    m = metrics([honest, copycat, other])
    got = series(m, "planewatch_pod_identity_conflict")
    assert {(dict(k)["pod"], dict(k)["kind"], dict(k)["claim"]) for k in got} == {
        ("du-1", "vf", "0000:af:02.3"), ("du-2", "vf", "0000:af:02.3")}


def test_one_pod_listing_its_vf_twice_is_no_conflict():
    att = Attachment("ran", "du-4", "u4", "ran/fronthaul", "net1", device=VF)
    twice = PodView(Pod("ran", "du-4", "u4", attachments=(att, att)), interfaces=(InterfaceView(att, None),) * 2)
    assert [addr for _, addr, _ in vf_attachments(Snapshot((twice,)))] == ["0000:af:02.3"]
    assert series(metrics([twice]), "planewatch_pod_identity_conflict") == {}


def test_netns_conflicts_from_the_resolver_are_exported():
    a = view(5, dict(mac="02:00:00:00:00:05"), conflicts=(("netns", "cni-77"),))
    m = metrics([a])
    assert list(series(m, "planewatch_pod_identity_conflict", pod="du-5")) == [
        frozenset({"namespace": "ran", "pod": "du-5", "kind": "netns", "claim": "cni-77"}.items())]


def test_ip_claims_say_whether_the_kernel_backs_them():
    link = Link(7, "net1", "02:00:00:00:00:07", 1500, True, "macvlan")
    holder = view(6, dict(ips=("10.40.9.9/24",)), link=link, inode=11, addresses={"10.40.9.9": 7})
    spoofer = view(7, dict(ips=("10.40.9.9",)), link=link, inode=12, addresses={"10.40.9.10": 7})
    unresolved = view(8, dict(ips=("10.40.9.9",)))
    bridged = view(9, dict(ips=("10.40.9.9",)), link=Link(8, "ab-nic", "", 1500, True, "veth", master=3),
                   inode=13, addresses={})
    m = metrics([holder, spoofer, unresolved, bridged])
    got = {dict(k)["pod"]: dict(k)["verified"] for k in series(m, "planewatch_pod_ip_info", ip="10.40.9.9")}
    assert got == {"du-6": "true", "du-7": "false", "du-8": "unknown", "du-9": "unknown"}


def test_interface_series_follow_a_new_view_and_only_then():
    """The source keeps a pod's interface and IP series for as long as the
    resolver hands out the same view (collector/netns.py): a new view (here
    the pod's namespace now holds the address, and a new MAC) is rendered
    again; the same view object is not, and gives the same series."""
    link = Link(7, "net1", "02:00:00:00:00:07", 1500, True, "macvlan")
    source = AttachmentsSource(Config())

    def scrape(v):
        m = parse_metrics(render(source.collect(Snapshot((v,)))).decode())
        ip = {dict(k)["verified"] for k in series(m, "planewatch_pod_ip_info", ip="10.40.9.9")}
        mac = {dict(k)["mac"] for k in series(m, "planewatch_pod_interface_info")}
        return ip, mac

    before = view(6, dict(ips=("10.40.9.9/24",)), link=link, inode=11, addresses={})
    assert scrape(before) == ({"false"}, {"02:00:00:00:00:07"})
    moved = Link(7, "net1", "02:00:00:00:00:99", 1500, True, "macvlan")
    after = PodView(before.pod, before.netns_path, before.netns_inode, before.resolved_by,
                    (InterfaceView(before.pod.attachments[0], moved),), addresses={"10.40.9.9": 7})
    assert scrape(after) == ({"true"}, {"02:00:00:00:00:99"})
    rows = source._rows[before.pod.uid]
    assert scrape(after) == ({"true"}, {"02:00:00:00:00:99"}) and source._rows[before.pod.uid] is rows
    assert scrape(before) == ({"false"}, {"02:00:00:00:00:07"})


def test_only_interfaces_naming_a_device_are_looked_at_for_claims():
    """PodView.devices: what the VF claims and the SR-IOV and RDMA sources walk
    instead of every interface of every pod each scrape."""
    atts = [Attachment("ran", "du-5", "u5", "default", "eth0"),
            Attachment("ran", "du-5", "u5", "ran/fronthaul", "net1", device=VF),
            Attachment("ran", "du-5", "u5", "ran/rdma", "net2", device=DeviceInfo(rdma_device="mlx5_3")),
            Attachment("ran", "du-5", "u5", "ran/memif", "net3", device=DeviceInfo(type="memif", path="/x"))]
    ivs = tuple(InterfaceView(a, None) for a in atts)
    pod_view = PodView(Pod("ran", "du-5", "u5", attachments=tuple(atts)), interfaces=ivs)
    assert pod_view.devices == ivs[1:3]
    assert [addr for _, addr, _ in vf_attachments(Snapshot((pod_view,)))] == ["0000:af:02.3"]
