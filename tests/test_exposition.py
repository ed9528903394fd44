"""Our text exposition round-trips through prometheus_client's parser and passes
`promtool check metrics`, hostile label values included."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.family import COUNTER, GAUGE, HISTOGRAM, Family, format_value, render_labels
from exporters.exposition import merge, render

HOSTILE = ['plain', 'quote"inside', "back\\slash", "new\nline", "tab\tand unicode ✓ Ωmega",
           '\\"', "\\n literal", "", "{curly}=,", "trailing\\"]


def families():
    c = Family("planewatch_test_events_total", COUNTER, "Events.\nSecond line with \\ backslash.", ("a", "b"))
    g = Family("planewatch_test_level", GAUGE, "A level.", ("a",))
    for i, v in enumerate(HOSTILE):
        c.add((v, str(i)), i * 10)
        g.add((v,), 0.5 + i)
    n = Family("planewatch_test_nolabels", GAUGE, "No labels.")
    n.add((), float("nan"))
    h = Family("planewatch_test_rtt_seconds", HISTOGRAM, "A histogram.", ("a",))
    for i, v in enumerate(HOSTILE):
        h.add_histogram((v,), (0.00005, 0.001), (i, 2 * i), 0.5 * i, 3 * i)
    return [c, g, n, h]


def test_round_trip_through_prometheus_client_parser():
    text = render(families()).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    # prometheus_client strips _total from counter family names
    events = parsed["planewatch_test_events"]
    assert events.type == "counter"
    got = {(s.labels["a"], s.labels["b"]): s.value for s in events.samples}
    assert got == {(v, str(i)): i * 10 for i, v in enumerate(HOSTILE)}
    assert events.documentation == "Events.\nSecond line with \\ backslash."
    level = {s.labels["a"]: s.value for s in parsed["planewatch_test_level"].samples}
    assert level == {v: 0.5 + i for i, v in enumerate(HOSTILE)}
    rtt = parsed["planewatch_test_rtt_seconds"]
    assert rtt.type == "histogram"
    got = {(s.name, s.labels["a"], s.labels.get("le")): s.value for s in rtt.samples}
    assert len(got) == 5 * len(HOSTILE)
    for i, v in enumerate(HOSTILE):
        assert [got[("planewatch_test_rtt_seconds_bucket", v, le)] for le in ("5e-05", "0.001", "+Inf")] \
            == [i, 2 * i, 3 * i]
        assert got[("planewatch_test_rtt_seconds_sum", v, None)] == 0.5 * i
        assert got[("planewatch_test_rtt_seconds_count", v, None)] == 3 * i


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian prometheus) not installed")
def test_promtool_check_metrics_accepts_it():
    res = subprocess.run(["promtool", "check", "metrics"], input=render(families()),
                         capture_output=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_duplicate_series_written_once_and_families_merged():
    a = Family("planewatch_x", GAUGE, "x", ("k",))
    a.add(("1",), 1)
    b = Family("planewatch_x", GAUGE, "x", ("k",))
    b.add(("1",), 2)
    b.add(("2",), 3)
    text = render([a, b]).decode()
    assert text.count("# TYPE planewatch_x gauge") == 1
    assert 'planewatch_x{k="1"} 1\n' in text and 'planewatch_x{k="1"} 2' not in text
    assert 'planewatch_x{k="2"} 3\n' in text
    with pytest.raises(ValueError):
        merge([a, Family("planewatch_x", COUNTER.replace("counter", "gauge"), "x", ("other",))])


def test_counter_name_and_label_count_are_checked():
    with pytest.raises(ValueError):
        Family("planewatch_events", COUNTER, "no _total")
    with pytest.raises(ValueError):
        Family("planewatch_y", GAUGE, "y", ("a", "b")).add(("only-one",), 1)


@pytest.mark.parametrize("value,text", [(0, "0"), (12345678901234, "12345678901234"), (True, "1"),
                                        (1.0, "1"), (0.25, "0.25"), (float("inf"), "+Inf"),
                                        (float("-inf"), "-Inf"), (1e20, "1e+20")])
def test_format_value(value, text):
    assert format_value(value) == text


def test_percent_signs_and_mixed_values_render_as_text():
    """A family's lines are one `%` formatting: label values are arguments, so a
    tenant's `%d` or `%s` stays text; ints and floats in one family each keep
    their own spelling, and a value that is not an int never goes into `%d`."""
    fam = Family("planewatch_test_mixed", "gauge", "h", ("a",))
    fam.add(("%d%s%%",), 7)
    fam.add(("x",), 0.25)
    fam.add(("y",), True)
    fam.add(("z",), float("nan"))
    fam.add(("%d%s%%",), 9)             # duplicate: the first one stays
    ints = Family("planewatch_test_ints_total", "counter", "h", ("a",))
    ints.add(("%(name)s",), 2 ** 64 - 1)
    plain = Family("planewatch_test_plain", "gauge", "no labels")
    plain.add((), 3)
    text = render([fam, ints, plain]).decode()
    assert 'planewatch_test_mixed{a="%d%s%%"} 7\n' in text
    assert 'planewatch_test_mixed{a="x"} 0.25\n' in text
    assert 'planewatch_test_mixed{a="y"} 1\n' in text
    assert 'planewatch_test_mixed{a="z"} NaN\n' in text
    assert " 9\n" not in text
    assert f'planewatch_test_ints_total{{a="%(name)s"}} {2 ** 64 - 1}\n' in text
    assert "planewatch_test_plain 3\n" in text


def test_families_sharing_one_column_of_label_sets_are_each_checked_for_duplicates():
    """render checks a series list once and skips an equal list that follows
    (a source fills several families from one column): a list with a duplicate
    is still caught in every family that has it, whatever came before."""
    labels = [render_labels(("a",), (v,)) for v in ("p", "q", "p")]
    first, second = (Family(f"planewatch_test_col{i}_total", COUNTER, "h", ("a",)) for i in (1, 2))
    first.extend_rendered(labels, [1, 2, 3])
    second.extend_rendered(labels, [4, 5, 6])
    clean = Family("planewatch_test_col3_total", COUNTER, "h", ("a",))
    clean.extend_rendered(labels[:2], [7, 8])
    after = Family("planewatch_test_col4_total", COUNTER, "h", ("a",))
    after.extend_rendered(labels, [9, 10, 11])
    text = render([first, second, clean, after]).decode()
    for name, kept in (("col1", (1, 2)), ("col2", (4, 5)), ("col3", (7, 8)), ("col4", (9, 10))):
        lines = [line for line in text.splitlines() if line.startswith(f"planewatch_test_{name}_total{{")]
        assert lines == [f'planewatch_test_{name}_total{{a="p"}} {kept[0]}',
                         f'planewatch_test_{name}_total{{a="q"}} {kept[1]}'], text


@pytest.mark.parametrize("values,texts", [
    ([1, True, 2 ** 70], ["1", "1", str(2 ** 70)]),           # ints and bools: %d
    ([2 ** 63 - 1, 2 ** 63 - 1], [str(2 ** 63 - 1)] * 2),     # their sum leaves C long
    ([3, 2.5], ["3", "2.5"]), ([1.0, 4], ["1", "4"]),         # one float: format_value
    ([5, float("nan")], ["5", "NaN"])])
def test_a_family_with_one_non_int_value_formats_every_value_as_text(values, texts):
    fam = Family("planewatch_test_kinds", GAUGE, "h", ("a",))
    fam.extend_rendered([render_labels(("a",), (str(i),)) for i in range(len(values))], values)
    got = [line.rsplit(" ", 1)[1] for line in render([fam]).decode().splitlines() if not line.startswith("#")]
    assert got == texts


def test_duplicate_histogram_series_written_once():
    rtt = Family("planewatch_test_dup_seconds", HISTOGRAM, "h", ("a",))
    rtt.add_histogram(("x",), (0.1,), (1,), 0.05, 1)
    rtt.add_histogram(("x",), (0.1,), (2,), 0.07, 2)       # the same series again: the first stays
    text = render([rtt]).decode()
    assert text.count('planewatch_test_dup_seconds_count{a="x"}') == 1
    assert 'planewatch_test_dup_seconds_count{a="x"} 1\n' in text
    assert 'planewatch_test_dup_seconds_bucket{a="x",le="0.1"} 1\n' in text


def test_extend_rendered_is_add_rendered_a_column_at_a_time():
    one, many = (Family("x_total", COUNTER, "x", ("a",)) for _ in range(2))
    labels = [render_labels(("a",), (v,)) for v in ("p", "q", 'r"s')]
    for rendered, value in zip(labels, (1, 2.5, 3)):
        one.add_rendered(rendered, value)
    many.extend_rendered(labels, (1, 2.5, 3))
    assert render([many]) == render([one]) and many.samples[2] == ('a="r\\"s"', 3)
    with pytest.raises(ValueError):
        many.extend_rendered(labels, (1, 2))


def test_same_objects_keeps_a_value_while_given_the_same_objects():
    from collector.registry import SameObjects
    made = []
    memo = SameObjects()
    a, b = object(), object()

    def make(*objects):
        made.append(objects)
        return len(made)
    assert memo.get("k", (a, b), make) == 1 and memo.get("k", (a, b), make) == 1     # asked twice in a pass
    memo.sweep()
    assert memo.get("k", (a, b), make) == 1 and len(made) == 1 and memo["k"] == 1
    assert memo.get("k", (a, object()), make) == 2      # another object: made again
    assert memo.get("k", (a,), make) == 3
    memo.sweep()
    memo.sweep()                                        # a pass that did not ask for "k"
    assert len(memo) == 0 and memo.get("k", (a,), make) == 4


def test_a_stream_renders_batch_by_batch_what_render_does_at_once():
    """The scraper hands each source's families to a Stream as the source ends;
    the pieces (and what the sink saw, in order) are render's bytes, a family a
    batch names twice merged as render merges it."""
    from exporters.exposition import Stream

    first, second = families()[:2], families()[2:]
    again = Family("planewatch_test_events_total", COUNTER, "Events.\nSecond line with \\ backslash.", ("a", "b"))
    again.add(("more", "x"), 7)
    seen: list[bytes] = []
    stream = Stream(seen.extend)
    assert stream.add(first + [again]) == []
    assert stream.add(second) == []
    want = render(families() + [again])
    assert b"".join(stream.parts) == want == b"".join(seen)
    assert b'planewatch_test_events_total{a="more",b="x"} 7\n' in want


def test_a_batch_naming_a_family_an_earlier_batch_rendered_is_refused_whole():
    """Prometheus rejects a scrape that says a family name twice: a later batch
    repeating a name is left out whole (its other families too), and the names
    are returned for the scraper to report."""
    from exporters.exposition import Stream

    stream = Stream()
    stream.add(families()[:2])
    other = Family("planewatch_test_other", GAUGE, "Other.", ("a",))
    other.add(("x",), 1)
    repeat = Family("planewatch_test_level", GAUGE, "A level.", ("a",))
    repeat.add(("late",), 2)
    assert stream.add([other, repeat]) == ["planewatch_test_level"]
    text = b"".join(stream.parts).decode()
    assert "planewatch_test_other" not in text and 'a="late"' not in text
    assert {f.name for f in text_string_to_metric_families(text)} == {"planewatch_test_events", "planewatch_test_level"}


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000])
def test_a_long_family_comes_in_pieces_of_chunk_series_with_every_line(n):
    """Big families are formatted CHUNK series a piece (each piece below the
    mmap threshold); the lines are the same, in order, floats and ints."""
    from exporters.exposition import CHUNK, render_parts

    ints = Family("planewatch_test_packets_total", COUNTER, "Packets.", ("pod",))
    floats = Family("planewatch_test_seconds", GAUGE, "Seconds.", ("pod",))
    for i in range(n):
        ints.add((f"p{i}",), i * 7)
        floats.add((f"p{i}",), i / 4)
    parts = render_parts([ints, floats])
    pieces_per_family = -(-n // CHUNK)
    assert len(parts) == 2 * (1 + pieces_per_family)
    lines = b"".join(parts).decode().splitlines()
    assert [line for line in lines if line.startswith("planewatch_test_packets_total{")] == \
        [f'planewatch_test_packets_total{{pod="p{i}"}} {i * 7}' for i in range(n)]
    assert [line for line in lines if line.startswith("planewatch_test_seconds{")] == \
        [f'planewatch_test_seconds{{pod="p{i}"}} {format_value(i / 4)}' for i in range(n)]
