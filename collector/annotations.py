"""Pods' Multus annotations → Pod / Attachment / Request records (pure, never raises).

Three annotations matter (Multus, NPWG multi-net spec v1.2):
- `k8s.v1.cni.cncf.io/network-status` (older Multus: `networks-status`): what
  was attached, a JSON list of NetworkStatus objects;
- `k8s.v1.cni.cncf.io/networks`: what was asked for, a comma list or a JSON list.

Annotations are written by many Multus versions, delegates and hands, so the
parsers keep every usable entry and name each problem with a reason from
ERROR_REASONS, one reason per occurrence (the lead counts them as
`planewatch_annotation_errors_total{reason}`). Every string kept is bounded in
length and encodable as UTF-8, so it is safe as a label value.
"""
from __future__ import annotations

import json
import re
from typing import Iterator, Mapping

from collector.model import Attachment, DeviceInfo, Pod, Request
from collector.netnames import missing_networks, qualified, resolve_attachments

STATUS_KEY = "k8s.v1.cni.cncf.io/network-status"
LEGACY_STATUS_KEY = "k8s.v1.cni.cncf.io/networks-status"
REQUEST_KEY = "k8s.v1.cni.cncf.io/networks"

# Kubernetes caps all annotations of one object at 256 KiB; a pods file has no
# cap, so anything beyond this is refused rather than decoded.
MAX_ANNOTATION_CHARS = 1 << 20
# A pod with more attachments than this is hostile or broken; bounding entries
# bounds the work, the errors and the series one pod can cause.
MAX_ENTRIES = 64
MAX_LIST = 64           # ips, gateways, dns lists of one entry
MAX_TEXT = 512          # any one string kept

# The fixed set of reasons (the `reason` label values).
INVALID_JSON = "invalid_json"                # not JSON (syntax, nesting too deep, not text)
TOO_LARGE = "too_large"                      # longer than MAX_ANNOTATION_CHARS, not decoded
NOT_A_LIST = "not_a_list"                    # JSON, but the top level is not a list
TOO_MANY_ENTRIES = "too_many_entries"        # more than MAX_ENTRIES items; the rest ignored
INVALID_ENTRY = "invalid_entry"              # a list item that is not an object; skipped
MISSING_NAME = "missing_name"                # status entry without name (or ""); kept, network ""
INVALID_FIELD = "invalid_field"              # a field of the wrong type/size; that field dropped
DUPLICATE_INTERFACE = "duplicate_interface"  # a later status entry for the same interface; dropped
INVALID_REQUEST = "invalid_request"          # a request that names no usable network; skipped
NIL_GATEWAY = "nil_gateway"                  # Go's "<nil>" printed for a nil route gateway; dropped
ERROR_REASONS = (INVALID_JSON, TOO_LARGE, NOT_A_LIST, TOO_MANY_ENTRIES, INVALID_ENTRY,
                 MISSING_NAME, INVALID_FIELD, DUPLICATE_INTERFACE, INVALID_REQUEST, NIL_GATEWAY)
# What Multus wrote for a route without gateway (fmt of a nil net.IP), seen with
# SR-IOV/RDMA attachments: not an address.
_GO_NIL = "<nil>"

# Multus's own check of comma-form items (parsePodNetworkObjectName).
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_IFNAMSIZ = 16
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_IN_IFNAME = frozenset(" \t\n\v\f\r/")


class FrozenMap(dict):
    """A dict that hashes, so an Attachment (a frozen dataclass) holding one stays
    hashable; still a dict for json.dumps. Built once here; treat as read-only."""

    def __hash__(self) -> int:  # type: ignore[override]  # dict is unhashable on purpose; this one is read-only
        return hash(frozenset(self.items()))


# ---- strings and typed fields ------------------------------------------------

def clean_text(value: object) -> str | None:
    """value as a label-safe string, or None when it is not a string or too long.

    JSON's `\\ud800` escapes decode to lone surrogates, which cannot be encoded
    as UTF-8 (the exposition would raise): they become U+FFFD.
    """
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        return None
    if value.isascii():
        return value
    return _SURROGATE.sub("\ufffd", value)


def _text(obj: Mapping, key: str, errors: list) -> str:
    value = obj.get(key)
    if value is None:               # absent and JSON null both mean "not given" (Go omitempty)
        return ""
    text = clean_text(value)
    if text is None:
        errors.append(INVALID_FIELD)
        return ""
    return text


def _texts(obj: Mapping, key: str, errors: list) -> tuple[str, ...]:
    """A list of strings; bad items are dropped (one invalid_field), good ones kept."""
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        errors.append(INVALID_FIELD)
        return ()
    kept = tuple(t for t in map(clean_text, value[:MAX_LIST]) if t is not None)
    if len(kept) != len(value):
        errors.append(INVALID_FIELD)
    return kept


def _flag(obj: Mapping, key: str, errors: list) -> bool:
    value = obj.get(key)
    if value is None or isinstance(value, bool):
        return value is True
    errors.append(INVALID_FIELD)
    return False


def _mtu(obj: Mapping, errors: list) -> int | None:
    value = obj.get("mtu")
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 31:
        return value
    errors.append(INVALID_FIELD)
    return None


def _mac(obj: Mapping, errors: list) -> str:
    # Lower case without blanks, as netlink reports it: kube-ovn writes upper case
    # and the device-info spec's example has a leading blank. Multi-net spec >= 1.2
    # moves an IPoIB link's 20-byte hardware address to `infiniband-guid`; netlink
    # reports it as the link's address, so it serves the same matching.
    mac = _text(obj, "mac", errors) or _text(obj, "infiniband-guid", errors)
    return mac.strip().lower()


def _object(obj: Mapping, key: str, errors: list) -> Mapping | None:
    value = obj.get(key)
    if value is None or isinstance(value, dict):
        return value
    errors.append(INVALID_FIELD)
    return None


# ---- network-status ----------------------------------------------------------

def _dns(entry: Mapping, errors: list) -> Mapping | None:
    """The CNI DNS object, reduced to its four known fields; None when empty."""
    dns = _object(entry, "dns", errors)
    if not dns:
        return None
    kept: dict[str, object] = {}
    for key in ("nameservers", "search", "options"):
        if dns.get(key) is not None:
            kept[key] = _texts(dns, key, errors)
    if dns.get("domain") is not None:
        kept["domain"] = _text(dns, "domain", errors)
    return FrozenMap(kept) if kept else None


# device-info sub-map → (JSON key, DeviceInfo field) pairs it may carry.
_DEVICE_FIELDS = {
    "pci": (("pci-address", "pci_address"), ("pf-pci-address", "pf_pci_address"),
            ("vhost-net", "vhost_net"), ("rdma-device", "rdma_device"),
            ("representor-device", "representor_device")),
    "vdpa": (("parent-device", "parent_device"), ("driver", "driver"), ("path", "path"),
             ("pci-address", "pci_address"), ("pf-pci-address", "pf_pci_address"),
             ("representor-device", "representor_device")),
    "vhost-user": (("mode", "mode"), ("path", "path")),
    "memif": (("role", "role"), ("path", "path"), ("mode", "mode")),
}


def _device_info(entry: Mapping, errors: list) -> DeviceInfo:
    """device-info flattened; every known sub-map present is read, the first value wins."""
    info = _object(entry, "device-info", errors)
    if not info:
        return DeviceInfo()
    fields = {"type": _text(info, "type", errors), "version": _text(info, "version", errors)}
    for submap, pairs in _DEVICE_FIELDS.items():
        sub = _object(info, submap, errors)
        if not sub:
            continue
        for key, name in pairs:
            value = _text(sub, key, errors)
            if value and not fields.get(name):
                fields[name] = value
    return DeviceInfo(**fields)


def _network_name(entry: Mapping, name: str, errors: list) -> str:
    """The name as written: "ns/name" for a NAD, bare for a delegate (the cluster
    network) or an older Multus's NAD name, which collector/netnames.py maps back.
    KubeVirt's fixtures carry the NAD's namespace in a `namespace` key."""
    entry_ns = _text(entry, "namespace", errors)
    if name and "/" not in name and entry_ns:
        return qualified(entry_ns, name)
    return name


def _gateways(entry: Mapping, errors: list) -> tuple[str, ...]:
    # The device-info spec's example says default-route; the Go type says gateway.
    key = "gateway" if entry.get("gateway") is not None else "default-route"
    gateways = _texts(entry, key, errors)
    kept = tuple(g for g in gateways if g.strip() != _GO_NIL)
    if len(kept) != len(gateways):
        errors.append(NIL_GATEWAY)
    return kept


def _attachment(entry: Mapping, namespace: str, pod: str, uid: str, errors: list) -> Attachment:
    default = _flag(entry, "default", errors)
    name = entry.get("name")
    # Calico and flannel configs often have no name: Multus then writes "" for the
    # cluster network. Normal there; only a NAD entry without a name is wrong.
    if name is None or (name == "" and not default):
        errors.append(MISSING_NAME)
    name = _text(entry, "name", errors)
    return Attachment(
        namespace=namespace, pod=pod, uid=uid,
        network=_network_name(entry, name, errors),
        written_name=name if "/" not in name and not _text(entry, "namespace", []) else "",
        interface=_text(entry, "interface", errors),
        default=default,
        mac=_mac(entry, errors),
        ips=_texts(entry, "ips", errors),
        gateway=_gateways(entry, errors),
        mtu=_mtu(entry, errors),
        dns=_dns(entry, errors),
        device=_device_info(entry, errors),
    )


def decode_json(value: object) -> tuple[object, str]:
    """JSON text (str or bytes) → (value, ""), or (None, INVALID_JSON | TOO_LARGE)."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    if not isinstance(value, str):
        return None, INVALID_JSON
    if len(value) > MAX_ANNOTATION_CHARS:
        return None, TOO_LARGE
    try:
        return json.loads(value), ""
    except (ValueError, RecursionError):    # RecursionError: nesting deeper than the interpreter's limit
        return None, INVALID_JSON


def _objects(value: object, errors: list) -> Iterator[Mapping]:
    """The JSON objects of a list annotation, bounded; other items are counted."""
    # A pods file in YAML may hold the value already decoded.
    items, reason = (value, "") if isinstance(value, (list, dict)) else decode_json(value)
    if reason:
        errors.append(reason)
        return
    if not isinstance(items, list):
        errors.append(NOT_A_LIST)
        return
    if len(items) > MAX_ENTRIES:
        errors.append(TOO_MANY_ENTRIES)
    for item in items[:MAX_ENTRIES]:
        if isinstance(item, dict):
            yield item
        else:
            errors.append(INVALID_ENTRY)


def parse_network_status(value: str, namespace: str, pod: str,
                         uid: str) -> tuple[tuple[Attachment, ...], tuple[str, ...]]:
    """The network-status annotation → (attachments in annotation order, error reasons).

    Entries without `interface` (the default network in Multus's quickstart, an
    SR-IOV VF bound to DPDK) keep interface "": the lead resolves them by MAC/IP.
    Of several entries for one interface the first is kept. Plane stays
    unclassified; the lead assigns planes.
    """
    errors: list[str] = []
    attachments: list[Attachment] = []
    seen: set[str] = set()
    for entry in _objects(value, errors):
        entry_errors: list[str] = []
        att = _attachment(entry, namespace, pod, uid, entry_errors)
        if att.interface and att.interface in seen:
            errors.append(DUPLICATE_INTERFACE)      # its own field errors no longer matter
            continue
        seen.add(att.interface)
        errors.extend(entry_errors)
        attachments.append(att)
    return tuple(attachments), tuple(errors)


# ---- networks (the request) --------------------------------------------------

def _request_item(item: str, namespace: str) -> Request | None:
    """One comma-form item, `[ns/]name[@ifname]`, checked the way Multus checks it."""
    parts = item.split("/")
    if len(parts) > 2:
        return None
    ns, rest = (parts[0].strip(), parts[1]) if len(parts) == 2 else ("", parts[0])
    name, _, ifname = rest.partition("@")
    name, ifname = name.strip(), ifname.strip()
    if "@" in ifname or not _DNS1123_LABEL.fullmatch(name):
        return None
    if ns and not _DNS1123_LABEL.fullmatch(ns):
        return None
    if len(ifname) >= _IFNAMSIZ or _NOT_IN_IFNAME.intersection(ifname):
        return None
    return Request(network=qualified(ns or namespace, name), interface=clean_text(ifname) or "")


def _comma_requests(value: str, namespace: str, errors: list) -> list[Request]:
    items = value.split(",")
    if len(items) > MAX_ENTRIES:
        errors.append(TOO_MANY_ENTRIES)
    requests = []
    for item in items[:MAX_ENTRIES]:
        request = _request_item(item.strip(), namespace) if len(item) <= MAX_TEXT else None
        if request is None:
            errors.append(INVALID_REQUEST)
        else:
            requests.append(request)
    return requests


def _json_request(element: Mapping, namespace: str, errors: list) -> Request | None:
    # Multus looks the NAD up by this name as is: a "/" in it can never match.
    name = clean_text(element.get("name"))
    if not name or "/" in name:
        errors.append(INVALID_REQUEST)
        return None
    ns = _text(element, "namespace", errors) or namespace
    return Request(network=qualified(ns, name),
                   interface=_text(element, "interface", errors),
                   ips=_texts(element, "ips", errors),
                   mac=_mac(element, errors),
                   default_route=_texts(element, "default-route", errors))


def parse_network_requests(value: str, namespace: str) -> tuple[tuple[Request, ...], tuple[str, ...]]:
    """The networks annotation → (requests in order, error reasons).

    JSON when the value contains any of `[{"` (Multus's own test), else a comma
    list. A bare name means the pod's namespace. Unusable items are skipped
    (Multus would refuse the whole pod; here the rest stays visible).
    """
    errors: list[str] = []
    if isinstance(value, str):
        if not value.strip():
            return (), ()
        if len(value) > MAX_ANNOTATION_CHARS:
            return (), (TOO_LARGE,)
        if not any(c in value for c in '[{"'):
            return tuple(_comma_requests(value, namespace, errors)), tuple(errors)
    requests = (_json_request(e, namespace, errors) for e in _objects(value, errors))
    return tuple(r for r in requests if r is not None), tuple(errors)


# ---- the Pod -----------------------------------------------------------------

def sub_mapping(obj: object, key: str) -> Mapping:
    """obj[key] when both are mappings, else {}: malformed objects read as empty."""
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _field(obj: Mapping, key: str) -> str:
    return clean_text(obj.get(key)) or ""


def pod_from_object(obj: Mapping) -> Pod:
    """A Pod (API raw object or pods-file entry, as a JSON dict) → Pod. Never raises.

    Prefers network-status over the legacy networks-status when both exist.
    `missing` is empty for hostNetwork pods: Multus never attaches networks to them.
    """
    meta, spec = sub_mapping(obj, "metadata"), sub_mapping(obj, "spec")
    status = sub_mapping(obj, "status")
    annotations = sub_mapping(meta, "annotations")
    namespace, name, uid = _field(meta, "namespace"), _field(meta, "name"), _field(meta, "uid")
    phase = _field(status, "phase")
    host_network = spec.get("hostNetwork") is True

    status_value = annotations.get(STATUS_KEY)
    if status_value is None:
        status_value = annotations.get(LEGACY_STATUS_KEY)
    has_status = status_value is not None
    attachments, status_errors = (parse_network_status(status_value, namespace, name, uid)
                                  if status_value is not None else ((), ()))
    request_value = annotations.get(REQUEST_KEY)
    requests, request_errors = (parse_network_requests(request_value, namespace)
                                if request_value is not None else ((), ()))
    # Without the NADs (the store maps config names later, collector/discovery.py).
    attachments, ambiguous = resolve_attachments(attachments, requests, namespace, {})
    missing = () if host_network else missing_networks(requests, attachments, has_status, phase, ambiguous)
    return Pod(
        namespace=namespace, name=name, uid=uid,
        node=_field(spec, "nodeName"),
        phase=phase,
        host_network=host_network,
        terminating=bool(meta.get("deletionTimestamp")),
        resource_version=_field(meta, "resourceVersion"),
        attachments=attachments,
        requests=requests,
        missing=missing,
        has_status=has_status,
        errors=status_errors + request_errors,
    )
