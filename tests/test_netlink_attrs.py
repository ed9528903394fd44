"""The one rtattr walk (kernel/rtnl.py `attrs`) every decoder uses: rtnl's link,
address, stats, neighbour and route parsers, the SR-IOV VF list and ebpf/tc.py.
Byte strings are written out here from the uapi layout (struct rtattr: __u16 len,
__u16 type, value padded to 4)."""
from __future__ import annotations

import struct

from collector import vfinfo
from ebpf import tc
from kernel import rtnl


def rta(kind: int, value: bytes, length: int | None = None) -> bytes:
    raw = struct.pack("=HH", 4 + len(value) if length is None else length, kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def test_walk_gives_type_without_flags_and_value_bounds():
    buf = rta(3, b"eth0\0") + rta(0x8000 | 18, rta(1, b"veth\0"))
    assert list(rtnl.attrs(buf, 0, len(buf))) == [(3, 4, 9), (18, 16, 28)]


def test_an_attribute_reaching_past_its_parent_ends_the_walk():
    inner = rta(1, b"ab") + rta(2, b"\1\2\3\4", length=40)      # says 40 bytes, has 8
    assert [k for k, _, _ in rtnl.attrs(inner, 0, len(inner))] == [1]


def test_an_attribute_shorter_than_its_header_ends_the_walk():
    buf = rta(1, b"ab") + struct.pack("=HH", 2, 5) + rta(3, b"cd")
    assert [k for k, _, _ in rtnl.attrs(buf, 0, len(buf))] == [1]


def test_the_walk_stops_at_end_not_at_the_buffer():
    buf = rta(1, b"abcd") + rta(2, b"efgh")
    assert [k for k, _, _ in rtnl.attrs(buf, 0, 8)] == [1]


def test_link_fields_shorter_than_their_type_are_ignored():
    ifinfomsg = struct.pack("=BxHiII", 0, 1, 7, 0x10001, 0)
    body = ifinfomsg + rta(rtnl.IFLA_MTU, b"\5\0") + rta(rtnl.IFLA_IFNAME, b"net1\0")
    link = rtnl.parse_link(body, 0, len(body))
    assert (link.ifindex, link.name, link.mtu) == (7, "net1", 0)


def test_stats_attribute_cut_short_gives_zeros():
    msg = struct.pack("=BBHII", 0, 0, 0, 9, 1) + rta(rtnl.IFLA_STATS_LINK_64, bytes(64), length=40)
    assert rtnl.parse_stats(msg, 0, len(msg)) == (9, (0,) * 8)


def test_stats_found_first_or_after_another_attribute():
    counters = struct.pack("=8Q", *range(1, 9)) + bytes(8 * 16)
    head = struct.pack("=BBHII", 0, 0, 0, 9, 1)
    first = head + rta(rtnl.IFLA_STATS_LINK_64, counters)
    later = head + rta(7, b"\1\2\3\4") + rta(rtnl.IFLA_STATS_LINK_64, counters)
    assert rtnl.parse_stats(first, 0, len(first)) == rtnl.parse_stats(later, 0, len(later)) == (9, tuple(range(1, 9)))


def test_tc_filter_names_go_through_the_same_walk():
    options = rta(tc.TCA_BPF_NAME, b"planewatch\0", length=200)     # overruns the message
    payload = (struct.pack("=BBHiIII", 0, 0, 0, 3, 0, tc.PARENT_INGRESS, tc.filter_info())
               + rta(tc.TCA_KIND, b"bpf\0") + rta(tc.TCA_OPTIONS | tc.NLA_F_NESTED, options))
    assert not tc.is_ours(payload)
    options = rta(tc.TCA_BPF_NAME, b"planewatch\0")
    payload = payload[:payload.index(b"bpf\0") + 4] + rta(tc.TCA_OPTIONS | tc.NLA_F_NESTED, options)
    assert tc.is_ours(payload)


def test_vf_list_with_a_truncated_entry_keeps_the_whole_ones():
    vf0 = rta(vfinfo.IFLA_VF_INFO, rta(vfinfo.IFLA_VF_MAC, struct.pack("=I", 0) + bytes.fromhex("020000000001") + bytes(26)))
    vf1 = struct.pack("=HH", 300, vfinfo.IFLA_VF_INFO) + bytes(8)
    body = rta(vfinfo.IFLA_VFINFO_LIST, vf0 + vf1)
    found = vfinfo.parse_link_vfs(body, 0, len(body))
    assert list(found) == [0] and found[0].config.mac == "02:00:00:00:00:01"
