"""Metric families of the sriov source, built fresh at every scrape from plain rows."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from collector import sriov_readers as readers
from collector.family import COUNTER, GAUGE, Family, render_labels
from collector.model import ATTACHMENT_LABELS
from collector.vfinfo import VfConfig

INFO_LABELS = ATTACHMENT_LABELS + ("pf", "vf", "pci_address", "driver", "numa_node", "reader")
CONFIG_LABELS = ATTACHMENT_LABELS + ("mac", "vlan", "qos", "vlan_protocol", "spoof_check", "trust", "link_state")
ERROR_LABELS = ATTACHMENT_LABELS + ("pf", "vf", "file", "reason")
REFUSED_LABELS = ATTACHMENT_LABELS + ("field", "reason")
MBIT = 125_000      # bytes per second in one Mbit/s (the unit of IFLA_VF_RATE)


@dataclass
class VfRow:
    labels: tuple[str, ...]
    info: tuple[str, ...]                       # pf, vf, pci_address, driver, numa_node, reader
    counters: dict[str, int] = field(default_factory=dict)
    config: VfConfig | None = None
    carrier_changes: int | None = None


def _onoff(value: bool | None) -> str:
    return "" if value is None else ("on" if value else "off")


def build_families(rows: Iterable[VfRow], errors: dict[tuple, int], refused: Iterable[tuple]) -> list[Family]:
    """`errors`: (labels, pf, vf, file, reason) -> count; `refused`: (labels, field, reason)."""
    counters = {name: Family(metric, COUNTER, text, ATTACHMENT_LABELS)
                for name, (metric, text) in readers.COUNTERS.items()}
    info = Family("planewatch_vf_info", GAUGE,
                  "SR-IOV VF behind a pod attachment: its PF, index, PCI address, driver, "
                  "NUMA node and the reader of its counters.", INFO_LABELS)
    config = Family("planewatch_vf_config_info", GAUGE,
                    "SR-IOV VF configuration set on its PF (IFLA_VFINFO_LIST): administrative MAC, port VLAN, "
                    "QoS and VLAN protocol, spoof check, trust and link state (auto/enable/disable); "
                    "\"\" where the driver does not report it.", CONFIG_LABELS)
    min_rate = Family("planewatch_vf_min_transmit_rate_bytes_per_second", GAUGE,
                      "Guaranteed transmit rate of the SR-IOV VF set on its PF (0: none).", ATTACHMENT_LABELS)
    max_rate = Family("planewatch_vf_max_transmit_rate_bytes_per_second", GAUGE,
                      "Transmit rate limit of the SR-IOV VF set on its PF (0: unlimited).", ATTACHMENT_LABELS)
    carrier = Family("planewatch_vf_carrier_changes_total", COUNTER,
                     "Carrier changes of a VF netdev in the host netns (free VFs; a pod's VF netdev is "
                     "counted by planewatch_interface_carrier_changes_total).", ATTACHMENT_LABELS)
    failed = Family("planewatch_vf_read_errors_total", COUNTER,
                    "Reads of a VF's sysfs files (or of its PF over netlink) that failed, by file and reason "
                    "(errno name from the driver, or the policy that refused the path); each costs only "
                    "that counter or that VF.", ERROR_LABELS)
    refusals = Family("planewatch_vf_attachment_refused", GAUGE,
                      "An attachment's device-info that planewatch refuses to follow: the field "
                      "(pci-address, pf-pci-address) and why (invalid_format, outside_device_tree).",
                      REFUSED_LABELS)
    for row in rows:
        info.add(row.labels + row.info, 1)
        rendered = render_labels(ATTACHMENT_LABELS, row.labels)
        for name, value in row.counters.items():
            fam = counters.get(name)
            if fam is not None:
                fam.add_rendered(rendered, value)
        cfg = row.config
        if cfg is not None:
            config.add(row.labels + (cfg.mac, str(cfg.vlan), str(cfg.qos), cfg.vlan_protocol,
                                     _onoff(cfg.spoof_check), _onoff(cfg.trust), cfg.link_state), 1)
            min_rate.add_rendered(rendered, cfg.min_tx_rate_mbps * MBIT)
            max_rate.add_rendered(rendered, cfg.max_tx_rate_mbps * MBIT)
        if row.carrier_changes is not None:
            carrier.add_rendered(rendered, row.carrier_changes)
    for key, count in sorted(errors.items()):
        failed.add(key[0] + key[1:], count)
    for labels, fld, reason in sorted(set(refused)):
        refusals.add(labels + (fld, reason), 1)
    fams = [info, *counters.values(), config, min_rate, max_rate, carrier, failed, refusals]
    return [fam for fam in fams if fam.values]
