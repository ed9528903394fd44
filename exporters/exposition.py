"""The Prometheus text exposition (format 0.0.4) of the families sources built
(collector/family.py).

Why not prometheus_client's `generate_latest`: on a busy node (1000 pod
interfaces, ~24 000 series) formatting dominated the scrape. Here a label set is
rendered once per distinct tuple of values (an LRU keyed by the tuple), and a
`Renderer` keeps each family's text around its values from one scrape to the
next, so a steady node's scrape only formats numbers (bench/codecs.py).
The output is checked against prometheus_client's parser and `promtool check
metrics` in tests/test_exposition.py, including hostile label values.
"""
from __future__ import annotations

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


def _series_prefix(name: str, labels: str, histogram: bool) -> str:
    if histogram:                   # suffix NUL labels (Family.add_histogram)
        suffix, _, labels = labels.partition("\0")
        name += suffix
    return f"{name}{{{labels}}} " if labels else f"{name} "


class _Layout:
    """The text of one family around its values, for one list of label sets:
    `template % values` is the family's exposition. Built when the family's series
    differ from the last scrape's, which on a steady node is rarely."""

    __slots__ = ("labels", "as_int", "template", "keep")

    def __init__(self, fam: Family, labels: list[str], as_int: bool):
        histogram = fam.type == HISTOGRAM
        head = f"# HELP {fam.name} {escape_help(fam.help)}\n# TYPE {fam.name} {fam.type}\n"
        parts = [head.replace("%", "%%")]
        hole = "%d\n" if as_int else "%s\n"
        seen: set[str] = set()
        keep: list[int] = []
        for i, label in enumerate(labels):
            if label in seen:       # a duplicate series would make Prometheus reject the scrape
                continue
            seen.add(label)
            keep.append(i)
            parts.append(_series_prefix(fam.name, label, histogram).replace("%", "%%"))
            parts.append(hole)
        self.labels = list(labels)      # a copy: the family's list is the scrape's
        self.as_int = as_int
        self.template = "".join(parts).encode()
        self.keep = None if len(keep) == len(labels) else tuple(keep)

    def fill(self, values: tuple) -> bytes:
        if self.keep is not None:
            values = tuple(values[i] for i in self.keep)
        if not self.as_int:
            values = tuple(format_value(v).encode() for v in values)
        return self.template % values


_INT_ONLY = frozenset((int,))


class Renderer:
    """Families to exposition bytes, remembering each family's layout (its text
    but for the values) from one scrape to the next: when a family has the same
    series as last time, rendering it is one `bytes % tuple` in C instead of
    one formatted line per series in Python. Integer values (the kernel's
    counters) fill `%d` holes; any other value goes through `format_value`.

    Holds the last layouts of the families it rendered: about the size of one
    response. Not thread-safe: one per scraper, used under its lock."""

    def __init__(self) -> None:
        self._layouts: dict[str, _Layout] = {}

    def render(self, families: Iterable[Family]) -> bytes:
        out: list[bytes] = []
        layouts: dict[str, _Layout] = {}
        for fam in merge(families):
            labels, values = fam.series, tuple(fam.values)
            as_int = _INT_ONLY >= set(map(type, values))
            layout = self._layouts.get(fam.name)
            if layout is None or layout.as_int != as_int or layout.labels != labels:
                layout = _Layout(fam, labels, as_int)
            layouts[fam.name] = layout
            out.append(layout.fill(values))
        self._layouts = layouts         # families gone from the scrape are forgotten
        return b"".join(out)


def render(families: Iterable[Family]) -> bytes:
    """One-off rendering (no layouts kept): tests, `inspect`, cluster mode."""
    return Renderer().render(families)
