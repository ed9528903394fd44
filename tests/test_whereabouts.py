"""Whereabouts pool arithmetic and parsing (collector/whereabouts.py), table-driven."""
from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess

import pytest

from collector.intervals import count, merge
from collector.whereabouts import (
    INVALID_ALLOCATION,
    INVALID_OFFSET,
    INVALID_PODREF,
    INVALID_RANGE,
    OFFSET_OUT_OF_RANGE,
    index_ranges,
    normalize_range,
    parse_pool,
    parse_reservation,
    pool_network_name,
    pool_stats,
)
from collector.whereabouts_metrics import ippool_families
from collector.whereabouts_ranges import nad_ranges, parse_range, usable_bounds
from exporters.cluster import ClusterState
from exporters.exposition import render
from lab.objects import example_ippool
from tests.conftest import parse_metrics, series


def size_of(ipam: dict) -> int:
    rc = parse_range(ipam)
    assert rc is not None, ipam
    return count(rc.allocatable())


# ---------------------------------------------------------------- allocatable sizes

SIZES = {
    # IPv4: network and broadcast are not handed out...
    "v4 /24": ({"range": "10.75.0.0/24"}, 254),
    "v4 /30": ({"range": "10.75.0.0/30"}, 2),
    # Whereabouts <= v0.9.x refuses ranges with fewer than two usable addresses:
    # the IPPool exists, nothing is ever allocated from it.
    "v4 /31": ({"range": "10.75.0.0/31"}, 0),
    "v4 /32": ({"range": "10.75.0.7/32"}, 0),
    # Whereabouts skips the first and last address of IPv6 ranges too.
    "v6 /120": ({"range": "fd00:75::/120"}, 254),
    "v6 /127": ({"range": "fd00:75::/127"}, 0),
    "v6 /128": ({"range": "fd00:75::1/128"}, 0),
    "v6 /64 exact": ({"range": "fd00:75::/64"}, 2**64 - 2),
    "host part ignored": ({"range": "10.75.0.77/24"}, 254),
    # Exclusions: whole subnets (network and broadcast included), or bare IPs.
    "exclude /28 at start": ({"range": "10.75.0.0/24", "exclude": ["10.75.0.0/28"]}, 254 - 15),
    "exclude bare IP": ({"range": "10.75.0.0/24", "exclude": ["10.75.0.9"]}, 253),
    "exclude masked like Go": ({"range": "10.75.0.0/24", "exclude": ["10.75.0.9/30"]}, 250),
    "overlapping excludes": ({"range": "10.75.0.0/24", "exclude": ["10.75.0.0/28", "10.75.0.8/29",
                                                                   "10.75.0.12"]}, 254 - 15),
    "exclude outside range": ({"range": "10.75.0.0/24", "exclude": ["10.76.0.0/24"]}, 254),
    "exclude other family": ({"range": "10.75.0.0/24", "exclude": ["fd00::/8"]}, 254),
    "exclude everything": ({"range": "10.75.0.0/24", "exclude": ["10.0.0.0/8"]}, 0),
    "v6 exclude": ({"range": "fd00:75::/120", "exclude": ["fd00:75::/124"]}, 254 - 15),
    # The upstream README's example: .225-.238 usable, minus .228-.231 and .236.
    "README example": ({"range": "192.168.2.225/28",
                        "exclude": ["192.168.2.229/30", "192.168.2.236/32"]}, 9),
    # range_start/range_end: honoured inside the usable bounds only.
    "start and end": ({"range": "10.75.0.0/24", "range_start": "10.75.0.10",
                       "range_end": "10.75.0.20"}, 11),
    "start only": ({"range": "10.75.0.0/24", "range_start": "10.75.0.200"}, 55),
    "end only": ({"range": "10.75.0.0/24", "range_end": "10.75.0.100"}, 100),
    "start outside ignored": ({"range": "10.75.0.0/24", "range_start": "10.76.0.10"}, 254),
    "start on network ignored": ({"range": "10.75.0.0/24", "range_start": "10.75.0.0"}, 254),
    "end below start ignored": ({"range": "10.75.0.0/24", "range_start": "10.75.0.10",
                                 "range_end": "10.75.0.5"}, 245),
    "start of other family ignored": ({"range": "10.75.0.0/24", "range_start": "fd00::1"}, 254),
    "start/end with exclude": ({"range": "10.75.0.0/24", "range_start": "10.75.0.10",
                                "range_end": "10.75.0.20", "exclude": ["10.75.0.16/30"]}, 7),
    "A-B/len syntax": ({"range": "10.75.0.50-10.75.0.59/24"}, 10),
    "A-B/len overrides start/end": ({"range": "10.75.0.50-10.75.0.59/24", "range_start": "10.75.0.1"}, 10),
}


@pytest.mark.parametrize("ipam,expected", SIZES.values(), ids=SIZES.keys())
def test_allocatable_size(ipam, expected):
    assert size_of(ipam) == expected


REFUSED = {
    "no range": {},
    "range not a CIDR": {"range": "10.75.0.0/33"},
    "range garbage": {"range": "pool-a"},
    "range not text": {"range": 42},
    "malformed exclude": {"range": "10.75.0.0/24", "exclude": ["10.75.0.0/28", "nope"]},
    "exclude not a list": {"range": "10.75.0.0/24", "exclude": "10.75.0.0/28"},
    "malformed range_start": {"range": "10.75.0.0/24", "range_start": "10.75.0.300"},
    "malformed A-B start": {"range": "x-10.75.0.9/24"},
}


@pytest.mark.parametrize("ipam", REFUSED.values(), ids=REFUSED.keys())
def test_configs_whereabouts_would_refuse_are_skipped(ipam):
    assert parse_range(ipam) is None


def test_usable_bounds_are_inclusive_integers():
    net = ipaddress.ip_network("10.75.0.0/30")
    assert usable_bounds(net) == (int(ipaddress.ip_address("10.75.0.1")),
                                  int(ipaddress.ip_address("10.75.0.2")))
    assert merge([(5, 9), (1, 3), (4, 4), (20, 21)]) == [(1, 9), (20, 21)]


# ---------------------------------------------------------------- NADs

def nad(namespace: str, name: str, config) -> dict:
    return {"metadata": {"namespace": namespace, "name": name},
            "spec": {"config": json.dumps(config) if isinstance(config, dict) else config}}


def test_nad_ranges_reads_range_and_ip_ranges_with_their_own_exclusions():
    obj = nad("telco", "sig", {"cniVersion": "0.3.1", "type": "macvlan", "master": "eth1", "ipam": {
        "type": "whereabouts", "network_name": "blue", "range": "10.75.0.0/24",
        "exclude": ["10.75.0.0/28"],                   # belongs to the top-level range only
        "ipRanges": [{"range": "10.76.0.0/24"},
                     {"range": "fd00:76::/120", "exclude": ["fd00:76::/124"]}]}})
    got = {str(rc.network): (count(rc.allocatable()), rc.network_name, rc.nad) for rc in nad_ranges(obj)}
    assert got == {"10.75.0.0/24": (239, "blue", "telco/sig"),
                   "10.76.0.0/24": (254, "blue", "telco/sig"),
                   "fd00:76::/120": (239, "blue", "telco/sig")}


NO_RANGES = {
    "host-local": {"type": "bridge", "ipam": {"type": "host-local", "subnet": "10.9.0.0/24"}},
    "no ipam": {"type": "macvlan"},
    "broken JSON": '{"type": "macvlan", "ipam": {',
    "JSON not an object": '["whereabouts"]',
    "empty config": "",
    "whereabouts without range": {"type": "macvlan", "ipam": {"type": "whereabouts"}},
    "ipRanges not a list": {"type": "macvlan", "ipam": {"type": "whereabouts", "ipRanges": "10.0.0.0/24"}},
}


@pytest.mark.parametrize("config", NO_RANGES.values(), ids=NO_RANGES.keys())
def test_nads_without_whereabouts_ranges(config):
    assert nad_ranges(nad("ns", "n", config)) == []


def test_nad_ranges_in_a_plugin_list_and_as_a_yaml_object():
    conflist = {"cniVersion": "0.4.0", "name": "x", "plugins": [
        {"type": "macvlan", "ipam": {"type": "whereabouts", "range": "10.80.0.0/29"}},
        {"type": "tuning"}]}
    assert [count(rc.allocatable()) for rc in nad_ranges(nad("a", "b", conflist))] == [6]
    as_object = {"metadata": {"namespace": "a", "name": "c"},
                 "spec": {"config": {"type": "ipvlan", "ipam": {"type": "whereabouts", "range": "10.81.0.0/30"}}}}
    assert [count(rc.allocatable()) for rc in nad_ranges(as_object)] == [2]
    assert nad_ranges({"metadata": "x", "spec": None}) == []


# ---------------------------------------------------------------- pools

@pytest.mark.parametrize("name,cidr,text,expected", [
    ("10.75.0.0-24", "10.75.0.0/24", "10.75.0.0/24", ""),
    ("blue-10.75.0.0-24", "10.75.0.0/24", "10.75.0.0/24", "blue"),
    ("my-net-10.75.0.0-24", "10.75.0.0/24", "10.75.0.0/24", "my-net"),
    ("fd00-75---120", "fd00:75::/120", "fd00:75::/120", ""),
    ("handmade", "10.75.0.0/24", "10.75.0.0/24", None),
])
def test_pool_name_encodes_network_name(name, cidr, text, expected):
    assert pool_network_name(name, ipaddress.ip_network(cidr), text) == expected


def test_normalize_range_matches_upstream():
    assert normalize_range("10.75.0.0/24") == "10.75.0.0-24"
    assert normalize_range("fd00:75::/120") == "fd00-75---120"
    assert normalize_range("fd00::") == "fd00--0"


def pool_obj(name: str, rng, allocations, namespace: str = "kube-system") -> dict:
    return {"metadata": {"namespace": namespace, "name": name},
            "spec": {"range": rng, "allocations": allocations}}


def owner(podref="telco/a", **extra) -> dict:
    return {"id": "c0ffee", "podref": podref, **extra}


def test_malformed_allocations_are_counted_not_fatal():
    pool = parse_pool(pool_obj("10.75.0.0-24", "10.75.0.0/24", {
        "10": owner(), "+11": owner(),                  # Go's ParseInt takes a sign
        "abc": owner(), "-1": owner(), "1_0": owner(), " 5": owner(), "": owner(),
        "256": owner(), "99999999999999999999999": owner(),
        "12": "not an object", "13": owner(podref="no-slash"), "14": owner(podref="a/b/c"),
        "255": owner()}))                               # broadcast: inside the range
    assert dict(pool.errors) == {INVALID_OFFSET: 5, OFFSET_OUT_OF_RANGE: 2, INVALID_ALLOCATION: 1,
                                 INVALID_PODREF: 2}
    stats = pool_stats(pool, {}, pods={"telco/a"})
    assert (stats.size, stats.allocated, stats.free, stats.leaked) == (254, 5, 250, 0)


@pytest.mark.parametrize("rng", ["not-a-cidr", "10.75.0.0/33", None, 7])
def test_pool_with_unusable_range(rng):
    pool = parse_pool(pool_obj("bad", rng, {"1": owner()}))
    assert pool.errors == {INVALID_RANGE: 1}
    assert pool_stats(pool, {}, set()) is None
    fams = {f.name: f for f in ippool_families([pool], [], set())}
    assert len(fams["planewatch_ippool_size"]) == 0
    assert len(fams["planewatch_ippool_invalid_entries"]) == 1


def test_offsets_count_from_the_address_written_in_the_range():
    pool = parse_pool(pool_obj("p", "10.75.0.0/24", {"5": owner()}))
    assert [str(ipaddress.ip_address(a.address)) for a in pool.allocations] == ["10.75.0.5"]
    v6 = parse_pool(pool_obj("p6", "fd00:75::/120", {"255": owner(), "256": owner()}))
    assert [str(ipaddress.ip_address(a.address)) for a in v6.allocations] == ["fd00:75::ff"]
    assert v6.errors == {OFFSET_OUT_OF_RANGE: 1}


def stats_for(pools, nads, pods):
    index = index_ranges(rc for obj in nads for rc in nad_ranges(obj))
    return {p.key: pool_stats(p, index, pods) for p in map(parse_pool, pools)}


def whereabouts(rng, **ipam) -> dict:
    return {"type": "macvlan", "ipam": {"type": "whereabouts", "range": rng, **ipam}}


def test_pools_match_nads_by_range_and_network_name():
    pools = [pool_obj("10.75.0.0-24", "10.75.0.0/24", {"20": owner(), "21": owner("telco/gone")}),
             pool_obj("blue-10.75.0.0-24", "10.75.0.0/24", {}),
             pool_obj("10.90.0.0-24", "10.90.0.0/24", {"3": owner()})]
    nads = [nad("telco", "sig", whereabouts("10.75.0.0/24", exclude=["10.75.0.0/28"])),
            nad("telco", "blue", whereabouts("10.75.0.0/24", network_name="blue", range_end="10.75.0.9"))]
    got = stats_for(pools, nads, {"telco/a"})
    plain, blue, orphan = (got["kube-system/10.75.0.0-24"], got["kube-system/blue-10.75.0.0-24"],
                           got["kube-system/10.90.0.0-24"])
    assert (plain.network, plain.size, plain.allocated, plain.free, plain.leaked) == ("telco/sig", 239, 2, 237, 1)
    assert (blue.network, blue.size, blue.free) == ("telco/blue", 9, 9)
    # No NAD: sized by its own range alone.
    assert (orphan.network, orphan.size, orphan.free, orphan.leaked) == ("", 254, 253, 0)


def test_a_pool_shared_by_several_nads_allocates_from_their_union():
    pools = [pool_obj("10.75.0.0-24", "10.75.0.0/24", {"5": owner(), "100": owner()})]
    nads = [nad("a", "low", whereabouts("10.75.0.0/24", range_end="10.75.0.49")),       # .1-.49
            nad("b", "high", whereabouts("10.75.0.0/24", range_start="10.75.0.40",
                                         exclude=["10.75.0.128/25"]))]                  # .40-.127
    stats = stats_for(pools, nads, {"telco/a"})["kube-system/10.75.0.0-24"]
    assert (stats.network, stats.size, stats.allocated, stats.free) == ("a/low,b/high", 127, 2, 125)


def test_allocations_outside_the_allocatable_set_do_not_reduce_free():
    pools = [pool_obj("10.75.0.0-24", "10.75.0.0/24", {"3": owner(), "30": owner()})]
    nads = [nad("t", "n", whereabouts("10.75.0.0/24", exclude=["10.75.0.0/28"]))]   # .3 excluded later
    stats = stats_for(pools, nads, {"telco/a"})["kube-system/10.75.0.0-24"]
    assert (stats.size, stats.allocated, stats.free) == (239, 2, 238)


def test_a_handmade_pool_name_matches_any_nad_of_its_range():
    pools = [pool_obj("handmade", "10.75.0.0/24", {})]
    nads = [nad("t", "n", whereabouts("10.75.0.0/24", network_name="x", exclude=["10.75.0.0/25"]))]
    assert stats_for(pools, nads, set())["kube-system/handmade"].size == 127


def test_leaks_need_a_missing_pod_and_spare_ipamclaim_owned_allocations():
    pools = [pool_obj("10.75.0.0-24", "10.75.0.0/24", {
        "1": owner("telco/here"), "2": owner("telco/gone"), "3": owner("other/gone"),
        "4": owner("telco/vm-launcher", ipamclaimref="telco/vm-claim"), "5": owner("bad")})]
    stats = stats_for(pools, [], {"telco/here"})["kube-system/10.75.0.0-24"]
    assert (stats.allocated, stats.leaked) == (5, 2)


def test_overlapping_reservations_and_leaks():
    reservations = [parse_reservation({"metadata": {"namespace": "kube-system", "name": n},
                                       "spec": {"podref": ref, **extra}})
                    for n, ref, extra in [("10.75.0.1", "telco/here", {}), ("10.75.0.2", "telco/gone", {}),
                                          ("fd00--2", "telco/vm", {"ipamclaimref": "telco/c"}),
                                          ("10.75.0.3", "nonsense", {})]]
    fams = {f.name: f for f in ippool_families([], [], {"telco/here"}, reservations)}
    assert fams["planewatch_ippool_overlapping_reservations"].samples == [("", 4)]
    assert fams["planewatch_ippool_overlapping_reservations_leaked"].samples == [("", 1)]
    assert "planewatch_ippool_overlapping_reservations" not in {f.name for f in ippool_families([], [], set())}


# ---------------------------------------------------------------- exposition

def test_families_render_and_parse_with_huge_ipv6_pools():
    pools = [parse_pool(pool_obj("fd00-75---64", "fd00:75::/64", {"1": owner(), "2": owner("x/gone")})),
             parse_pool(pool_obj("10.75.0.0-30", "10.75.0.0/30", {"1": owner(), "2": owner()})),
             parse_pool(pool_obj("bad", "nope", {}))]
    text = render(ippool_families(pools, [], {"telco/a"}, [])).decode()
    parsed = parse_metrics(text)
    v6 = {"pool": "kube-system/fd00-75---64", "range": "fd00:75::/64", "network": ""}
    [size] = series(parsed, "planewatch_ippool_size", **v6).values()
    assert float(size) == 1.8446744073709552e19    # float64 in Prometheus...
    assert 'network=""} 18446744073709551614\n' in text     # ...exact in the text
    assert list(series(parsed, "planewatch_ippool_leaked", **v6).values()) == [1]
    v4 = {"pool": "kube-system/10.75.0.0-30", "range": "10.75.0.0/30", "network": ""}
    assert list(series(parsed, "planewatch_ippool_free", **v4).values()) == [0]
    assert list(series(parsed, "planewatch_ippool_invalid_entries", pool="kube-system/bad").values()) == [1]
    promtool = shutil.which("promtool")
    if promtool:
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr + done.stdout


# ---------------------------------------------------------------- example pools (lab)

def test_example_ippool_round_trips():
    obj = example_ippool("10.75.0.0/29", {"10.75.0.2": "lab/pod-a", "10.75.0.3": "lab/pod-b"})
    assert obj["metadata"] == {"name": "10.75.0.0-29", "namespace": "kube-system"}
    assert set(obj["spec"]["allocations"]) == {"2", "3"}
    assert len({a["id"] for a in obj["spec"]["allocations"].values()}) == 2
    stats = pool_stats(parse_pool(obj), {}, {"lab/pod-a"})
    assert (stats.pool, stats.size, stats.allocated, stats.free, stats.leaked) == (
        "kube-system/10.75.0.0-29", 6, 2, 4, 1)
    named = example_ippool("fd00:75::/120", {"fd00:75::a": "lab/x"}, namespace="wb", network_name="blue")
    assert named["metadata"]["name"] == "blue-fd00-75---120"
    assert parse_pool(named).network_name == "blue"
    with pytest.raises(ValueError):
        example_ippool("10.75.0.0/29", {"10.75.0.9": "lab/x"})


# ---------------------------------------------------------------- the cluster state

def test_cluster_state_is_unready_then_follows_events():
    state = ClusterState()
    names = lambda fams: {f.name: f for f in fams}
    before = names(state.families("9.9.9"))
    assert before["planewatch_scrape_collector_success"].samples == [('collector="whereabouts"', 0)]
    assert "planewatch_ippool_size" not in before
    assert before["planewatch_build_info"].samples == [('version="9.9.9"', 1)]

    pod = {"metadata": {"namespace": "telco", "name": "a"}}
    state.pods.replace([pod, {"metadata": {"namespace": "telco", "name": "b"}}])
    state.nads.replace([nad("telco", "sig", whereabouts("10.75.0.0/24", exclude=["10.75.0.0/28"]))])
    state.pools.replace([pool_obj("10.75.0.0-24", "10.75.0.0/24", {"20": owner("telco/a"),
                                                                    "21": owner("telco/b")})])
    for keyed in (state.pods, state.nads, state.pools):
        keyed.mark_listed()
    assert state.ready

    def leaked() -> float:
        parsed = parse_metrics(render(state.families()).decode())
        return list(series(parsed, "planewatch_ippool_leaked", pool="kube-system/10.75.0.0-24").values())

    assert leaked() == [0]
    state.pods.delete(pod)
    assert leaked() == [1]
    state.pods.upsert(pod)
    assert leaked() == [0]
    fams = names(state.families())
    assert fams["planewatch_scrape_collector_success"].samples == [('collector="whereabouts"', 1)]
    assert "planewatch_ippool_overlapping_reservations" not in fams    # that CRD never listed


# ---------------------------------------------------------------- what upstream writes (table)

def pool_metrics(nads, pools, pods, **kw) -> dict:
    from exporters.exposition import render
    ranges = [rc for n in nads for rc in nad_ranges(n)]
    text = render(ippool_families([parse_pool(p) for p in pools], ranges, set(pods), **kw)).decode()
    return parse_metrics(text)


def pool_numbers(parsed, pool) -> dict:
    out = {}
    for what in ("size", "allocated", "free", "leaked"):
        (labels, value), = series(parsed, f"planewatch_ippool_{what}", pool=pool).items()
        out[what] = int(value)
        out["network"] = dict(labels)["network"]
    out["invalid"] = {dict(lbl)["reason"]: int(v)
                      for lbl, v in series(parsed, "planewatch_ippool_invalid_entries", pool=pool).items()}
    return out


WB = "whereabouts"
UPSTREAM = {
    # v0.9.x refuses a /31: the pool object exists, nothing can be allocated.
    "slash31-upstream": dict(
        nads=[nad("ran", "p2p-a", {"type": "macvlan", "master": "ens1", "ipam": {"type": WB, "range": "10.31.7.4/31"}})],
        pools=[pool_obj("10.31.7.4-31", "10.31.7.4/31", {}, "ran")], pods=[],
        pool="ran/10.31.7.4-31",
        want=dict(size=0, allocated=0, free=0, leaked=0, network="ran/p2p-a", invalid={})),
    "slash128-upstream": dict(
        nads=[nad("ran", "p2p-b", {"type": "macvlan", "master": "ens1",
                                   "ipam": {"type": WB, "range": "fd31:7::9/128"}})],
        pools=[pool_obj("fd31-7--9-128", "fd31:7::9/128", {}, "ran")], pods=[],
        pool="ran/fd31-7--9-128",
        want=dict(size=0, allocated=0, free=0, leaked=0, network="ran/p2p-b", invalid={})),
    # A fork's reading of a /31 (RFC 3021), only when asked for.
    "slash31-fork-option": dict(
        nads=[nad("ran", "p2p-a", {"type": "macvlan", "master": "ens1", "ipam": {"type": WB, "range": "10.31.7.4/31"}})],
        pools=[pool_obj("10.31.7.4-31", "10.31.7.4/31", {"1": owner("ran/du-0")}, "ran")], pods=["ran/du-0"],
        pool="ran/10.31.7.4-31", small_ranges=True,
        want=dict(size=2, allocated=1, free=1, leaked=0, network="ran/p2p-a", invalid={})),
    # Node-slice pools: <network_name>-<node>-<slice>, keeping their network.
    "node-slice-named": dict(
        nads=[nad("edge", "fabric", {"type": "macvlan", "master": "ens2", "ipam": {
            "type": WB, "range": "172.28.0.0/16", "node_slice_size": "/22", "network_name": "fabric",
            "exclude": ["172.28.4.0/24"]}})],
        pools=[pool_obj("fabric-worker-b-172.28.4.0-22", "172.28.4.0/22",
                        {"1": owner("edge/cam-1"), "2": owner("edge/gone-2")}, "edge")],
        pods=["edge/cam-1"], pool="edge/fabric-worker-b-172.28.4.0-22",
        want=dict(size=1022, allocated=2, free=1020, leaked=1, network="edge/fabric", invalid={})),
    # ... and without network_name: <node>-<slice>.
    "node-slice-unnamed": dict(
        nads=[nad("edge", "plain", {"type": "macvlan", "master": "ens2", "ipam": {
            "type": WB, "range": "fd28::/48", "node_slice_size": "64"}})],
        pools=[pool_obj("worker-c-fd28-0-0-3---64", "fd28:0:0:3::/64", {"1": owner("edge/cam-2")}, "edge")],
        pods=["edge/cam-2"], pool="edge/worker-c-fd28-0-0-3---64",
        want=dict(size=2**64 - 2, allocated=1, free=2**64 - 3, leaked=0, network="edge/plain", invalid={})),
    # Allocations from before podref existed: legitimate, not leaked, not invalid.
    "no-podref": dict(
        nads=[], pools=[pool_obj("10.44.0.0-24", "10.44.0.0/24", {
            "7": {"id": "aa01"}, "8": owner("tools/probe-0"), "9": {"id": "aa03", "ifname": "net1"}})],
        pods=[], pool="kube-system/10.44.0.0-24",
        want=dict(size=254, allocated=3, free=251, leaked=1, network="", invalid={})),
}


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_pools_as_upstream_writes_them(name):
    case = UPSTREAM[name]
    parsed = pool_metrics(case["nads"], case["pools"], case["pods"], small_ranges=case.get("small_ranges", False))
    assert pool_numbers(parsed, case["pool"]) == case["want"]
