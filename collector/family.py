"""The metric-family model sources produce: one `Family` per metric, built fresh at
every scrape (client_python's custom-collector pattern), its label sets rendered once.

exporters/exposition.py turns a list of them into the text format; sources import
only this module, so nothing upstream of the exposition depends on it.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# Sized for a busy node's live label sets (~1000 interfaces x a few label shapes);
# 65536 entries measured +30 MiB RSS under pod churn (bench/RESULTS.md).
@lru_cache(maxsize=1 << 13)
def render_labels(names: tuple[str, ...], values: tuple[str, ...]) -> bytes:
    """`a="x",b="y"` for the given names and values (values escaped), UTF-8: the
    exposition is bytes from the first formatting on (exporters/exposition.py)."""
    return ",".join(f'{n}="{escape_label_value(str(v))}"' for n, v in zip(names, values)).encode()


def format_value(value: float | int) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class Family:
    """One metric family built fresh at every scrape.

    `labelnames` fixes the label order; `add` takes values in that order.
    Counter names carry `_total` themselves (the name is used as is).
    """

    __slots__ = ("name", "type", "help", "labelnames", "series", "values")

    def __init__(self, name: str, type: str, help: str, labelnames: Sequence[str] = ()):
        if type == COUNTER and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        self.name = name
        self.type = type
        self.help = help
        self.labelnames = tuple(labelnames)
        # Two parallel lists, not a list of (labels, value) pairs: no tuple to allocate
        # (and for the cyclic GC to track) per sample, ~24 000 of them a scrape.
        self.series: list[bytes] = []       # rendered label sets (render_labels)
        self.values: list[float | int] = []

    @property
    def samples(self) -> list[tuple[str, float | int]]:
        """(rendered labels, value) pairs, for reading (tests, `inspect`)."""
        return [(labels.decode(), value) for labels, value in zip(self.series, self.values)]

    def add(self, labelvalues: Sequence[str], value: float | int) -> None:
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} labels, got {len(labelvalues)}")
        self.series.append(render_labels(self.labelnames, tuple(labelvalues)))
        self.values.append(value)

    def add_rendered(self, labels: bytes, value: float | int) -> None:
        """Add with a label string from `render_labels(self.labelnames, ...)`."""
        self.series.append(labels)
        self.values.append(value)

    def extend_rendered(self, labels: Sequence[bytes], values: Sequence[float | int]) -> None:
        """`add_rendered` for parallel sequences of label strings and values (a
        source that builds a column at a time: one call, not one per series)."""
        if len(labels) != len(values):
            raise ValueError(f"{self.name}: {len(labels)} label sets, {len(values)} values")
        self.series.extend(labels)
        self.values.extend(values)

    def add_histogram(self, labelvalues: Sequence[str], bounds: Sequence[float],
                      cumulative: Sequence[int], total: float, count: int) -> None:
        """One histogram series: `cumulative[i]` observations <= `bounds[i]`, then +Inf
        (= count). Series are suffix + NUL + rendered labels so `render` stays one loop."""
        if self.type != HISTOGRAM:
            raise ValueError(f"{self.name} is not a histogram")
        base = render_labels(self.labelnames, tuple(labelvalues))
        bucket = b"_bucket\0" + base + (b"," if base else b"")
        for bound, n in zip(bounds, cumulative):
            self.add_rendered(b'%sle="%s"' % (bucket, format_value(float(bound)).encode()), n)
        self.add_rendered(bucket + b'le="+Inf"', count)
        self.add_rendered(b"_sum\0" + base, total)
        self.add_rendered(b"_count\0" + base, count)

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return f"Family({self.name!r}, {self.type}, {len(self.values)} samples)"
