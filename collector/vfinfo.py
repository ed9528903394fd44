"""Decode a PF's IFLA_VFINFO_LIST: per VF its configuration and its counters.

What `ip link show <pf>` prints as `vf N ...` lines, byte for byte from
include/uapi/linux/if_link.h (every struct is __u32 vf first):

  IFLA_VF_MAC        1  struct ifla_vf_mac        {vf; __u8 mac[32]}
  IFLA_VF_VLAN       2  struct ifla_vf_vlan       {vf; vlan; qos}
  IFLA_VF_TX_RATE    3  struct ifla_vf_tx_rate    {vf; rate}        (= max_tx_rate)
  IFLA_VF_SPOOFCHK   4  struct ifla_vf_spoofchk   {vf; setting}
  IFLA_VF_LINK_STATE 5  struct ifla_vf_link_state {vf; link_state}  (0 auto, 1 enable, 2 disable)
  IFLA_VF_RATE       6  struct ifla_vf_rate       {vf; min_tx_rate; max_tx_rate}   (Mbit/s)
  IFLA_VF_STATS      8  nested IFLA_VF_STATS_*    (u64 each)
  IFLA_VF_TRUST      9  struct ifla_vf_trust      {vf; setting}
  IFLA_VF_VLAN_LIST 12  nested IFLA_VF_VLAN_INFO (1): {vf; vlan; qos; __be16 vlan_proto}

rtnl_fill_vfinfo() sets spoofchk and trusted to -1 (0xffffffff on the wire)
before asking the driver, so a driver that does not report them says "unknown",
not "off": `spoof_check`/`trust` are None then. A `vf` field out of step with
the list position is trusted over the position (the kernel writes it).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kernel.rtnl import attrs

IFLA_ADDRESS, IFLA_VFINFO_LIST = 1, 22
IFLA_VF_INFO = 1
(IFLA_VF_MAC, IFLA_VF_VLAN, IFLA_VF_TX_RATE, IFLA_VF_SPOOFCHK, IFLA_VF_LINK_STATE, IFLA_VF_RATE,
 IFLA_VF_RSS_QUERY_EN, IFLA_VF_STATS, IFLA_VF_TRUST) = range(1, 10)
IFLA_VF_VLAN_LIST, IFLA_VF_VLAN_INFO = 12, 1
LINK_STATES = {0: "auto", 1: "enable", 2: "disable"}
VLAN_PROTOCOLS = {0x8100: "802.1Q", 0x88A8: "802.1ad"}
UNKNOWN = 0xFFFFFFFF

# IFLA_VF_STATS_* (6 is IFLA_VF_STATS_PAD).
VF_STATS_ATTRS = {0: "rx_packets", 1: "tx_packets", 2: "rx_bytes", 3: "tx_bytes",
                  4: "rx_broadcast", 5: "rx_multicast", 7: "rx_dropped", 8: "tx_dropped"}

_U32 = struct.Struct("=I")
_U32x2 = struct.Struct("=II")
_U32x3 = struct.Struct("=III")
_U64 = struct.Struct("=Q")


@dataclass
class VfConfig:
    mac: str = ""
    vlan: int = 0
    qos: int = 0
    vlan_protocol: str = ""
    spoof_check: bool | None = None
    trust: bool | None = None
    link_state: str = ""
    min_tx_rate_mbps: int = 0
    max_tx_rate_mbps: int = 0


@dataclass
class VfInfo:
    index: int
    config: VfConfig = field(default_factory=VfConfig)
    stats: dict[str, int] | None = None


def _setting(value: int) -> bool | None:
    return None if value == UNKNOWN else bool(value)


def _mac(raw: bytes, addr_len: int) -> str:
    return ":".join(f"{b:02x}" for b in raw[:addr_len])


def parse_vf_info(buf, start: int, end: int, position: int, addr_len: int = 6) -> VfInfo:
    info = VfInfo(position)
    cfg = info.config
    for sub, s, e in attrs(buf, start, end):
        size = e - s
        if sub == IFLA_VF_MAC and size >= 4:
            info.index = _U32.unpack_from(buf, s)[0]
            if size >= 4 + addr_len:
                cfg.mac = _mac(bytes(buf[s + 4:s + 4 + addr_len]), addr_len)
        elif sub == IFLA_VF_VLAN and size >= _U32x3.size:
            _, cfg.vlan, cfg.qos = _U32x3.unpack_from(buf, s)
        elif sub == IFLA_VF_VLAN_LIST:
            for kind, vs, ve in attrs(buf, s, e):
                if kind == IFLA_VF_VLAN_INFO and ve - vs >= 14:
                    proto = struct.unpack_from(">H", buf, vs + 12)[0]
                    cfg.vlan_protocol = VLAN_PROTOCOLS.get(proto, f"0x{proto:04x}")
                    break           # the kernel reports one entry: the VF's port VLAN
        elif sub == IFLA_VF_SPOOFCHK and size >= 8:
            cfg.spoof_check = _setting(_U32x2.unpack_from(buf, s)[1])
        elif sub == IFLA_VF_TRUST and size >= 8:
            cfg.trust = _setting(_U32x2.unpack_from(buf, s)[1])
        elif sub == IFLA_VF_LINK_STATE and size >= 8:
            state = _U32x2.unpack_from(buf, s)[1]
            cfg.link_state = LINK_STATES.get(state, str(state))
        elif sub == IFLA_VF_RATE and size >= _U32x3.size:
            _, cfg.min_tx_rate_mbps, cfg.max_tx_rate_mbps = _U32x3.unpack_from(buf, s)
        elif sub == IFLA_VF_TX_RATE and size >= 8 and not cfg.max_tx_rate_mbps:
            cfg.max_tx_rate_mbps = _U32x2.unpack_from(buf, s)[1]
        elif sub == IFLA_VF_STATS:
            info.stats = {VF_STATS_ATTRS[k]: _U64.unpack_from(buf, vs)[0]
                          for k, vs, ve in attrs(buf, s, e) if k in VF_STATS_ATTRS and ve - vs >= 8}
    if not cfg.vlan:
        cfg.vlan_protocol = ""      # the kernel reports 802.1Q for "no VLAN" too
    return info


def parse_link_vfs(buf, start: int, end: int) -> dict[int, VfInfo]:
    """VF index -> VfInfo from the attributes of one RTM_NEWLINK (after ifinfomsg)."""
    addr_len, lists = 6, []
    for kind, vs, ve in attrs(buf, start, end):
        if kind == IFLA_ADDRESS and ve > vs:
            addr_len = min(ve - vs, 32)     # 20 for an IPoIB PF
        elif kind == IFLA_VFINFO_LIST:
            lists.append((vs, ve))
    out: dict[int, VfInfo] = {}
    for vs, ve in lists:
        for position, (kind, is_, ie) in enumerate(attrs(buf, vs, ve)):
            if kind == IFLA_VF_INFO:
                info = parse_vf_info(buf, is_, ie, position, addr_len)
                out[info.index] = info
    return out
