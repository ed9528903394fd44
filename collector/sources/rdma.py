"""RDMA / InfiniBand port counters of pod attachments (HPC and AI storage planes).

Which IB device belongs to an attachment: the network-status `device-info`
names it (`rdma-device`, written by the SR-IOV device plugin for RDMA VFs), or
the attachment's PCI function owns one (`<pci>/infiniband/<dev>`, as ib_core
registers it). Per port of that device, from ib_core's sysfs
(`class/infiniband/<dev>/ports/<n>/`):
- `counters/*`: the IB PMA PortCounters(Extended). `port_xmit_data` and
  `port_rcv_data` count octets divided by 4 (IBA PortXmitData): exported x4 as
  bytes;
- `hw_counters/*`: driver counters (mlx5: out_of_sequence, packet_seq_err,
  local_ack_timeout_err, rnr_nak_retry_err, roce_adp_retrans, np_cnp_sent ...)
  under one metric with a `stat` label, since each driver names its own;
  `lifespan` is a setting (the refresh period in ms), not a counter;
- `state` ("4: ACTIVE"), `phys_state` ("5: LinkUp") as their numeric ids, and
  `rate` ("100 Gb/sec (4X EDR)") in bytes per second.

Trust: `rdma-device` is tenant-written. It must look like a kernel IB device
name, its sysfs entry must resolve inside the device tree, and when the
attachment also gives a pci-address, the device must be that PCI function's
(else a tenant could read a neighbour's counters under their own labels). All
reads go through collector/sysfs_safe.py. A failed read (a PMA query the port
does not support answers EINVAL) costs that counter, counted on
`planewatch_rdma_read_errors_total`; what is refused shows on
`planewatch_rdma_attachment_refused`.

Caveat: with the RDMA subsystem in `netns exclusive` mode, a device moved into
a pod's netns leaves the host's sysfs view; such attachments have no series.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

from collector.family import COUNTER, GAUGE, Family, render_labels
from collector.model import ATTACHMENT_LABELS
from collector.registry import Config, Snapshot, register
from collector.sysfs_safe import OUTSIDE, Sysfs, SysfsError, ib_device, pci_address

log = logging.getLogger(__name__)

PORT_LABELS = ATTACHMENT_LABELS + ("port",)
INFO_LABELS = PORT_LABELS + ("device", "pci_address", "link_layer")
ERROR_LABELS = PORT_LABELS + ("device", "file", "reason")
REFUSED_LABELS = ATTACHMENT_LABELS + ("field", "reason")
_HW_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*Gb/sec")
MAX_HW_COUNTERS = 256

# counters/<file> -> (metric, multiplier, help)
PORT_COUNTERS = {
    "port_rcv_data": ("receive_bytes", 4, "Bytes received on the RDMA port (PortRcvData x 4)."),
    "port_xmit_data": ("transmit_bytes", 4, "Bytes transmitted on the RDMA port (PortXmitData x 4)."),
    "port_rcv_packets": ("receive_packets", 1, "Packets received on the RDMA port."),
    "port_xmit_packets": ("transmit_packets", 1, "Packets transmitted on the RDMA port."),
    "unicast_rcv_packets": ("receive_unicast_packets", 1, "Unicast packets received on the RDMA port."),
    "unicast_xmit_packets": ("transmit_unicast_packets", 1, "Unicast packets transmitted on the RDMA port."),
    "multicast_rcv_packets": ("receive_multicast_packets", 1, "Multicast packets received on the RDMA port."),
    "multicast_xmit_packets": ("transmit_multicast_packets", 1, "Multicast packets transmitted on the RDMA port."),
    "port_rcv_errors": ("receive_errors", 1, "Packets with errors received on the RDMA port."),
    "port_rcv_remote_physical_errors": ("receive_remote_physical_errors", 1,
                                        "Packets received marked with the EBP delimiter (remote physical errors)."),
    "port_rcv_switch_relay_errors": ("receive_switch_relay_errors", 1,
                                     "Received packets discarded because they could not be forwarded."),
    "port_rcv_constraint_errors": ("receive_constraint_errors", 1,
                                   "Received packets discarded for partition or raw-packet constraints."),
    "port_xmit_discards": ("transmit_discards", 1, "Outbound packets discarded by the RDMA port (down or congested)."),
    "port_xmit_constraint_errors": ("transmit_constraint_errors", 1,
                                    "Outbound packets not sent for partition or raw-packet constraints."),
    "port_xmit_wait": ("transmit_wait_ticks", 1, "Ticks the RDMA port had data to send but no flow-control credits."),
    "symbol_error": ("symbol_errors", 1, "Minor link errors detected on the RDMA port's physical lanes."),
    "link_error_recovery": ("link_error_recoveries", 1, "Successful link error recoveries of the RDMA port."),
    "link_downed": ("link_downed", 1, "Times the RDMA port's link failed its error recovery and went down."),
    "local_link_integrity_errors": ("local_link_integrity_errors", 1,
                                    "Local physical errors exceeding the port's threshold."),
    "excessive_buffer_overrun_errors": ("excessive_buffer_overrun_errors", 1,
                                        "Consecutive flow-control update periods with buffer overrun."),
    "VL15_dropped": ("vl15_dropped_packets", 1, "Incoming VL15 (subnet management) packets dropped."),
}
STATE_HELP = ("IB port logical state id (1 down, 2 init, 3 armed, 4 active, 5 active-defer).",
              "IB port physical state id (2 polling, 3 disabled, 4 training, 5 link up, 6 error recovery).")


@dataclass(frozen=True)
class RdmaHandle:
    device: str
    path: str                # class/infiniband/<dev>
    pci_address: str
    ports: tuple[str, ...]


def ib_for_pci(fs: Sysfs, address: str) -> str:
    """The IB device the PCI function owns ("" when none)."""
    names = sorted(n for n in fs.listdir(fs.path("bus", "pci", "devices", address, "infiniband")) or () if ib_device(n))
    return names[0] if names else ""


def parse_state(text: str) -> int | None:
    head = text.split(":", 1)[0].strip()
    return int(head) if head.isdigit() else None


def parse_rate(text: str) -> float | None:
    m = _RATE.match(text)
    return float(m.group(1)) * 1e9 / 8 if m else None


@register("rdma", help="RDMA/InfiniBand port counters, state and rate of pod attachments, from ib_core sysfs.")
class RdmaSource:
    def __init__(self, config: Config, sysfs: Sysfs | None = None):
        self.fs = sysfs or Sysfs(config.paths.sysfs)
        self._handles: dict[tuple[str, str], RdmaHandle] = {}
        self._errors: dict[tuple, int] = {}
        self._lock = threading.Lock()

    def collect(self, snapshot: Snapshot):
        with self._lock:
            return self._collect(snapshot)

    def wanted(self, snapshot: Snapshot, refused: list) -> list[tuple[tuple[str, ...], str, str]]:
        """(labels, rdma-device as written or "", validated pci address or "")."""
        out, seen = [], set()
        for view in snapshot.pods:
            for iv in view.devices:
                dev = iv.attachment.device
                address = pci_address(dev.pci_address) or "" if dev.pci_address else ""
                if dev.pci_address and not address:
                    if dev.rdma_device:     # no owner check possible: follow nothing
                        refused.append((iv.labels, "pci-address", "invalid_format"))
                    continue
                if not dev.rdma_device and not address:
                    continue
                if dev.rdma_device and not ib_device(dev.rdma_device):
                    refused.append((iv.labels, "rdma-device", "invalid_format"))
                    continue
                key = (iv.labels, dev.rdma_device, address)
                if key not in seen:
                    seen.add(key)
                    out.append(key)
        return out

    def _resolve(self, name: str, address: str) -> RdmaHandle | None:
        fs = self.fs
        if not name:
            name = ib_for_pci(fs, address)
            if not name:
                return None         # a PCI attachment without RDMA: the common case
        path = fs.path("class", "infiniband", name)
        if fs.kind(path) != "dir":
            if fs.kind(path) == "other":
                raise SysfsError(OUTSIDE, path)
            return None
        owner = pci_address(fs.link_name(fs.path("class", "infiniband", name, "device"))) or ""
        if address and owner != address:
            raise SysfsError("not_the_attachments_device", path)
        ports = tuple(sorted((p for p in fs.listdir(fs.path("class", "infiniband", name, "ports")) or ()
                              if p.isdigit()), key=int))
        return RdmaHandle(name, path, owner, ports)

    def _collect(self, snapshot: Snapshot):
        refused: list = []
        wanted = self.wanted(snapshot, refused)
        handles = {}
        rows = []
        for labels, name, address in wanted:
            key = (name, address)
            handle = self._handles.get(key)
            if handle is None:
                try:
                    handle = self._resolve(name, address)
                except SysfsError as err:
                    refused.append((labels, "rdma-device", err.reason))
                    continue
            if handle is None:
                continue
            handles[key] = handle
            rows.extend(self._read_ports(labels, handle))
        self._handles = handles
        live = {(r[0], r[1], r[2].device) for r in rows}
        self._errors = {k: v for k, v in self._errors.items() if k[:3] in live}
        return build_families(rows, self._errors, refused)

    def _read_ports(self, labels, handle: RdmaHandle):
        fs = self.fs
        for port in handle.ports:
            base = (handle.device, "ports", port)
            values = {}

            def text(*rel, base=base, port=port):
                try:
                    return fs.read_text(fs.path("class", "infiniband", *base, *rel))
                except SysfsError as err:
                    self._count(labels, port, handle.device, "/".join(rel), err.reason)
                    return None
            state, phys, rate = text("state"), text("phys_state"), text("rate")
            link_layer = text("link_layer") or ""
            for group in ("counters", "hw_counters"):
                names = fs.listdir(fs.path("class", "infiniband", *base, group)) or ()
                for name in sorted(names)[:MAX_HW_COUNTERS]:
                    if name == "lifespan" or not _HW_NAME.fullmatch(name):
                        continue
                    if group == "counters" and name not in PORT_COUNTERS:
                        continue
                    raw = text(group, name)
                    if raw is None:
                        continue
                    if not raw.isdigit():
                        self._count(labels, port, handle.device, f"{group}/{name}", "invalid_value")
                        continue
                    values[(group, name)] = int(raw)
            yield (labels, port, handle, values, parse_state(state or ""), parse_state(phys or ""),
                   parse_rate(rate or ""), link_layer)

    def _count(self, labels, port, device, file, reason) -> None:
        key = (labels, port, device, file, reason)
        self._errors[key] = self._errors.get(key, 0) + 1


def build_families(rows, errors: dict[tuple, int], refused) -> list[Family]:
    counters = {name: (Family(f"planewatch_rdma_port_{metric}_total", COUNTER, text, PORT_LABELS), mult)
                for name, (metric, mult, text) in PORT_COUNTERS.items()}
    hw = Family("planewatch_rdma_port_hw_events_total", COUNTER,
                "Driver counters of the RDMA port (hw_counters/<counter>: retransmits, out-of-sequence, "
                "timeouts, congestion notifications...), by the driver's name for it.", PORT_LABELS + ("stat",))
    info = Family("planewatch_rdma_port_info", GAUGE,
                  "RDMA port behind a pod attachment: IB device, its PCI function and link layer.", INFO_LABELS)
    state = Family("planewatch_rdma_port_state_id", GAUGE, STATE_HELP[0], PORT_LABELS)
    phys = Family("planewatch_rdma_port_physical_state_id", GAUGE, STATE_HELP[1], PORT_LABELS)
    rate = Family("planewatch_rdma_port_rate_bytes_per_second", GAUGE,
                  "Signalling rate of the RDMA port's link.", PORT_LABELS)
    failed = Family("planewatch_rdma_read_errors_total", COUNTER,
                    "Reads of an RDMA port's sysfs files that failed, by file and reason (errno name or "
                    "refusing policy); each costs only that value.", ERROR_LABELS)
    refusals = Family("planewatch_rdma_attachment_refused", GAUGE,
                      "An attachment's rdma-device that planewatch refuses to follow, and why "
                      "(invalid_format, outside_device_tree, not_the_attachments_device).", REFUSED_LABELS)
    for labels, port, handle, values, st, ph, rt, link_layer in rows:
        key = labels + (port,)
        rendered = render_labels(PORT_LABELS, key)
        info.add(key + (handle.device, handle.pci_address, link_layer), 1)
        for (group, name), value in sorted(values.items()):
            if group == "counters":
                fam, mult = counters[name]
                fam.add_rendered(rendered, value * mult)
            else:
                hw.add(key + (name,), value)
        for fam, value in ((state, st), (phys, ph), (rate, rt)):
            if value is not None:
                fam.add_rendered(rendered, value)
    for key, count in sorted(errors.items()):
        failed.add(key[0] + key[1:], count)
    for labels, fld, reason in sorted(set(refused)):
        refusals.add(labels + (fld, reason), 1)
    fams = [info, state, phys, rate, *(f for f, _ in counters.values()), hw, failed, refusals]
    return [f for f in fams if f.values]
