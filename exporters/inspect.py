"""`planewatch inspect`: which plane of which pod is losing packets, where, why.

Reads a running collector twice, `--interval` seconds apart (/metrics for rates,
/debug/attachments for IPs and findings), and prints one row per pod interface,
kubectl style, or JSON with `-o json`.
"""
from __future__ import annotations

import base64
import json
import sys
import time
import unicodedata
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from collector.kubeclient import client_context

KEY = ("namespace", "pod", "interface")


@dataclass
class Row:
    namespace: str
    pod: str
    interface: str
    network: str = ""
    plane: str = ""
    ips: str = ""
    rx_pps: float = 0.0
    tx_pps: float = 0.0
    rx_bps: float = 0.0
    tx_bps: float = 0.0
    drops_per_s: float = 0.0            # interface drops + errors, both directions
    drop_reasons: dict = field(default_factory=dict)   # reason -> packets/s (eBPF)
    vf: str = ""
    vf_drops_per_s: float = 0.0
    asymmetric_per_s: float = 0.0
    gateways: list = field(default_factory=list)       # "address state [for N s] [probe loss x%]"
    findings: list = field(default_factory=list)

    @property
    def lost_per_s(self) -> float:
        """Loss as the recording rules count it: interface drops + errors, VF drops.
        eBPF drop reasons say why; they overlap those counters and are not added."""
        return self.drops_per_s + self.vf_drops_per_s


def parse(text: str) -> dict[str, list[tuple[dict, float]]]:
    from prometheus_client.parser import text_string_to_metric_families  # only inspect needs it
    out: dict[str, list] = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((s.labels, s.value))
    return out


def _key(labels: dict) -> tuple:
    return tuple(labels.get(k, "") for k in KEY)


def _rate(before: dict, after: dict, name: str, interval: float, by=_key) -> dict:
    """Per-key rate of a counter between two scrapes (a reset counts from 0)."""
    prev: defaultdict[tuple, float] = defaultdict(float)
    for labels, v in before.get(name, ()):
        prev[(by(labels), labels.get("reason", ""))] += v
    out: defaultdict[tuple, float] = defaultdict(float)
    for labels, v in after.get(name, ()):
        k = (by(labels), labels.get("reason", ""))
        delta = v - prev.get(k, 0.0)
        out[k] += (delta if delta >= 0 else v) / interval
    return out


def build_rows(before: dict, after: dict, debug: dict, interval: float) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for labels, _ in after.get("planewatch_pod_interface_info", ()):
        rows[_key(labels)] = Row(labels["namespace"], labels["pod"], labels["interface"],
                                 labels.get("network", ""), labels.get("plane", ""), labels.get("ips", ""))

    def add(name, attr):
        for (k, _), v in _rate(before, after, name, interval).items():
            if k in rows:
                setattr(rows[k], attr, getattr(rows[k], attr) + v)
    add("planewatch_interface_receive_packets_total", "rx_pps")
    add("planewatch_interface_transmit_packets_total", "tx_pps")
    add("planewatch_interface_receive_bytes_total", "rx_bps")
    add("planewatch_interface_transmit_bytes_total", "tx_bps")
    for name in ("receive_drops", "transmit_drops", "receive_errors", "transmit_errors"):
        add(f"planewatch_interface_{name}_total", "drops_per_s")
    for name in ("receive_drops", "transmit_drops"):
        add(f"planewatch_vf_{name}_total", "vf_drops_per_s")
    add("planewatch_asymmetric_packets_total", "asymmetric_per_s")
    for (k, reason), v in _rate(before, after, "planewatch_packet_drops_total", interval).items():
        if k in rows and v > 0:
            rows[k].drop_reasons[reason] = rows[k].drop_reasons.get(reason, 0.0) + v
    for labels, _ in after.get("planewatch_vf_info", ()):
        if _key(labels) in rows:
            rows[_key(labels)].vf = f"{labels.get('pf', '')}/vf{labels.get('vf', '')}"
    add_gateways(rows, before, after, interval)
    for f in debug.get("findings", ()):
        k = (f.get("namespace", ""), f.get("pod", ""), f.get("interface", ""))
        if k in rows:
            rows[k].findings.append(f.get("sentence") or f.get("kind", ""))
        else:           # a pod-level finding: attach to every interface row of that pod
            for rk, row in rows.items():
                if rk[:2] == k[:2]:
                    row.findings.append(f.get("sentence") or f.get("kind", ""))
    return sorted(rows.values(), key=lambda r: (-r.lost_per_s, r.namespace, r.pod, r.interface))


def add_gateways(rows: dict, before: dict, after: dict, interval: float) -> None:
    """Each gateway of each interface with its neighbour state (how long it has been
    so), and the probe loss between the two reads on probed planes."""
    def by_gateway(labels):
        return _key(labels) + (labels.get("gateway", ""),)
    ages = {by_gateway(l): v for l, v in after.get("planewatch_gateway_neighbour_updated_age_seconds", ())}
    probes = _rate(before, after, "planewatch_gateway_probes_total", interval, by=by_gateway)
    lost = _rate(before, after, "planewatch_gateway_probe_failures_total", interval, by=by_gateway)
    for labels, value in sorted(after.get("planewatch_gateway_neighbour_state", ()),
                                key=lambda lv: lv[0].get("gateway", "")):
        k = by_gateway(labels)
        if value != 1 or k[:3] not in rows:
            continue
        text = f"{k[3]} {labels.get('state', '')}"
        if k in ages:
            text += f" for {ages[k]:.0f}s"
        sent = probes.get((k, ""), 0.0)
        if sent > 0:
            text += f" probe loss {lost.get((k, ''), 0.0) / sent:.0%}"
        rows[k[:3]].gateways.append(text)


def select(rows: list[Row], pod: str = "", plane: str = "") -> list[Row]:
    if pod:
        ns, _, name = pod.rpartition("/")
        rows = [r for r in rows if r.pod == name and (not ns or r.namespace == ns)]
    if plane:
        rows = [r for r in rows if r.plane == plane]
    return rows


def _num(v: float) -> str:
    if v == 0:
        return "0"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def printable(text: object) -> str:
    """Text safe for a terminal: control characters (ESC sequences, CR, BEL),
    invisible format characters (bidi overrides, zero-width) and line or
    paragraph separators become visible escapes. Annotation text, label values
    and findings come from pod owners and must not drive the operator's terminal.
    """
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
        else:
            out.append(ch)      # other spaces (NBSP...): harmless
    return "".join(out)


def render_table(rows: list[Row]) -> str:
    header = ["POD", "INTERFACE", "NETWORK", "PLANE", "IPS", "RX PPS", "TX PPS", "LOST/S",
              "KERNEL DROP REASONS/S", "VF", "GATEWAYS", "FINDINGS"]
    lines = [header]
    for r in rows:
        reasons = ",".join(f"{k}={_num(v)}" for k, v in sorted(r.drop_reasons.items(), key=lambda kv: -kv[1]))
        drops = _num(r.lost_per_s)
        lines.append([printable(cell) for cell in (
            f"{r.namespace}/{r.pod}", r.interface or "-", r.network, r.plane, r.ips or "-",
            _num(r.rx_pps), _num(r.tx_pps), drops, reasons or "-", r.vf or "-",
            ", ".join(r.gateways) or "-",
            " | ".join(map(str, r.findings)) or "-")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1]
                     for line in lines)


def plane_summary(rows: list[Row]) -> str:
    by: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        by[r.plane][0] += r.rx_pps + r.tx_pps
        by[r.plane][1] += r.lost_per_s
    parts = []
    for plane, (pps, drops) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        loss = drops / (pps + drops) if pps + drops else 0.0
        parts.append(f"{printable(plane)}: {_num(pps)} pps, {_num(drops)} lost/s ({loss:.2%})")
    return "planes (loss = interface drops+errors and VF drops): " + "; ".join(parts)


class Client:
    def __init__(self, url: str, ca_file: str = "", token_file: str = "", user: str = ""):
        self.url = url.rstrip("/")
        self.context = client_context(cafile=ca_file) if ca_file else None
        self.headers = {}
        if token_file:
            with open(token_file) as f:
                self.headers["Authorization"] = f"Bearer {f.read().strip()}"
        elif user:
            self.headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()

    def get(self, path: str) -> bytes:
        req = urllib.request.Request(self.url + path, headers=self.headers)
        with urllib.request.urlopen(req, timeout=30, context=self.context) as resp:
            return resp.read()


def inspect(client: Client, interval: float, pod: str = "", plane: str = "") -> list[Row]:
    before = parse(client.get("/metrics").decode())
    t0 = time.monotonic()
    time.sleep(interval)
    after = parse(client.get("/metrics").decode())
    elapsed = max(time.monotonic() - t0, 1e-3)
    debug = json.loads(client.get("/debug/attachments"))
    return select(build_rows(before, after, debug, elapsed), pod, plane)


def add_inspect_command(sub) -> None:
    p = sub.add_parser("inspect", help="per-interface rates, drops, reasons and findings of a running collector")
    p.add_argument("--url", default="http://127.0.0.1:9808", help="the collector to read")
    p.add_argument("--pod", default="", help="only this pod (namespace/name or name)")
    p.add_argument("--plane", default="", help="only this plane")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between the two reads (rates)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument("--ca-file", default="", help="CA bundle for an https collector")
    p.add_argument("--token-file", default="", help="bearer token file")
    p.add_argument("--user", default="", help="basic auth as user:password")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    client = Client(args.url, args.ca_file, args.token_file, args.user)
    try:
        rows = inspect(client, args.interval, args.pod, args.plane)
    except OSError as err:
        print(printable(f"cannot read {args.url}: {err}"), file=sys.stderr)
        return 1
    if args.output == "json":
        # ensure_ascii: every control or non-ASCII character leaves as a \\u escape
        json.dump([r.__dict__ for r in rows], sys.stdout, indent=2, sort_keys=True, ensure_ascii=True)
        print()
    else:
        print(render_table(rows))
        print()
        print(plane_summary(rows))
    return 0 if rows or not (args.pod or args.plane) else 3
