"""Pure parts of the eBPF source: BTF enum reading, map decoding, tc messages,
and the families built from (netns, ifindex)-keyed readings. No kernel needed."""
from __future__ import annotations

import ipaddress
import os
import random
import re
import struct

import pytest

from collector.model import Attachment, InterfaceView, Link, Pod, PodView
from collector.planes import PlaneSelector
from collector.registry import Snapshot
from collector.sources.ebpf import (
    asymmetric_family,
    drop_family,
    label_flow,
    status_families,
    traffic_families,
    wanted_attachments,
)
from ebpf import btf, maps, tc, traffic_slots
from ebpf.loader import KERNEL_UNSUPPORTED, LOAD_FAILED, PERMISSION_DENIED, VERIFIER_REJECTED, load_failure_reason
from exporters.exposition import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- BTF ----------------------------------------------------------------------------------

# Documentation/bpf/btf.rst: the blob's magic and the kinds these tables use
BTF_MAGIC = 0xEB9F
KIND_INT, KIND_ARRAY, KIND_STRUCT, KIND_ENUM, KIND_FUNC_PROTO, KIND_ENUM64 = 1, 3, 4, 6, 13, 19

def btf_blob(types: list[tuple[str, int, int, int, bytes]], order: str = "<") -> bytes:
    """A BTF blob from (name, kind, vlen, size_or_type, trailer) and member names
    referenced in trailers as b'@name@' placeholders (replaced by string offsets)."""
    strings = [b""]

    def offset(name: str) -> int:
        raw = name.encode()
        if raw not in strings:
            strings.append(raw)
        return sum(len(s) + 1 for s in strings[:strings.index(raw)])

    body = b""
    for name, kind, vlen, size, trailer in types:
        trailer = re.sub(rb"@(\w+)@", lambda m: struct.pack(order + "I", offset(m.group(1).decode())), trailer)
        body += struct.pack(order + "III", offset(name), (kind << 24) | vlen, size) + trailer
    strtab = b"".join(s + b"\0" for s in strings)
    header = struct.pack(order + "HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(body), len(body), len(strtab))
    return header + body + strtab


def enum_trailer(members: dict[str, int], order="<") -> bytes:
    return b"".join(b"@" + n.encode() + b"@" + struct.pack(order + "i", v) for n, v in members.items())


TYPES = [
    ("int", KIND_INT, 0, 4, struct.pack("<I", 32)),
    ("", 2, 0, 1, b""),                                                        # PTR
    ("pair", KIND_STRUCT, 2, 8, b"@a@" + struct.pack("<II", 1, 0) + b"@b@" + struct.pack("<II", 1, 32)),
    ("", KIND_ARRAY, 0, 0, struct.pack("<III", 1, 1, 4)),
    ("other", KIND_ENUM, 2, 4, enum_trailer({"X": 3, "Y": 4})),
    ("proto", KIND_FUNC_PROTO, 1, 1, b"@p@" + struct.pack("<I", 1)),
    ("big", KIND_ENUM64, 1, 8, b"@HUGE@" + struct.pack("<II", 1, 2)),
    ("skb_drop_reason", KIND_ENUM, 4, 4, enum_trailer({
        "SKB_NOT_DROPPED_YET": 0, "SKB_CONSUMED": 1, "SKB_DROP_REASON_NO_SOCKET": 3,
        "SKB_DROP_REASON_IP_RPFILTER": 9})),
]


@pytest.mark.parametrize("name,expected", [
    ("other", {3: "X", 4: "Y"}),
    ("big", {(2 << 32) | 1: "HUGE"}),
    ("skb_drop_reason", {0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED",
                         3: "SKB_DROP_REASON_NO_SOCKET", 9: "SKB_DROP_REASON_IP_RPFILTER"}),
])
def test_enum_values_walks_every_kind(name, expected):
    assert btf.enum_values(btf_blob(TYPES), name) == expected


def test_drop_reasons_strip_the_prefix(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(btf_blob(TYPES))
    assert btf.drop_reasons(str(path)) == {0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED",
                                           3: "NO_SOCKET", 9: "IP_RPFILTER"}


@pytest.mark.parametrize("blob,message", [
    # libbpf's own checks refuse these (bad magic, truncated, a kind it does not know)
    (b"\0" * 24, "parse BTF blob"),
    (btf_blob(TYPES)[:60], "parse BTF blob"),
    (btf_blob([("x", 31, 0, 0, b"")]), "parse BTF blob"),
    (btf_blob(TYPES[:3]), "not in BTF"),
])
def test_enum_values_rejects(blob, message):
    with pytest.raises(btf.BTFError, match=message):
        btf.enum_values(blob, "skb_drop_reason")


def test_big_endian_blob():
    types = [("skb_drop_reason", KIND_ENUM, 1, 4, enum_trailer({"SKB_DROP_REASON_X": 7}, ">"))]
    assert btf.enum_values(btf_blob(types, ">"), "skb_drop_reason") == {7: "SKB_DROP_REASON_X"}


def test_running_kernel_matches_bpftool_vmlinux_h():
    """Our reader and bpftool's C dump must agree on the running kernel's enum."""
    header = os.path.join(ROOT, "ebpf", "build", "vmlinux.h")
    if not (os.path.exists(btf.VMLINUX_BTF) and os.path.exists(header)):
        pytest.skip("no kernel BTF or no ebpf/build/vmlinux.h (make -C ebpf)")
    text = open(header).read()
    body = re.search(r"enum skb_drop_reason \{(.*?)\};", text, re.S).group(1)
    dumped = {int(v, 0): n for n, v in re.findall(r"(\w+) = (-?\w+),", body)}
    assert btf.enum_values(open(btf.VMLINUX_BTF, "rb").read(), "skb_drop_reason") == dumped
    reasons = btf.drop_reasons()
    assert {"NO_SOCKET", "NETFILTER_DROP", "IP_RPFILTER"} <= set(reasons.values())


# --- maps ---------------------------------------------------------------------------------

def percpu(layout: maps.Layout, *per_cpu: tuple) -> bytes:
    pad = b"\0" * (layout.stride - layout.value.size)
    return b"".join(layout.value.pack(*v) + pad for v in per_cpu)


def test_layouts_match_the_c_structs():
    assert (maps.TRAFFIC.key.size, maps.TRAFFIC.stride) == (12, 16)
    assert (maps.FLOWS.key.size, maps.FLOWS.value.size) == (44, 32)
    assert maps.WATCHED.value_size(4) == 1 and maps.DROPS.value_size(4) == 32
    assert (maps.SLOTTED_TRAFFIC.key.size, maps.SLOTTED_TRAFFIC.stride) == (8, 32)     # struct traffic_slot
    assert traffic_slots.WAY.size * traffic_slots.WAYS == 64                            # struct traffic_bucket


def test_counters_are_summed_over_cpus():
    entries = [(maps.TRAFFIC.key.pack(7, 2, 0), percpu(maps.TRAFFIC, (1, 100), (2, 300), (0, 0))),
               (maps.TRAFFIC.key.pack(7, 2, 1), percpu(maps.TRAFFIC, (0, 0), (0, 0), (5, 70))),
               (maps.TRAFFIC.key.pack(7, 3, 9), percpu(maps.TRAFFIC, (1, 1), (0, 0), (0, 0)))]
    counters = maps.decode_counters(entries, maps.TRAFFIC, 3)
    assert maps.traffic_by_direction(maps.traffic_by_interface(counters, {})) == {(7, 2, "ingress"): (3, 400), (7, 2, "egress"): (5, 70)}


def test_slot_and_hash_counts_of_one_interface_add_up():
    """An interface counted in a slot and in the hash (or in a slot only) is
    the sum of both places, direction by direction."""
    hashed = maps.decode_counters([(maps.TRAFFIC.key.pack(7, 2, 0), percpu(maps.TRAFFIC, (1, 100), (2, 300)))],
                                  maps.TRAFFIC, 2)
    slotted = maps.decode_counters(
        [(maps.SLOTTED_TRAFFIC.key.pack(7, 2), percpu(maps.SLOTTED_TRAFFIC, (4, 40, 1, 10), (5, 50, 0, 0))),
         (maps.SLOTTED_TRAFFIC.key.pack(8, 2), percpu(maps.SLOTTED_TRAFFIC, (0, 0, 6, 60), (0, 0, 0, 0)))],
        maps.SLOTTED_TRAFFIC, 2)
    assert maps.traffic_by_direction(maps.traffic_by_interface(hashed, slotted)) == {
        (7, 2, "ingress"): (12, 490), (7, 2, "egress"): (1, 10),
        (8, 2, "ingress"): (0, 0), (8, 2, "egress"): (6, 60)}
    assert maps.traffic_by_interface(hashed, slotted) == {(7, 2): (12, 490, 1, 10), (8, 2): (0, 0, 6, 60)}


@pytest.mark.parametrize("layout", [maps.TRAFFIC, maps.Layout(struct.Struct("=I"), struct.Struct("=IH"), True)])
def test_sum_percpu_both_paths(layout):
    """u64-only values take the memoryview path, others the unpack loop."""
    raw = percpu(layout, (1, 2), (10, 20), (100, 200), (7, 7))
    assert layout.stride == (16 if layout is maps.TRAFFIC else 8)
    assert maps.sum_percpu(raw, layout, 3) == (111, 222)


def test_drops_named_and_frees_left_out():
    entries = [(maps.DROPS.key.pack(7, 2, r), percpu(maps.DROPS, (n,), (1,))) for r, n in
               ((1, 50), (3, 4), (9, 0), (0xFFFF0001, 2))]
    reasons = {1: "SKB_CONSUMED", 3: "NO_SOCKET", 9: "IP_RPFILTER"}
    assert maps.drops_by_reason(maps.decode_counters(entries, maps.DROPS, 2), reasons) == {
        (7, 2, "NO_SOCKET"): 5, (7, 2, "IP_RPFILTER"): 1, (7, 2, f"UNKNOWN_{0xFFFF0001}"): 3}


def flow_bytes(family, proto, src, sport, dst, dport, egress=0, request=0, seen=0, asym=0):
    def raw(a):
        return ipaddress.ip_address(a).packed.ljust(16, b"\0")
    key = maps.FLOWS.key.pack(99, family, proto, 0, sport.to_bytes(2, "big"), dport.to_bytes(2, "big"),
                              raw(src), raw(dst))
    return key, maps.FLOWS.value.pack(0, egress, request, 0, seen, asym)


@pytest.mark.parametrize("family,proto,src,dst,name", [
    (4, 17, "10.250.2.2", "10.250.1.1", "udp"),
    (6, 6, "fd00:250::2", "fd00:250::1", "tcp"),
    (6, 200, "fd00:250::2", "fd00:250::1", "200"),
])
def test_decode_flow(family, proto, src, dst, name):
    flow = maps.decode_flow(*flow_bytes(family, proto, src, 7010, dst, 40000, 2, 3, 5_000_000_000, 11))
    assert (flow.protocol, flow.source, flow.source_port, flow.destination, flow.destination_port) == \
        (name, src, 7010, dst, 40000)
    assert (flow.netns, flow.ingress_ifindex, flow.egress_ifindex, flow.asymmetric_packets) == (99, 3, 2, 11)
    d = flow.as_dict(now_unix=1000.0, now_monotonic_ns=7_000_000_000)
    assert (d["last_seen"], d["packets"]) == (998.0, 11)


@pytest.mark.parametrize("n,expected", [(10, [9, 3, 1]), (2, [9, 3]), (0, [])])
def test_top_asymmetric_flows_ranked_and_bounded(n, expected):
    entries = [flow_bytes(4, 17, "10.0.0.1", port, "10.0.0.2", 2, asym=count)
               for port, count in enumerate((0, 3, 0, 1, 9))]
    top = maps.top_asymmetric_flows(entries, n)
    assert [f.asymmetric_packets for f in top] == expected
    assert [f.source_port for f in top] == [{9: 4, 3: 1, 1: 3}[c] for c in expected]


# --- tc messages --------------------------------------------------------------------------

def attrs(raw: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off < len(raw):
        length, kind = struct.unpack_from("=HH", raw, off)
        out[kind & ~tc.NLA_F_NESTED] = raw[off + 4:off + length]
        off += (length + 3) & ~3
    return out


def test_bpf_filter_message():
    msg = tc.bpf_filter_message(5, tc.PARENT_EGRESS, 42)
    family, _, _, ifindex, handle, parent, info = struct.unpack_from("=BBHiIII", msg)
    assert (ifindex, handle, parent, info >> 16, info & 0xFFFF) == (5, 0, 0xFFFFFFF3, tc.FILTER_PRIO, 0x0300)
    top = attrs(msg[20:])
    assert top[tc.TCA_KIND] == b"bpf\0"
    options = attrs(top[tc.TCA_OPTIONS])
    assert struct.unpack("=I", options[tc.TCA_BPF_FD]) == (42,)
    assert options[tc.TCA_BPF_NAME] == b"planewatch\0"
    assert struct.unpack("=I", options[tc.TCA_BPF_FLAGS]) == (tc.TCA_BPF_FLAG_ACT_DIRECT,)


def test_clsact_message():
    msg = tc.clsact_message(5)
    assert struct.unpack_from("=BBHiIII", msg)[3:6] == (5, 0xFFFF0000, 0xFFFFFFF1)
    assert attrs(msg[20:])[tc.TCA_KIND] == b"clsact\0"


@pytest.mark.parametrize("errno_,reason", [(1, PERMISSION_DENIED), (13, VERIFIER_REJECTED),
                                           (22, VERIFIER_REJECTED), (3, KERNEL_UNSUPPORTED),
                                           (524, KERNEL_UNSUPPORTED), (12, LOAD_FAILED)])
def test_load_failure_reason(errno_, reason):
    assert load_failure_reason(OSError(errno_, "x")) == reason


# --- families -----------------------------------------------------------------------------

def view(pod, dev, ifindex, network="default", plane="management"):
    return InterfaceView(Attachment("ns1", pod, "u-" + pod, network, dev, plane=plane), Link(ifindex, dev))


def test_wanted_attachments_skip_host_network_unresolved_and_linkless():
    eth0, net1 = view("p", "eth0", 2), view("p", "net1", 3, "ns1/sig", "signaling")
    dpdk = InterfaceView(Attachment("ns1", "p", "u", "ns1/dpdk", "net2"), None)
    snap = Snapshot((
        PodView(Pod("ns1", "p", "u"), "/run/netns/p", 10, "x", (eth0, net1, dpdk, view("p", "eth0", 2))),
        PodView(Pod("ns1", "h", "uh", host_network=True), "/proc/1/ns/net", 1, "x", (view("h", "eth0", 2),)),
        PodView(Pod("ns1", "q", "uq"), "", 0, "", (view("q", "eth0", 2),)),
    ))
    assert wanted_attachments(snap) == {(10, 2): ("/run/netns/p", eth0), (10, 3): ("/run/netns/p", net1)}


def test_the_index_of_attached_views_is_kept_while_pods_and_attachments_are():
    from collector.registry import Config
    from collector.sources.ebpf import EbpfSource
    eth0, net1 = view("p", "eth0", 2), view("p", "net1", 3, "ns1/sig", "signaling")
    pod = PodView(Pod("ns1", "p", "u"), "/run/netns/p", 10, "x", (eth0, net1))
    source = EbpfSource(Config())
    first = source._index_of(Snapshot((pod,)), {(10, 2), (10, 3)})
    assert first == {(10, 2): eth0, (10, 3): net1}
    assert source._index_of(Snapshot((pod,)), {(10, 2), (10, 3)}) is first        # a new snapshot, same views
    assert source._index_of(Snapshot((pod,)), {(10, 2)}) == {(10, 2): eth0}       # one detached
    moved = view("p", "net1", 4, "ns1/sig", "signaling")
    again = PodView(pod.pod, pod.netns_path, 10, "x", (eth0, moved))
    assert source._index_of(Snapshot((again,)), {(10, 2), (10, 4)}) == {(10, 2): eth0, (10, 4): moved}
    assert source._index_of(Snapshot(()), {(10, 2), (10, 4)}) == {}


INDEX = {(10, 2): view("p", "eth0", 2), (10, 3): view("p", "net1", 3, "ns1/sig", "signaling"),
         (11, 2): view("q", "eth0", 2)}


def samples(fam):
    return {labels: v for labels, v in fam.samples}


def test_traffic_families_zero_fill_and_ignore_unknown():
    fams = {f.name: f for f in traffic_families(INDEX, {(10, 3): (4, 400, 2, 200), (99, 1): (0, 0, 1, 1)})}
    rx = samples(fams["planewatch_ebpf_interface_receive_packets_total"])
    assert rx['namespace="ns1",pod="p",network="ns1/sig",interface="net1",plane="signaling"'] == 4
    assert samples(fams["planewatch_ebpf_interface_receive_bytes_total"])[
        'namespace="ns1",pod="p",network="ns1/sig",interface="net1",plane="signaling"'] == 400
    assert samples(fams["planewatch_ebpf_interface_transmit_packets_total"])[
        'namespace="ns1",pod="p",network="ns1/sig",interface="net1",plane="signaling"'] == 2
    assert rx['namespace="ns1",pod="q",network="default",interface="eth0",plane="management"'] == 0
    assert len(rx) == 3 and len(fams) == 4
    assert sum(samples(fams["planewatch_ebpf_interface_transmit_bytes_total"]).values()) == 200


def test_drop_family_labels_by_netns_and_ifindex():
    """Straight from the map's (netns, ifindex, reason value) keys: named by the
    BTF's reasons, UNKNOWN_<value> without a name, frees that are not drops and
    interfaces not watched left out; the same as Loader.packet_drops by name."""
    reasons = {0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED", 2: "NO_SOCKET", 5: "IP_RPFILTER"}
    counters = {(11, 2, 2): (5,), (10, 2, 5): (1,), (12, 2, 2): (9,), (10, 2, 1): (4,), (10, 2, 0): (3,),
                (10, 3, 77): (6,)}
    fam = drop_family(INDEX, counters, reasons)
    assert samples(fam) == {
        'namespace="ns1",pod="q",network="default",interface="eth0",plane="management",reason="NO_SOCKET"': 5,
        'namespace="ns1",pod="p",network="default",interface="eth0",plane="management",reason="IP_RPFILTER"': 1,
        'namespace="ns1",pod="p",network="ns1/sig",interface="net1",plane="signaling",reason="UNKNOWN_77"': 6}
    by_name = maps.drops_by_reason(counters, reasons)
    assert sorted(fam.values) == sorted(n for (netns, ifindex, _), n in by_name.items() if (netns, ifindex) in INDEX)
    # the same value named otherwise by another kernel's BTF is labelled by that name
    assert "IP_RPFILTER" not in render([drop_family(INDEX, counters, {**reasons, 5: "OTHER"})]).decode()


def test_asymmetric_family_takes_the_ingress_identity():
    fam = asymmetric_family(INDEX, {(10, 3, 2): 7, (10, 3, 9): 1})
    assert samples(fam) == {
        'namespace="ns1",pod="p",network="ns1/sig",interface="net1",plane="signaling",'
        'ingress_interface="net1",egress_interface="eth0"': 7}


@pytest.mark.parametrize("reason,up", [("ok", 1), ("btf_missing", 0)])
def test_status_families(reason, up):
    fams = {f.name: f for f in status_families(reason, "tcx", 3, 5)}
    assert samples(fams["planewatch_ebpf_up"]) == {"": up}
    assert samples(fams["planewatch_ebpf_info"]) == {f'reason="{reason}",attach_mode="tcx"': 1}
    assert samples(fams["planewatch_ebpf_attached_interfaces"]) == {"": 3}
    assert samples(fams["planewatch_ebpf_watched_interfaces"]) == {"": 5}


@pytest.mark.parametrize("globs,selected,left", [
    ("*", ["signaling", "unclassified", "", "a,b"], []),
    ("", [], ["signaling", "unclassified", "*"]),
    (" , ", [], ["signaling"]),
    ("signaling", ["signaling"], ["Signaling", "signaling2", "xsignaling"]),
    ("data*, sig?al", ["data", "data-user", "signal", "sigXal"], ["user-data", "sigal", "signaling"]),
    ("[ab]*", ["alpha", "beta"], ["gamma", "[ab]"]),
    ("user.data", ["user.data"], ["userXdata"]),
])
def test_plane_selector(globs, selected, left):
    """--collector.ebpf.flow-planes: comma-separated globs, whole plane names,
    case as written (planes are label values); empty selects nothing."""
    wants = PlaneSelector(globs)
    assert [p for p in selected + left if wants(p)] == selected
    assert [p for p in selected + left if wants(p)] == selected     # the cached answers
    assert bool(wants) == bool(globs.strip(" ,"))


def test_plane_selector_cache_is_bounded():
    wants = PlaneSelector("p1*")
    assert sum(wants(f"p{i}") for i in range(3 * PlaneSelector.CACHED)) == 1 + 10 + 100 + 1000     # p1, p10-19, p100-199, p1000-1999
    assert len(wants._seen) == PlaneSelector.CACHED
    assert PlaneSelector(["a", " b "]).patterns == ("a", "b")


def test_label_flow():
    flow = {"netns": 10, "ingress_ifindex": 3, "egress_ifindex": 2, "packets": 4}
    got = label_flow(flow, INDEX)
    assert (got["pod"], got["network"], got["ingress_interface"], got["egress_interface"]) == \
        ("p", "ns1/sig", "net1", "eth0")
    assert "pod" not in label_flow({**flow, "netns": 77}, INDEX)


@pytest.mark.parametrize("ncpus", [1, 2, 3, 128])
@pytest.mark.parametrize("layout", [maps.TRAFFIC, maps.DROPS], ids=["traffic", "drops"])
def test_decode_counters_columns_equal_the_per_entry_sums(layout, ncpus):
    """The column-wise sum over all entries gives what summing each entry's
    per-CPU copies one by one gives (independent arithmetic on the same bytes)."""
    rng = random.Random(ncpus)
    entries, expected = [], {}
    for i in range(50):
        key = (4026531000 + i % 7, i, i % 2)
        per_cpu = [[rng.randrange(1 << 62) for _ in range(layout.u64_fields)] for _ in range(ncpus)]
        entries.append((layout.key.pack(*key), b"".join(layout.value.pack(*v).ljust(layout.stride, b"\0")
                                                      for v in per_cpu)))
        expected[key] = tuple(sum(cpu[f] for cpu in per_cpu) for f in range(layout.u64_fields))
    assert maps.decode_counters(entries, layout, ncpus) == expected
    assert maps.decode_counters([], layout, ncpus) == {}
