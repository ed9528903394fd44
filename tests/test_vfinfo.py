"""VF configuration from IFLA_VFINFO_LIST, on messages built byte for byte per
include/uapi/linux/if_link.h (this kernel has no SR-IOV to ask), then through
the sriov source to /metrics."""
from __future__ import annotations

import struct

import pytest
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from collector import sriov_readers as readers
from collector import vfinfo
from collector.vfinfo import VfConfig
from tests.test_sriov import FIXTURE, make_source, one_pod_per_vf, scrape, series

NESTED = 0x8000


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def vf_info_attrs(vf: int, mac: bytes, vlan=0, qos=0, proto=0x8100, spoofchk=0xFFFFFFFF, trust=0xFFFFFFFF,
                  link_state=0, min_rate=0, max_rate=0, stats: dict | None = None, addr_len: int = 6) -> bytes:
    """One IFLA_VF_INFO as rtnl_fill_vfinfo() lays it out (same attribute order)."""
    body = attr(vfinfo.IFLA_VF_MAC, struct.pack("=I", vf) + mac.ljust(32, b"\0"))
    body += attr(13, b"\xff" * addr_len + b"\0" * (32 - addr_len))          # IFLA_VF_BROADCAST
    body += attr(vfinfo.IFLA_VF_VLAN, struct.pack("=III", vf, vlan, qos))
    # struct ifla_vf_vlan_info is 14 bytes of fields, sizeof 16 (4-byte alignment)
    body += attr(vfinfo.IFLA_VF_VLAN_LIST | NESTED,
                 attr(vfinfo.IFLA_VF_VLAN_INFO, struct.pack("=III", vf, vlan, qos) + struct.pack(">H", proto) + b"\0\0"))
    body += attr(vfinfo.IFLA_VF_TX_RATE, struct.pack("=II", vf, max_rate))
    body += attr(vfinfo.IFLA_VF_RATE, struct.pack("=III", vf, min_rate, max_rate))
    body += attr(vfinfo.IFLA_VF_SPOOFCHK, struct.pack("=II", vf, spoofchk))
    body += attr(vfinfo.IFLA_VF_LINK_STATE, struct.pack("=II", vf, link_state))
    body += attr(vfinfo.IFLA_VF_RSS_QUERY_EN, struct.pack("=II", vf, 0xFFFFFFFF))
    body += attr(vfinfo.IFLA_VF_TRUST, struct.pack("=II", vf, trust))
    if stats is not None:
        inner = b"".join(attr(k, struct.pack("=Q", stats[name])) + attr(6, b"")
                         for k, name in vfinfo.VF_STATS_ATTRS.items() if name in stats)
        body += attr(vfinfo.IFLA_VF_STATS | NESTED, inner)
    return attr(vfinfo.IFLA_VF_INFO | NESTED, body)


def newlink(name: str, infos: list[bytes], address: bytes = b"\x02\0\0\0\0\x01") -> bytes:
    body = struct.pack("=BxHiII", 0, 1, 7, 0, 0) + attr(3, name.encode() + b"\0") + attr(1, address)
    body += attr(21, struct.pack("=I", len(infos)))                               # IFLA_NUM_VF
    body += attr(vfinfo.IFLA_VFINFO_LIST | NESTED, b"".join(infos))
    return struct.pack("=IHHII", 16 + len(body), 16, 0, 1, 0) + body


CASES = {
    "driver reports nothing extra (spoofchk/trust -1)": (
        dict(vf=0, mac=bytes(6)),
        VfConfig(mac="00:00:00:00:00:00", link_state="auto")),
    "port VLAN 802.1Q with QoS, spoof check on, trust off": (
        dict(vf=3, mac=bytes.fromhex("020000aa0003"), vlan=300, qos=5, spoofchk=1, trust=0),
        VfConfig(mac="02:00:00:aa:00:03", vlan=300, qos=5, vlan_protocol="802.1Q", spoof_check=True,
                 trust=False, link_state="auto")),
    "QinQ VLAN, trusted, forced down, rate limited": (
        dict(vf=7, mac=bytes.fromhex("0e1122334455"), vlan=4094, proto=0x88A8, spoofchk=0, trust=1,
             link_state=2, min_rate=1000, max_rate=25000),
        VfConfig(mac="0e:11:22:33:44:55", vlan=4094, vlan_protocol="802.1ad", spoof_check=False, trust=True,
                 link_state="disable", min_tx_rate_mbps=1000, max_tx_rate_mbps=25000)),
    "link forced up": (
        dict(vf=1, mac=bytes(6), link_state=1, spoofchk=1),
        VfConfig(mac="00:00:00:00:00:00", spoof_check=True, link_state="enable")),
}


@pytest.mark.parametrize("fields, want", CASES.values(), ids=CASES.keys())
def test_vf_config_decodes_from_uapi_bytes(fields, want):
    stats = {"rx_packets": 11, "tx_bytes": 2**40 + 3}
    data = newlink("ens3f0", [vf_info_attrs(**fields, stats=stats)])
    got = readers.parse_getlink_vfs(data)
    assert list(got) == [fields["vf"]]
    assert got[fields["vf"]].config == want
    assert got[fields["vf"]].stats == stats


def test_pyroute2_reads_the_same_bytes_the_same_way():
    fields = CASES["QinQ VLAN, trusted, forced down, rate limited"][0]
    data = newlink("ens3f0", [vf_info_attrs(**fields)])
    msg = ifinfmsg(data)
    msg.decode()
    info = msg.get_attr("IFLA_VFINFO_LIST").get_attrs("IFLA_VF_INFO")[0]
    ours = readers.parse_getlink_vfs(data)[7].config
    assert info.get_attr("IFLA_VF_MAC")["mac"] == ours.mac
    assert (info.get_attr("IFLA_VF_VLAN")["vlan"], info.get_attr("IFLA_VF_VLAN")["qos"]) == (ours.vlan, ours.qos)
    assert info.get_attr("IFLA_VF_SPOOFCHK")["spoofchk"] == int(ours.spoof_check)
    assert info.get_attr("IFLA_VF_TRUST")["trust"] == int(ours.trust)
    assert info.get_attr("IFLA_VF_LINK_STATE")["link_state"] == 2 and ours.link_state == "disable"
    rate = info.get_attr("IFLA_VF_RATE")
    assert (rate["min_tx_rate"], rate["max_tx_rate"]) == (ours.min_tx_rate_mbps, ours.max_tx_rate_mbps)


def test_many_vfs_ipoib_address_and_index_from_the_message():
    # an IPoIB PF has 20-byte addresses; the VF's `vf` field wins over list position
    infos = [vf_info_attrs(vf=i * 2, mac=bytes(range(i, i + 20)), addr_len=20, spoofchk=i % 2) for i in range(40)]
    got = readers.parse_getlink_vfs(newlink("ib0", infos, address=bytes(20)))
    assert sorted(got) == [i * 2 for i in range(40)]
    assert got[6].config.mac == ":".join(f"{b:02x}" for b in range(3, 23))
    assert [got[i * 2].config.spoof_check for i in range(4)] == [False, True, False, True]


def test_truncated_attributes_are_ignored_not_misread():
    short = attr(vfinfo.IFLA_VF_INFO, attr(vfinfo.IFLA_VF_MAC, struct.pack("=I", 4))
                 + attr(vfinfo.IFLA_VF_RATE, struct.pack("=I", 4))
                 + attr(vfinfo.IFLA_VF_LINK_STATE, struct.pack("=II", 4, 9)))
    got = readers.parse_getlink_vfs(newlink("p0", [short]))
    assert got[4].config == VfConfig(link_state="9")


def test_vf_config_reaches_metrics(expected):
    """Every PF with a netdev is asked once; its VFs' config shows whatever reader gives their counters."""
    vfs = expected["vfs"]
    by_pf: dict[str, list[bytes]] = {}
    for vf in vfs:
        stats = vf["counters"] if vf["reader"] == readers.NETLINK else None
        link_state = 2 if vf["pci_address"] == "0000:3b:02.0" else 0
        by_pf.setdefault(vf["pf"], []).append(vf_info_attrs(
            vf=vf["vf"], mac=bytes.fromhex(f"0200000000{vf['vf'] + 1:02x}"), vlan=100 + vf["vf"], qos=0,
            spoofchk=1, trust=0, link_state=link_state, min_rate=0, max_rate=10000, stats=stats))

    def transport(pf):
        return newlink(pf, by_pf[pf])
    scraped = scrape(make_source(FIXTURE, transport), one_pod_per_vf(vfs))
    rows = {dict(k)["pod"]: dict(k) for k in scraped["planewatch_vf_config_info"]}
    assert set(rows) == {f"p{i}" for i in range(len(vfs))}
    assert rows["p0"]["link_state"] == "disable" and rows["p1"]["link_state"] == "auto"
    assert {r["spoof_check"] for r in rows.values()} == {"on"} and {r["trust"] for r in rows.values()} == {"off"}
    assert rows["p2"]["vlan"] == "102" and rows["p2"]["vlan_protocol"] == "802.1Q"
    assert series(scraped, "planewatch_vf_max_transmit_rate_bytes_per_second", pod="p4") == [10000 * 125000]
    assert series(scraped, "planewatch_vf_min_transmit_rate_bytes_per_second", pod="p4") == [0]
    # netlink counters still come through for the netlink-read PF
    assert series(scraped, "planewatch_vf_receive_bytes_total", pod="p5") == [
        vfs[5]["metrics"]["planewatch_vf_receive_bytes_total"]]


from tests.test_sriov import expected  # noqa: E402,F401  (the module fixture)
