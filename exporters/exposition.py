"""The Prometheus text exposition (format 0.0.4) of the families sources built
(collector/family.py).

Why not prometheus_client's `generate_latest`: on a busy node (1000 pod
interfaces, ~24 000 series) formatting dominated the scrape. Here a label set is
rendered once per distinct tuple of values (an LRU keyed by the tuple, or once
per interface view), and a family's lines are one `%` formatting in C
(bench/codecs.py). A variant that kept each family's text between scrapes was
~2 ms faster at 24 000 series and held ~3 MiB more: not kept.
The output is checked against prometheus_client's parser and `promtool check
metrics` in tests/test_exposition.py, including hostile label values.
"""
from __future__ import annotations

import itertools
from typing import Iterable

from collector.family import HISTOGRAM, Family, format_value

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def merge(families: Iterable[Family]) -> list[Family]:
    """Join families of the same name (and type), keeping first-seen order."""
    by_name: dict[str, Family] = {}
    for fam in families:
        seen = by_name.get(fam.name)
        if seen is None:
            by_name[fam.name] = fam
        elif seen.type != fam.type or seen.labelnames != fam.labelnames:
            raise ValueError(f"family {fam.name} registered twice with different shape")
        else:
            seen.series.extend(fam.series)
            seen.values.extend(fam.values)
    return list(by_name.values())


_INT_ONLY = frozenset((int,))
_chain = itertools.chain.from_iterable


def _unique(fam: Family) -> tuple[list[str], list]:
    """The family's series and values, each series once (its first value): a
    duplicate series would make Prometheus reject the whole scrape."""
    series, values = fam.series, fam.values
    if len(set(series)) != len(series):
        first: dict[str, int] = {}
        for i, labels in enumerate(series):
            first.setdefault(labels, i)
        keep = sorted(first.values())
        series, values = [series[i] for i in keep], [values[i] for i in keep]
    return series, values


def _histogram_lines(fam: Family) -> str:
    lines = []
    for labels, value in zip(*_unique(fam)):
        suffix, _, labels = labels.partition("\0")        # Family.add_histogram
        lines.append(f"{fam.name}{suffix}{{{labels}}} {format_value(value)}\n" if labels
                     else f"{fam.name}{suffix} {format_value(value)}\n")
    return "".join(lines)


def _lines(fam: Family) -> str:
    """The family's sample lines. One `%` over a format of n identical lines and
    the interleaved (labels, value) tuple: the loop runs in C, not one f-string
    per series in Python. Integers (the kernel's counters) go into `%d`, anything
    else through format_value. Label strings are arguments, never part of the
    format, so a `%` in a label value is just text."""
    series, values = _unique(fam)
    if not series:
        return ""
    args: list = values
    if _INT_ONLY >= set(map(type, values)):
        hole = "%d\n"
    else:
        hole, args = "%s\n", [format_value(v) for v in values]
    if series[0]:
        fmt = f"{fam.name}{{%s}} {hole}" * len(series)
        return fmt % tuple(_chain(zip(series, args)))
    # no labels: one series (more would be duplicates)
    return f"{fam.name} {hole}" % args[0]


def render(families: Iterable[Family]) -> bytes:
    out: list[bytes] = []
    for fam in merge(families):
        head = f"# HELP {fam.name} {escape_help(fam.help)}\n# TYPE {fam.name} {fam.type}\n"
        body = _histogram_lines(fam) if fam.type == HISTOGRAM else _lines(fam)
        out.append((head + body).encode())
    return b"".join(out)
