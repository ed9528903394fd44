"""The Prometheus text exposition (format 0.0.4) of the families sources built
(collector/family.py).

Why not prometheus_client's `generate_latest`: on a busy node (1000 pod
interfaces, ~24 000 series) formatting dominated the scrape. Here a label set is
rendered once per distinct tuple of values (an LRU keyed by the tuple, or once
per interface view), and a family's lines are one `%` formatting in C, bytes
throughout (bench/codecs.py). A variant that kept each family's text between scrapes was
~2 ms faster at 24 000 series and held ~3 MiB more: not kept.
The output is checked against prometheus_client's parser and `promtool check
metrics` in tests/test_exposition.py, including hostile label values.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

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


def _unique(series: list[bytes], values: list) -> tuple[list[bytes], list]:
    """Each series once (its first value): a duplicate series would make
    Prometheus reject the whole scrape."""
    if len(set(series)) != len(series):
        first: dict[bytes, int] = {}
        for i, labels in enumerate(series):
            first.setdefault(labels, i)
        keep = sorted(first.values())
        series, values = [series[i] for i in keep], [values[i] for i in keep]
    return series, values


def _histogram_lines(name: bytes, series: list[bytes], values: list) -> bytes:
    lines = []
    for labels, value in zip(series, values):
        suffix, _, labels = labels.partition(b"\0")        # Family.add_histogram
        text = format_value(value).encode()
        lines.append(b"%s%s{%s} %s\n" % (name, suffix, labels, text) if labels
                     else b"%s%s %s\n" % (name, suffix, text))
    return b"".join(lines)


# Series a piece: ~36 KB of text, below glibc's mmap threshold (128 KiB,
# collector/memory.py). One `%` over a whole family's 1 000+ series grew its
# buffer by realloc to ~140 KB, copying into fresh pages each time: two thirds
# of a scrape's page faults (perf, minor-faults, dwarf stacks). Pieces of this
# size come from the heap the last ones freed (the gzip stream lets each go
# once deflated).
CHUNK = 256


def _lines(name: bytes, series: list[bytes], values: list) -> list[bytes]:
    """The family's sample lines, CHUNK series a piece. One `%` a piece over a
    format of n identical lines and the interleaved (labels, value) tuple: the
    loop runs in C, not one f-string per series in Python. Integers (the
    kernel's counters) go into `%d`, anything else through format_value. Label
    strings are arguments, never part of the format, so a `%` in a label value
    is just text."""
    if not series:
        return []
    args: list = values
    # ints only (bools too): their sum is an int, in C and ~2x cheaper than the
    # set of the values' types; one float makes it a float, anything else raises
    try:
        ints = type(sum(values)) is int
    except TypeError:
        ints = False
    if ints:
        hole = b"%d\n"
    else:
        hole, args = b"%s\n", [format_value(v).encode() for v in values]
    if not series[0]:
        # no labels: one series (more would be duplicates)
        return [name + b" " + hole % args[0]]
    # (labels, value, labels, value, ...) by two slice assignments: chain(zip())
    # made a pair and an iterator over it per series, ~30 % of the formatting
    interleaved: list = [None] * (2 * len(series))
    interleaved[0::2] = series
    interleaved[1::2] = args
    line = name + b"{%s} " + hole
    if len(series) <= CHUNK:            # most families: one piece, no slicing
        return [line * len(series) % tuple(interleaved)]
    full = line * CHUNK
    out = []
    for start in range(0, 2 * len(series), 2 * CHUNK):
        pairs = tuple(interleaved[start:start + 2 * CHUNK])
        out.append((full if len(pairs) == 2 * CHUNK else line * (len(pairs) // 2)) % pairs)
    return out


class Stream:
    """The exposition rendered a batch of families at a time (the scraper hands
    each source's families as soon as the source is done), so a sink (the gzip
    stream, exporters/http.py) can take each batch's pieces while the next
    sources run. A family's lines must be together and its name said once:
    families of one batch are merged (`merge`), and a batch naming a family an
    earlier batch rendered is refused whole (`add` returns the clashing names)."""

    def __init__(self, sink: Callable[[Sequence[bytes]], None] | None = None, keep: bool = True):
        self.parts: list[bytes] = []            # every piece, unless not `keep`: then the sink's alone
        self._keep = keep
        self._names: set[str] = set()
        self._sink = sink

    def add(self, families: Iterable[Family]) -> list[str]:
        """Render `families` after what came before; the names an earlier batch
        already rendered, and nothing rendered, if any."""
        families = merge(families)
        clash = [fam.name for fam in families if fam.name in self._names]
        if clash:
            return clash
        self._names.update(fam.name for fam in families)
        sink = self._sink
        for parts in _render(families):
            if self._keep:
                self.parts += parts
            if sink is not None:
                sink(parts)
        return []


def render_parts(families: Iterable[Family]) -> list[bytes]:
    """The exposition in pieces (a family's HELP/TYPE, then its lines), bytes
    from the first `%` on: at 1 000 interfaces the body is ~3 MB and every copy
    of it is fresh pages (collector/memory.py maps big buffers and trims after
    every collection). Formatting str, encoding and joining made four copies and
    ~3 700 page faults a scrape; the HTTP server writes these pieces as they are
    (bench/RESULTS.md)."""
    return [part for parts in _render(merge(families)) for part in parts]


def _render(families: list[Family]) -> Iterator[list[bytes]]:
    """Each family's pieces: its HELP and TYPE, then its sample lines."""
    # The last series list found free of duplicates: a source fills several
    # families from one column of label sets (netlink 11, eBPF traffic 6), and
    # comparing a list with an equal one is a pointer compare per element,
    # where the set is a hash and insert.
    unique: list[bytes] = []
    for fam in families:
        head = f"# HELP {fam.name} {escape_help(fam.help)}\n# TYPE {fam.name} {fam.type}\n".encode()
        series, values = fam.series, fam.values
        if series != unique:
            series, values = _unique(series, values)
            unique = series
        if fam.type == HISTOGRAM:
            yield [head, _histogram_lines(fam.name.encode(), series, values)]
        else:
            yield [head, *_lines(fam.name.encode(), series, values)]


def render(families: Iterable[Family]) -> bytes:
    return b"".join(render_parts(families))
