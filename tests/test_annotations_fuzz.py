"""Hostile annotations (hypothesis): nothing escapes, valid entries survive, errors
are reported, and label values made from hostile names render and parse back.

10 800 generated annotations in all (the runs() below), in well under a minute."""
from __future__ import annotations

import json
import os
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from collector.annotations import (
    ERROR_REASONS,
    MAX_ENTRIES,
    MAX_TEXT,
    parse_network_requests,
    parse_network_status,
    pod_from_object,
)
from collector.family import GAUGE, Family
from collector.model import ATTACHMENT_LABELS, Attachment, Pod, Request
from exporters.exposition import render

NS, POD, UID = "ns", "pod", "uid"


def runs(n: int) -> settings:
    # the quick tier (make test-quick) tries a tenth of the examples; make test all of them
    if os.environ.get("PLANEWATCH_QUICK"):
        n = max(n // 10, 50)
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Names as a hostile (or just creative) user might write them: quotes, backslashes,
# newlines, any Unicode; no surrogates (those are tested apart, they are rewritten).
hostile_text = (st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
                | st.sampled_from(['"', "\\", "\n", '\\"', "a\nb", '"}]', "\u2028", "\x00", "\r\n",
                                   "ns/na\"me", "\U0001f600", "{{"]))
ip = st.ip_addresses().map(str) | st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(
    lambda t: f"{t[0]}/{t[1]}")
mac = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | hostile_text
# Deep nesting is cheap to build by hand and slow to draw.
deep = st.tuples(st.integers(1, 400), scalars).map(
    lambda t: json.loads("[" * t[0] + json.dumps(t[1]) + "]" * t[0]))
# Any JSON value, including deep and wide ones.
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4),
    max_leaves=8) | deep
non_objects = scalars | st.lists(scalars, max_size=4) | deep


@st.composite
def valid_entries(draw, count):
    """Well-formed status entries with distinct interfaces net0..netN."""
    entries = []
    for i in range(count):
        entry = {"name": draw(hostile_text), "interface": f"net{i}", "ips": draw(st.lists(ip, max_size=3)),
                 "mac": draw(mac), "dns": {}}
        if draw(st.booleans()):
            entry["mtu"] = draw(st.integers(68, 65535))
        if draw(st.booleans()):
            entry["device-info"] = {"type": "pci", "version": "1.1.0",
                                    "pci": {"pci-address": draw(hostile_text)}}
        entries.append(entry)
    return entries


WRONG = {  # field → a strategy of values of the wrong type for it
    "name": (st.integers() | st.lists(st.integers(), max_size=2)
             | st.text(min_size=MAX_TEXT + 1, max_size=MAX_TEXT + 2)),
    "interface": st.integers() | st.booleans() | st.dictionaries(st.text(max_size=2), st.none(), max_size=2),
    "ips": (hostile_text | st.integers()
            | st.lists(st.integers() | st.lists(st.none()), min_size=1, max_size=3)),
    "mac": st.integers() | st.lists(st.text(max_size=3), max_size=2),
    "mtu": st.text(max_size=5) | st.floats() | st.booleans() | st.integers(max_value=0),
    "default": st.text(max_size=5) | st.integers(),
    "dns": st.lists(st.integers(), max_size=2) | st.text(max_size=4) | st.just({"nameservers": "10.0.0.1"}),
    "device-info": st.text(max_size=4) | st.integers() | st.just({"type": "pci", "pci": ["x"]}),
    "gateway": hostile_text | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
}


@st.composite
def broken_entries(draw):
    """An object with at least one field of the wrong type (and no net<N> interface)."""
    entry = {"name": draw(hostile_text), "interface": "h" + draw(st.text(max_size=5))}
    for key in draw(st.lists(st.sampled_from(sorted(WRONG)), min_size=1, max_size=4, unique=True)):
        entry[key] = draw(WRONG[key])
    return entry



def encode(entries, draw) -> str:
    return json.dumps(entries, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))


@runs(2500)
@given(st.data())
def test_valid_entries_survive_hostile_neighbours(data):
    valid = data.draw(valid_entries(data.draw(st.integers(0, 4))))
    broken = data.draw(st.lists(broken_entries(), max_size=3))
    junk = data.draw(st.lists(non_objects, max_size=3))
    mixed = data.draw(st.permutations([("v", e) for e in valid] + [("b", e) for e in broken]
                                      + [("j", e) for e in junk]))
    attachments, errors = parse_network_status(encode([e for _, e in mixed], data.draw), NS, POD, UID)

    kept = {a.interface: a for a in attachments}
    for entry in valid:
        att = kept[entry["interface"]]
        assert att.ips == tuple(entry["ips"]) and att.mac == entry["mac"]
        assert att.network.endswith(entry["name"])
        assert att.mtu == entry.get("mtu")
        assert att.device.pci_address == entry.get("device-info", {}).get("pci", {}).get("pci-address", "")
    counts = Counter(errors)
    assert set(counts) <= set(ERROR_REASONS)
    assert counts["invalid_entry"] == len(junk)
    # each broken object has a bad field, unless it repeats an interface and is dropped whole
    assert counts["invalid_field"] >= len(broken) - counts["duplicate_interface"]
    assert len(attachments) + counts["duplicate_interface"] == len(valid) + len(broken)


@runs(2000)
@given(json_values)
def test_any_json_value_is_survived(value):
    for text in (json.dumps(value), json.dumps([value]), json.dumps([value] * 3)):
        attachments, errors = parse_network_status(text, NS, POD, UID)
        assert all(isinstance(a, Attachment) for a in attachments)
        assert set(errors) <= set(ERROR_REASONS)
        requests, errors = parse_network_requests(text, NS)
        assert all(isinstance(r, Request) for r in requests)
        assert set(errors) <= set(ERROR_REASONS)


@runs(4000)
@given(st.text(max_size=200) | st.binary(max_size=200)
       | st.integers(1, 5000).map(lambda n: "[" * n + '{"name": "x"}' + "]" * n)
       | st.integers(1, 5000).map(lambda n: '[{"name": "x", "dns": ' + '{"a": ' * n + "1" + "}" * n + "}]"))
def test_any_text_is_survived(text):
    attachments, errors = parse_network_status(text, NS, POD, UID)
    assert set(errors) <= set(ERROR_REASONS)
    if not attachments and not errors:                  # nothing usable is always explained...
        assert json.loads(text) == []                   # ...unless there was nothing
    requests, errors = parse_network_requests(text, NS)
    assert set(errors) <= set(ERROR_REASONS)


@runs(300)
@given(st.integers(MAX_ENTRIES + 1, 50 * MAX_ENTRIES), hostile_text, scalars | st.lists(scalars, max_size=3))
def test_huge_lists_are_capped(n, name, junk):
    # Built by hand: drawing hundreds of entries would dominate the run time. (Small
    # junk: thousands of deep items would pass MAX_ANNOTATION_CHARS, a different case.)
    entries = [{"name": name, "interface": f"net{i}"} if i % 2 == 0 else junk for i in range(n)]
    attachments, errors = parse_network_status(json.dumps(entries), NS, POD, UID)
    assert [a.interface for a in attachments] == [f"net{i}" for i in range(0, MAX_ENTRIES, 2)]
    assert Counter(errors) == {"too_many_entries": 1, "invalid_entry": MAX_ENTRIES // 2}


# ---- hostile names as label values ------------------------------------------------

def rendered_label_sets(pods: list[Pod]) -> set[tuple]:
    fam = Family("planewatch_fuzz_info", GAUGE, "fuzz", ATTACHMENT_LABELS)
    for pod in pods:
        for att in pod.attachments:
            fam.add(att.label_values(), 1)
    text = render([fam]).decode("utf-8")
    parsed = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed.add(tuple(sample.labels[name] for name in ATTACHMENT_LABELS))
    return parsed


surrogates = st.sampled_from(["\\ud800", "\\udfff", "a\\udc00b", "\\ud83d\\ude00", "\\u0000", "\\n\\\"\\\\"])


@runs(2000)
@given(st.data())
def test_hostile_names_render_and_parse_back(data):
    names = data.draw(st.lists(hostile_text, min_size=1, max_size=5))
    raw = data.draw(surrogates)                    # JSON escapes, lone surrogates included
    status_text = json.dumps([{"name": n, "interface": n[:15]} for n in names])
    status_text = status_text[:-1] + f', {{"name": "x{raw}", "interface": "r{raw}"}}]'
    pod_name = data.draw(hostile_text | st.just("pod\ud800"))     # a lone surrogate straight from YAML
    obj = {"metadata": {"namespace": data.draw(hostile_text), "name": pod_name,
                        "uid": "u", "annotations": {"k8s.v1.cni.cncf.io/network-status": status_text}}}
    pod = pod_from_object(obj)
    expected = {att.label_values() for att in pod.attachments}
    assert len(pod.attachments) >= 1
    assert rendered_label_sets([pod]) == expected
