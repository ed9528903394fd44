"""collector/budgets.py: the pure parts, table-driven."""
from __future__ import annotations

import itertools

import pytest

from collector.budgets import (
    SERIES_PER_ATTACHMENT,
    Budgets,
    fair_level,
    fit_node,
    pod_series,
    select_networks,
    trim_pod,
)
from collector.model import Attachment, Pod


def make_pod(name: str, attachments: int, ips: int = 1, **att) -> Pod:
    atts = tuple(Attachment("ns", name, f"uid-{name}", f"ns/net{i}", f"net{i}",
                            ips=tuple(f"10.{i}.0.{k}" for k in range(ips)), **att) for i in range(attachments))
    return Pod("ns", name, f"uid-{name}", attachments=atts)


@pytest.mark.parametrize("weights,budget,level", [
    ([10, 10, 10], 30, None),           # everything fits
    ([10, 10, 100], 60, 40),            # only the big one is cut, to what the others leave
    ([5, 50, 100], 65, 30),
    ([100, 100], 50, 25),
    ([1, 1, 1000], 2, 0),
])
def test_fair_level(weights, budget, level):
    assert fair_level(weights, budget) == level
    if level is not None:
        assert sum(min(w, level) for w in weights) <= budget


def test_trim_pod_counts_each_reason():
    b = Budgets(pod_attachments=2, attachment_ips=3, label_length=20)
    pod = make_pod("p", 4, ips=5)
    long = Attachment("ns", "p", "uid-p", "ns/" + "x" * 30, "netx")
    pod = Pod("ns", "p", "uid-p", attachments=pod.attachments + (long,), missing=("ns/a", "ns/b", "ns/c"))
    trimmed, cuts = trim_pod(pod, b)
    assert cuts == {"label_length": 1, "ips": 4 * 2, "attachments": 2, "requests": 1}
    assert [a.interface for a in trimmed.attachments] == ["net0", "net1"]
    assert all(len(a.ips) == 3 for a in trimmed.attachments)
    assert trimmed.missing == ("ns/a", "ns/b")


def test_trim_pod_leaves_an_honest_pod_alone():
    pod = make_pod("honest", 8, ips=2)
    assert trim_pod(pod, Budgets()) == (pod, {})


def test_default_budgets_fit_a_busy_telco_node():
    pods = [make_pod(f"cnf{i}", 8, ips=2) for i in range(250)]
    fitted, shed = fit_node(pods, Budgets().node_series)
    assert shed == {} and fitted == pods


def test_fit_node_is_fair_and_order_independent():
    honest = [make_pod(f"h{i}", 8, ips=2) for i in range(20)]
    big = [make_pod(f"b{i}", 32, ips=16) for i in range(5)]
    budget = sum(pod_series(p) for p in honest) + 5 * (1 + 10 * (SERIES_PER_ATTACHMENT + 16))
    results = set()
    for order in itertools.islice(itertools.permutations(honest[:3] + big[:3]), 20):
        fitted, shed = fit_node(list(order) + honest[3:] + big[3:], budget)
        by_name = {p.name: len(p.attachments) for p in fitted}
        assert all(by_name[h.name] == 8 for h in honest)
        assert set(shed) == {b.uid for b in big}
        assert sum(pod_series(p) for p in fitted) <= budget
        results.add(tuple(sorted(by_name.items())))
    assert len(results) == 1
    assert {n for name, n in results.pop() if name.startswith("b")} == {10}


def test_select_networks_keeps_in_use_and_shares_the_total_fairly():
    b = Budgets(namespace_networks=50, networks=60)
    keys = [f"evil/n{i:03d}" for i in range(500)] + [f"a/n{i}" for i in range(5)] + [f"b/n{i}" for i in range(40)]
    chosen, cut = select_networks(keys, {"evil/n499"}, b)
    assert "evil/n499" in chosen
    assert {k for k in chosen if k.startswith("a/")} == {f"a/n{i}" for i in range(5)}
    # 60 left after a's 5: b and evil get 27 each (fair level), evil/n499 on top.
    assert len([k for k in chosen if k.startswith("b/")]) == 27
    assert len([k for k in chosen if k.startswith("evil/")]) == 28
    assert cut == {"evil": 499 - 27, "b": 13}
    assert chosen == sorted(chosen)


def test_flags_build_budgets_and_refuse_nonsense():
    import argparse

    from collector.budgets import add_budget_flags, budgets_from_args
    p = argparse.ArgumentParser()
    add_budget_flags(p)
    assert budgets_from_args(p.parse_args([])) == Budgets()
    got = budgets_from_args(p.parse_args(["--budget.pod-attachments", "4", "--budget.netns-refresh-time", "0.2"]))
    assert (got.pod_attachments, got.netns_refresh_seconds) == (4, 0.2)
    with pytest.raises(ValueError, match="pod-attachments"):
        budgets_from_args(p.parse_args(["--budget.pod-attachments", "0"]))
