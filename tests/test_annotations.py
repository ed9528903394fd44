"""Pods' Multus annotations: real-world samples (tests/fixtures/annotations/*.yaml)
and tables of quirks, request forms and missing networks."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from collector.annotations import (
    ERROR_REASONS,
    MAX_ANNOTATION_CHARS,
    MAX_ENTRIES,
    MAX_TEXT,
    missing_networks,
    parse_network_requests,
    parse_network_status,
    pod_from_object,
)
from collector.model import UNCLASSIFIED, Attachment, DeviceInfo, Request

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "annotations").glob("*.yaml"))
NS, POD, UID = "default", "p", "u-1"


def expected_attachment(meta: dict, spec: dict) -> Attachment:
    fields = dict(spec)
    fields["device"] = DeviceInfo(**fields.pop("device", {}))
    for key in ("ips", "gateway"):
        if key in fields:
            fields[key] = tuple(fields[key])
    return Attachment(namespace=meta["namespace"], pod=meta["name"], uid=meta["uid"], **fields)


def expected_request(spec: dict) -> Request:
    return Request(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})


def test_fixtures_are_there():
    assert len(FIXTURES) >= 12


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_real_world_sample(path):
    case = yaml.safe_load(path.read_text())
    meta, expected = case["pod"]["metadata"], case["expected"]
    pod = pod_from_object(case["pod"])

    assert (pod.namespace, pod.name, pod.uid) == (meta["namespace"], meta["name"], meta["uid"])
    assert pod.has_status
    assert pod.attachments == tuple(expected_attachment(meta, a) for a in expected["attachments"])
    assert all(a.plane == UNCLASSIFIED for a in pod.attachments)
    assert pod.requests == tuple(expected_request(r) for r in expected["requests"])
    assert pod.missing == tuple(expected["missing"])
    assert pod.errors == tuple(expected["errors"])
    for network, addresses in expected.get("addresses", {}).items():
        att = next(a for a in pod.attachments if a.network == network)
        assert att.addresses == tuple(addresses)


# ---- network-status quirks and hostile values --------------------------------

def status(entries) -> str:
    return json.dumps(entries)


def parse(value):
    return parse_network_status(value, NS, POD, UID)


@pytest.mark.parametrize("value, reasons", [
    ("", [("invalid_json", 1)]),
    ("not json", [("invalid_json", 1)]),
    ('[{"name": "a",}]', [("invalid_json", 1)]),
    ("[" * 100_000 + "]" * 100_000, [("invalid_json", 1)]),      # deeper than the recursion limit
    ('{"name": "a", "interface": "net1"}', [("not_a_list", 1)]),
    ('"[]"', [("not_a_list", 1)]),
    ("null", [("not_a_list", 1)]),
    ("42", [("not_a_list", 1)]),
    ('[1, "x", null, [], true]', [("invalid_entry", 5)]),
    ("[" + " " * MAX_ANNOTATION_CHARS + "]", [("too_large", 1)]),
    (None, [("invalid_json", 1)]),
    (12, [("invalid_json", 1)]),
], ids=["empty", "text", "trailing-comma", "deep", "object", "string", "null", "number",
        "no-objects", "too-large", "none", "int"])
def test_unusable_status_gives_no_attachment(value, reasons):
    attachments, errors = parse(value)
    assert attachments == ()
    assert sorted(Counter(errors).items()) == sorted(reasons)


def test_non_objects_are_skipped_and_objects_kept():
    attachments, errors = parse('[1, {"name": "a", "interface": "net1"}, "x", '
                                '{"name": "b", "interface": "net2"}]')
    assert [a.network for a in attachments] == ["a", "b"]    # bare: mapped later (netnames)
    assert errors == ("invalid_entry", "invalid_entry")


def test_wrong_types_drop_only_their_field():
    entry = {"name": "a", "interface": 5, "ips": "10.0.0.1", "mac": 7, "mtu": "1500",
             "default": "true", "dns": [], "device-info": "pci", "gateway": {}}
    (att,), errors = parse(status([entry]))
    assert errors == ("invalid_field",) * 8
    assert att == Attachment(NS, POD, UID, network="a", interface="")


def test_bad_list_items_are_dropped_good_ones_kept():
    (att,), errors = parse(status([{"name": "a", "interface": "net1",
                                    "ips": ["10.0.0.1", 5, None, "fd00::1"]}]))
    assert att.ips == ("10.0.0.1", "fd00::1")
    assert errors == ("invalid_field",)


@pytest.mark.parametrize("mtu, kept", [(1500, 1500), (9000, 9000), (True, None), (-1, None),
                                       (0, None), (1500.0, None), (1 << 40, None), ("1500", None)])
def test_mtu_must_be_a_positive_int(mtu, kept):
    (att,), errors = parse(status([{"name": "a", "interface": "net1", "mtu": mtu}]))
    assert att.mtu == kept
    assert errors == (() if kept else ("invalid_field",))


def test_nulls_mean_absent_not_invalid():
    entry = {"name": "a", "interface": None, "ips": None, "mac": None, "mtu": None,
             "default": None, "dns": None, "device-info": None, "gateway": None}
    (att,), errors = parse(status([entry]))
    assert errors == ()
    assert att == Attachment(NS, POD, UID, network="a", interface="")


@pytest.mark.parametrize("entry, network", [
    ({"name": "macvlan-conf", "interface": "net1"}, "macvlan-conf"),   # bare: a delegate unless requested
    ({"name": "test1", "namespace": "other", "interface": "net2"}, "other/test1"),   # KubeVirt's namespace key
    ({"name": "other/macvlan-conf", "interface": "net1"}, "other/macvlan-conf"),
    ({"name": "cbr0", "default": True}, "cbr0"),                  # the default network keeps its name
    ({"name": "kube-system/calico", "default": True}, "kube-system/calico"),
    ({"name": "", "interface": "net1"}, ""),
])
def test_network_names(entry, network):
    (att,), _ = parse(status([entry]))
    assert att.network == network


def test_bare_name_without_pod_namespace_stays_bare():
    (att,), _ = parse_network_status(status([{"name": "a", "interface": "net1"}]), "", POD, UID)
    assert att.network == "a"


def test_missing_name_is_kept_and_counted():
    attachments, errors = parse(status([{"interface": "net1", "ips": ["10.0.0.1"]},
                                        {"name": None, "interface": "net2"},
                                        {"name": 5, "interface": "net3"}]))
    assert [(a.network, a.interface) for a in attachments] == [("", "net1"), ("", "net2"), ("", "net3")]
    assert errors == ("missing_name", "missing_name", "invalid_field")


def test_duplicate_interface_keeps_the_first():
    attachments, errors = parse(status([{"name": "a", "interface": "net1", "ips": ["10.0.0.1"]},
                                        {"name": "b", "interface": "net1", "ips": ["10.0.0.2"]},
                                        {"name": "c", "interface": "net2"}]))
    assert [(a.network, a.ips) for a in attachments] == [("a", ("10.0.0.1",)), ("c", ())]
    assert errors == ("duplicate_interface",)


def test_entries_without_interface_are_never_duplicates():
    attachments, errors = parse(status([{"name": "cbr0", "default": True}, {"name": "sriov-a", "dns": {}},
                                        {"name": "sriov-b", "dns": {}}]))
    assert [a.interface for a in attachments] == ["", "", ""]
    assert errors == ()


@pytest.mark.parametrize("entry, gateway", [
    ({"gateway": ["10.0.0.1"]}, ("10.0.0.1",)),
    ({"default-route": ["10.0.0.1", "fd00::1"]}, ("10.0.0.1", "fd00::1")),
    ({"gateway": ["10.0.0.1"], "default-route": ["10.9.9.9"]}, ("10.0.0.1",)),
    ({"gateway": None, "default-route": ["10.9.9.9"]}, ("10.9.9.9",)),
])
def test_gateway_or_default_route(entry, gateway):
    (att,), _ = parse(status([{"name": "a", "interface": "net1", **entry}]))
    assert att.gateway == gateway


def test_ips_keep_their_prefix_and_addresses_strip_it():
    ips = ["10.1.1.5/24", "fd00::5/64", "10.1.1.6"]
    (att,), _ = parse(status([{"name": "a", "interface": "net1", "ips": ips}]))
    assert att.ips == ("10.1.1.5/24", "fd00::5/64", "10.1.1.6")
    assert att.addresses == ("10.1.1.5", "fd00::5", "10.1.1.6")


def test_dns_is_reduced_and_hashable():
    dns = {"nameservers": ["10.96.0.10"], "domain": "cluster.local", "search": ["svc.cluster.local"],
           "options": ["ndots:5"], "extra": {"deep": [1]}}
    (att,), errors = parse(status([{"name": "a", "interface": "net1", "dns": dns}]))
    assert att.dns == {"nameservers": ("10.96.0.10",), "domain": "cluster.local",
                       "search": ("svc.cluster.local",), "options": ("ndots:5",)}
    assert errors == ()
    assert hash(att) == hash(parse(status([{"name": "a", "interface": "net1", "dns": dns}]))[0][0])
    assert json.loads(json.dumps(att.dns))["domain"] == "cluster.local"


def test_empty_dns_is_none():
    (att,), errors = parse(status([{"name": "a", "interface": "net1", "dns": {}}]))
    assert att.dns is None and errors == ()


@pytest.mark.parametrize("info, device, errors", [
    ({"type": "memif", "version": "1.1.0",
      "memif": {"role": "master", "path": "/run/memif.sock", "mode": "ip"}},
     DeviceInfo(type="memif", version="1.1.0", role="master", path="/run/memif.sock", mode="ip"), ()),
    ({"type": "pci", "version": "1.1.0", "pci": {"pci-address": "0000:18:02.5", "rdma-device": "mlx5_3",
                                                  "representor-device": "eth3"}},
     DeviceInfo(type="pci", version="1.1.0", pci_address="0000:18:02.5", rdma_device="mlx5_3",
                representor_device="eth3"), ()),
    ({"type": "pci", "pci": "0000:18:02.5"}, DeviceInfo(type="pci"), ("invalid_field",)),
    ({"type": 1, "version": "1.1.0"}, DeviceInfo(version="1.1.0"), ("invalid_field",)),
    ({"type": "pci", "pci": {"pci-address": 5, "pf-pci-address": "0000:18:00.0"}},
     DeviceInfo(type="pci", pf_pci_address="0000:18:00.0"), ("invalid_field",)),
])
def test_device_info(info, device, errors):
    (att,), got = parse(status([{"name": "a", "interface": "net1", "device-info": info}]))
    assert att.device == device
    assert got == errors


def test_mac_is_lower_case_without_blanks():
    (att,), _ = parse(status([{"name": "a", "interface": "net1", "mac": " 00:00:00:BE:39:E2 "}]))
    assert att.mac == "00:00:00:be:39:e2"


def test_too_many_entries_are_capped_and_counted():
    entries = [{"name": f"n{i}", "interface": f"net{i}"} for i in range(1000)]
    attachments, errors = parse(status(entries))
    assert len(attachments) == MAX_ENTRIES
    assert attachments[-1].interface == f"net{MAX_ENTRIES - 1}"
    assert errors == ("too_many_entries",)


def test_long_strings_are_dropped():
    (att,), errors = parse(status([{"name": "a", "interface": "x" * (MAX_TEXT + 1), "ips": ["1" * 10_000]}]))
    assert (att.interface, att.ips) == ("", ())
    assert errors == ("invalid_field", "invalid_field")


def test_lone_surrogates_become_encodable():
    (att,), errors = parse('[{"name": "a\\ud800b", "interface": "net\\udfff"}]')
    assert att.network == "a\ufffdb"
    (att.network + att.interface).encode("utf-8")
    assert errors == ()


def test_already_decoded_value_is_accepted():
    # A pods file written in YAML may carry the annotation as a list, not a JSON string.
    attachments, errors = parse([{"name": "a", "interface": "net1"}])
    assert [a.network for a in attachments] == ["a"] and errors == ()


def test_bytes_value_is_accepted():
    attachments, _ = parse(b'[{"name": "a", "interface": "net1"}]')
    assert attachments[0].interface == "net1"


# ---- requests ------------------------------------------------------------------

@pytest.mark.parametrize("value, requests, errors", [
    ("macvlan-conf", [("default/macvlan-conf", "")], []),
    ("macvlan-conf,macvlan-conf", [("default/macvlan-conf", "")] * 2, []),
    (" a ,  b/c@net5 , d@net6", [("default/a", ""), ("b/c", "net5"), ("default/d", "net6")], []),
    ("ns1 / a @ net5", [("ns1/a", "net5")], []),
    ("/a", [("default/a", "")], []),
    ("a@", [("default/a", "")], []),
    ("a,,b,", [("default/a", ""), ("default/b", "")], ["invalid_request"] * 2),
    ("A", [], ["invalid_request"]),
    ("my.net", [], ["invalid_request"]),
    ("-a", [], ["invalid_request"]),
    ("a/b/c", [], ["invalid_request"]),
    ("a@b@c", [], ["invalid_request"]),
    ("@net1", [], ["invalid_request"]),
    ("a@averylongifname1", [], ["invalid_request"]),
    ("a@net 1", [], ["invalid_request"]),
    ("", [], []),
    ("   ", [], []),
])
def test_comma_requests(value, requests, errors):
    got, reasons = parse_network_requests(value, NS)
    assert [(r.network, r.interface) for r in got] == requests
    assert list(reasons) == errors


def test_json_requests():
    value = json.dumps([
        {"name": "a"},
        {"name": "b", "namespace": "x", "interface": "net2", "ips": ["10.1.1.5/24"],
         "mac": "02:00:00:00:00:0B", "default-route": ["10.1.1.1"], "cni-args": {"k": "v"}},
    ])
    got, errors = parse_network_requests(value, NS)
    assert got == (Request("default/a"),
                   Request("x/b", interface="net2", ips=("10.1.1.5/24",), mac="02:00:00:00:00:0b",
                           default_route=("10.1.1.1",)))
    assert errors == ()


@pytest.mark.parametrize("value, networks, errors", [
    ('{"name": "a"}', [], ["not_a_list"]),
    ('[{"name": ', [], ["invalid_json"]),
    ('[{"namespace": "x"}, {"name": "b"}]', ["default/b"], ["invalid_request"]),
    ('[{"name": "x/a"}]', [], ["invalid_request"]),
    ('[{"name": ""}, 5, {"name": "b"}]', ["default/b"], ["invalid_request", "invalid_entry"]),
    ('[{"name": "a", "namespace": 5}]', ["default/a"], ["invalid_field"]),
    ('[{"name": "a", "ips": "10.0.0.1"}]', ["default/a"], ["invalid_field"]),
    ('"a"', [], ["not_a_list"]),
])
def test_json_request_quirks(value, networks, errors):
    got, reasons = parse_network_requests(value, NS)
    assert [r.network for r in got] == networks
    assert list(reasons) == errors


def test_too_many_requests_are_capped():
    got, errors = parse_network_requests(",".join(f"n{i}" for i in range(200)), NS)
    assert len(got) == MAX_ENTRIES and errors == ("too_many_entries",)
    got, errors = parse_network_requests(json.dumps([{"name": f"n{i}"} for i in range(200)]), NS)
    assert len(got) == MAX_ENTRIES and errors == ("too_many_entries",)


# ---- missing networks ----------------------------------------------------------

def atts(*networks):
    return tuple(Attachment(NS, POD, UID, network=n, interface=f"net{i}") for i, n in enumerate(networks))


def reqs(*networks):
    return tuple(Request(n) for n in networks)


@pytest.mark.parametrize("requests, attachments, has_status, phase, missing", [
    (reqs("default/a"), (), False, "Pending", ()),                      # not attached yet: nothing missing
    (reqs("default/a"), (), False, "", ()),
    (reqs("default/a"), (), False, "Succeeded", ()),
    (reqs("default/a", "default/b"), (), False, "Running", ("default/a", "default/b")),
    (reqs("default/a", "default/b"), atts("cbr0", "default/a"), True, "Pending", ("default/b",)),
    (reqs("default/a", "default/a"), atts("cbr0", "default/a"), True, "Running", ("default/a",)),
    (reqs("default/a", "default/a"), atts("default/a", "default/a"), True, "Running", ()),
    (reqs("default/a"), atts("default/a", "default/a"), True, "Running", ()),
    ((), atts("cbr0"), True, "Running", ()),
])
def test_missing_networks(requests, attachments, has_status, phase, missing):
    assert missing_networks(requests, attachments, has_status, phase) == missing


# ---- the Pod object --------------------------------------------------------------

def pod_object(annotations=None, **overrides):
    obj = {"metadata": {"namespace": NS, "name": POD, "uid": UID, "resourceVersion": "42",
                        "annotations": annotations or {}},
           "spec": {"nodeName": "node-1"}, "status": {"phase": "Running"}}
    for path, value in overrides.items():
        section, key = path.split("__")
        obj[section][key] = value
    return obj


def test_pod_fields():
    pod = pod_from_object(pod_object(metadata__deletionTimestamp="2024-01-01T00:00:00Z"))
    assert (pod.namespace, pod.name, pod.uid, pod.node, pod.phase) == (NS, POD, UID, "node-1", "Running")
    assert (pod.resource_version, pod.terminating, pod.host_network) == ("42", True, False)
    assert (pod.has_status, pod.attachments, pod.requests, pod.missing, pod.errors) == (False, (), (), (), ())


def test_new_status_key_wins_over_legacy():
    pod = pod_from_object(pod_object({
        "k8s.v1.cni.cncf.io/network-status": status([{"name": "new", "interface": "net1"}]),
        "k8s.v1.cni.cncf.io/networks-status": status([{"name": "old", "interface": "net1"}]),
    }))
    assert [a.network for a in pod.attachments] == ["default/new"]


def test_running_pod_without_status_misses_its_requests():
    pod = pod_from_object(pod_object({"k8s.v1.cni.cncf.io/networks": "a, b"}))
    assert pod.missing == ("default/a", "default/b") and not pod.has_status


def test_host_network_pod_misses_nothing():
    pod = pod_from_object(pod_object({"k8s.v1.cni.cncf.io/networks": "a"}, spec__hostNetwork=True))
    assert pod.host_network and pod.missing == ()


def test_errors_of_both_annotations_are_reported():
    pod = pod_from_object(pod_object({"k8s.v1.cni.cncf.io/network-status": "[1]",
                                      "k8s.v1.cni.cncf.io/networks": "A"}))
    assert pod.errors == ("invalid_entry", "invalid_request")
    assert set(pod.errors) <= set(ERROR_REASONS)


@pytest.mark.parametrize("obj", [
    {}, None, [], "pod", 5, {"metadata": None}, {"metadata": "x", "spec": [], "status": 3},
    {"metadata": {"name": 5, "namespace": ["x"], "uid": {}, "annotations": ["a"]}},
    {"metadata": {"annotations": {"k8s.v1.cni.cncf.io/network-status": 5,
                                  "k8s.v1.cni.cncf.io/networks": ["x"]}}},
    {"spec": {"hostNetwork": "true", "nodeName": 1}, "status": {"phase": None}},
])
def test_malformed_objects_do_not_crash(obj):
    pod = pod_from_object(obj)
    assert isinstance(pod.namespace, str) and isinstance(pod.name, str) and isinstance(pod.uid, str)
    assert pod.host_network is False
    assert set(pod.errors) <= set(ERROR_REASONS)
