"""The pure half of fc_metrics: splitting, torn-line recovery, summing."""

from __future__ import annotations

import copy
import json
import random
from typing import Any
from unittest.mock import patch

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellos_probed.probes import _fc_sum, fc_metrics_parse
from cellos_probed.probes.fc_metrics_parse import (
    TIMESTAMP_KEY,
    LineSplitter,
    MetricsAccumulator,
    MetricsReading,
    decode_labels,
    is_gauge,
    merge_into,
    parse_line,
    split_labels,
)
from testbed.fc_emulator.metrics import VmMetrics

#: Firecracker main's ``emit_id`` / ``properties`` (a BTreeMap: keys sorted), escapes included
LABELS: dict[str, Any] = {
    "id": "cell-1",
    "properties": {"bundle_id": 'fn-"abc"', "customer_id": "1234", "note": "Zoë\n\\\u0001"},
}


def line(ts: int, rx: int, faults: int, agg: tuple[int, int, int], missed: int = 0) -> bytes:
    body = {
        "utc_timestamp_ms": ts,
        "api_server": {"process_startup_time_us": 9},
        "logger": {"missed_metrics_count": missed},
        "net_eth0": {
            "rx_bytes_count": rx,
            "tap_write_agg": dict(zip(("min_us", "max_us", "sum_us"), agg, strict=True)),
        },
        "seccomp": {"num_faults": faults},
        "signals": {"sigpipe": 1, "sigsegv": 1},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def test_lines_split_the_same_whatever_the_chunking() -> None:
    stream = b"".join(line(i, i, 0, (1, 2, 3)) + b"\n" for i in range(20))
    rng = random.Random(0)
    for _ in range(50):
        splitter, lines, at = LineSplitter(), [], 0
        while at < len(stream):
            size = rng.randint(1, 1024)
            lines += splitter.feed(stream[at : at + size])
            at += size
        assert lines == stream.split(b"\n")[:-1]
        assert splitter.pending_bytes == 0


def test_oversize_lines_are_dropped_and_counted_memory_stays_bounded() -> None:
    splitter = LineSplitter(max_line=100)
    assert splitter.feed(b"x" * 60) == []
    assert splitter.feed(b"x" * 60) == []  # over the bound: dropped now, skipped to its end
    assert splitter.pending_bytes == 0
    assert splitter.cutting
    assert splitter.feed(b"xx\nok\n" + b"y" * 200 + b"\nfine\n") == [b"ok", b"fine"]
    assert not splitter.cutting
    assert splitter.oversize == 2


def test_a_line_start_ends_an_oversize_line_whatever_the_chunking() -> None:
    """What follows a runaway line without its newline is read from its line start,
    one split across two chunks too."""
    good = line(1, 5, 0, (1, 2, 3))
    bound = 2 * len(good)
    for stream in (
        b"x" * 3 * bound + good + b"\n",  # the start after the cut
        b"x" * (bound + 10) + good + b"\n",  # within the partial being cut
        b"x" * (bound - 10) + b"y" * bound + good + b"\n",
    ):
        for size in (1, 7, 19, 20, 33, 64, 1000):
            splitter, lines = LineSplitter(max_line=bound), []
            for at in range(0, len(stream), size):
                lines += splitter.feed(stream[at : at + size])
            assert lines == [good], (len(stream), size)
            assert splitter.oversize == 1
            assert not splitter.cutting
    # a line start in a cut line's last max_line bytes: a line from there on
    splitter = LineSplitter(max_line=bound)
    assert splitter.feed(b"x" * 5 * bound + good + b"\nok\n") == [good, b"ok"]
    assert splitter.oversize == 1


def test_a_cut_line_is_torn_and_unparsed_but_not_a_record() -> None:
    good = line(1, 5, 0, (1, 2, 3))
    acc = MetricsAccumulator(max_line=2 * len(good))
    acc.feed(b"x" * 10 * len(good))
    assert acc.cutting
    assert (acc.oversize, acc.records) == (1, 0)  # not a line that arrived
    acc.feed(good + b"\n")
    reading = acc.take_reading()
    assert (reading.lines, reading.torn_lines, reading.unparsed_lines) == (1, 1, 1)
    assert acc.records == 1


def test_torn_line_is_recovered_from_the_last_line_start() -> None:
    whole = line(2, 5, 0, (1, 2, 3))
    torn = line(1, 7, 0, (1, 2, 3))[:50] + whole
    assert parse_line(torn) == ([json.loads(whole)], True)
    assert parse_line(b'{"utc_timestamp_ms":1,"net":{') == ([], True)
    assert parse_line(b"\0\0\0" + whole) == ([json.loads(whole)], False)  # a truncated file's hole
    assert parse_line(b"\0\0") == ([], False)
    assert parse_line(b"[1,2]") == ([], True)
    assert parse_line(b"garbage" + whole) == ([json.loads(whole)], True)


def test_two_whole_objects_on_one_line_are_both_taken() -> None:
    # the pipe was full just at the newline: the next object follows the first's brace
    first, second, third = (
        line(1, 7, 0, (1, 2, 3)),
        line(2, 5, 0, (1, 2, 3)),
        line(3, 1, 0, (1, 1, 1)),
    )
    objects = [json.loads(text) for text in (first, second, third)]
    assert parse_line(first + second) == (objects[:2], False)
    assert parse_line(first + second + third) == (objects, False)
    assert parse_line(first + second[:40] + third) == ([objects[0], objects[2]], True)
    acc = MetricsAccumulator()
    acc.feed(first + b"\n")
    acc.take_reading()
    acc.feed(second + third + b"\n")
    reading = acc.take_reading()
    assert (reading.lines, reading.torn_lines, reading.utc_timestamp_ms) == (2, 0, 3)
    assert reading.delta["net_eth0"]["rx_bytes_count"] == 6
    assert reading.totals["net_eth0"]["rx_bytes_count"] == 13
    assert acc.records == 2  # records: what ended with a newline


def test_gauges_follow_firecrackers_store_metrics() -> None:
    assert is_gauge("latencies_us", "pause_vm")
    assert is_gauge("api_server", "process_startup_time_us")
    assert is_gauge("seccomp", "num_faults")
    assert is_gauge("vmm", "panic_count")
    assert is_gauge("signals", "sigsegv")
    assert not is_gauge("signals", "sigpipe")
    assert is_gauge("vhost_user_block_vu0", "init_time_us")
    assert not is_gauge("vhost_user_block_vu0", "cfg_fails")
    assert is_gauge("net_eth0", "tap_write_agg", "max_us")
    assert not is_gauge("net_eth0", "tap_write_agg", "sum_us")
    assert not is_gauge("net_eth0", "rx_bytes_count")


def test_merge_sums_counters_keeps_latest_gauges_and_changes_nothing() -> None:
    first = json.loads(line(1, 10, 2, (5, 50, 100)))
    second = json.loads(line(2, 4, 3, (5, 70, 30)))
    kept = copy.deepcopy((first, second))
    total: dict[str, Any] = {}
    merge_into(total, first)
    merge_into(total, second)
    assert (first, second) == kept
    assert total == {
        "api_server": {"process_startup_time_us": 9},
        "logger": {"missed_metrics_count": 0},
        "net_eth0": {
            "rx_bytes_count": 14,
            "tap_write_agg": {"min_us": 5, "max_us": 70, "sum_us": 130},
        },
        "seccomp": {"num_faults": 3},
        "signals": {"sigpipe": 2, "sigsegv": 1},
    }


def test_accumulator_readings_count_lines_torn_and_loss() -> None:
    acc = MetricsAccumulator()
    acc.feed(line(1, 10, 0, (1, 1, 1)) + b"\n" + line(2, 5, 0, (1, 1, 1))[:30])
    assert acc.records == 1
    acc.feed(line(3, 1, 0, (1, 1, 1), missed=1) + b"\ngarbage\n")
    first = acc.take_reading()
    assert (first.lines, first.torn_lines, first.unparsed_lines, first.lost_lines) == (2, 2, 1, 1)
    assert first.utc_timestamp_ms == 3
    assert first.delta["net_eth0"]["rx_bytes_count"] == 11
    acc.feed(line(4, 100, 0, (1, 1, 1)) + b"\n")
    second = acc.take_reading()
    assert (second.lines, second.torn_lines, second.lost_lines) == (1, 0, 0)
    assert second.delta["net_eth0"]["rx_bytes_count"] == 100
    assert second.totals["net_eth0"]["rx_bytes_count"] == 111
    assert second.totals["logger"]["missed_metrics_count"] == 1
    assert first.totals["net_eth0"]["rx_bytes_count"] == 11  # published sums never change


def test_a_one_line_delta_is_the_line_without_its_timestamp() -> None:
    # the delta of a single whole line is cut from its text, never re-serialised
    import orjson

    from cellos_probed.probes.fc_metrics_parse import delta_text

    whole = line(7, 100, 2, (1, 5, 9))
    assert delta_text(whole) == b"{" + whole[whole.index(b",") + 1 :]
    accumulator = MetricsAccumulator()
    accumulator.feed(line(6, 1, 0, (1, 1, 1)) + b"\n")
    accumulator.take_reading_json()  # from now on the totals are text, and lines summed so
    accumulator.feed(whole + b"\n")
    assert accumulator._pending_text == whole.replace(b'"utc_timestamp_ms":7,', b"")
    reading = accumulator.take_reading_json()
    expected = json.loads(whole)
    del expected["utc_timestamp_ms"]
    del expected["logger"]  # its one leaf is 0
    assert reading.delta == orjson.dumps(expected)
    # two lines: the delta is their sum, not either line's text
    accumulator.feed(line(8, 1, 0, (1, 1, 1)) + b"\n" + line(9, 2, 0, (1, 1, 1)) + b"\n")
    summed = orjson.loads(accumulator.take_reading_json().delta)
    assert summed["net_eth0"]["rx_bytes_count"] == 3


def test_a_line_not_in_firecrackers_compact_form_is_serialised_from_its_parse() -> None:
    from cellos_probed.probes.fc_metrics_parse import delta_text

    assert delta_text(b'{"utc_timestamp_ms": 7, "net_eth0": {}}') is None  # spaces
    assert delta_text(b'{"net_eth0":{},"utc_timestamp_ms":7}') is None  # another member first
    assert delta_text(b'{"utc_timestamp_ms":-7,"a":{}}') is None
    assert delta_text(b'{"utc_timestamp_ms":7}') is None  # nothing after it
    twice = b'{"utc_timestamp_ms":7,"a":{"b":1},"utc_timestamp_ms":8}'
    assert delta_text(twice) is None
    accumulator = MetricsAccumulator()
    accumulator.feed(twice + b"\n")
    import orjson

    assert orjson.loads(accumulator.take_reading_json().delta) == {"a": {"b": 1}}


def test_a_one_line_reading_counts_its_lost_lines_and_its_totals_at_once() -> None:
    acc = MetricsAccumulator()
    acc.feed(line(1, 10, 0, (1, 1, 1), missed=2) + b"\n")
    # read, not yet taken: already in the totals; the first line is parsed (the
    # totals are not text yet), and its delta kept as the object
    assert acc._totals["net_eth0"]["rx_bytes_count"] == 10
    assert acc._pending is not None
    assert acc._pending_text is None
    reading = acc.take_reading_json()
    assert reading.lost_lines == 2
    acc.feed(line(2, 5, 0, (1, 1, 1), missed=4) + b"\n")
    # from then on a line is added into the totals' text, and its delta is its text
    assert acc._pending is None
    assert acc._pending_text is not None
    assert acc.take_reading_json().lost_lines == 4
    acc.feed(line(3, 5, 0, (1, 1, 1), missed=1) + b"\n" + line(4, 7, 0, (1, 1, 1)) + b"\n")
    two = acc.take_reading()
    assert (two.lines, two.lost_lines) == (2, 1)
    assert two.delta["net_eth0"]["rx_bytes_count"] == 12
    assert two.totals["net_eth0"]["rx_bytes_count"] == 27
    assert two.totals["logger"]["missed_metrics_count"] == 7


def test_a_reading_publishes_no_zero_leaf_only_its_sections_and_totals_when_asked() -> None:
    import orjson

    acc = MetricsAccumulator()
    for ts in (1, 2):
        acc.feed(line(ts, 10, 0, (0, 0, 4)) + b"\n")
        narrowed = acc.take_reading_json(sections=(b"net_eth0", b"seccomp", b"absent"))
        assert orjson.loads(narrowed.delta) == {
            "net_eth0": {"rx_bytes_count": 10, "tap_write_agg": {"sum_us": 4}}
        }
        assert orjson.loads(narrowed.totals) == {
            "net_eth0": {"rx_bytes_count": 10 * ts, "tap_write_agg": {"sum_us": 4 * ts}}
        }
    acc.feed(line(3, 0, 0, (0, 0, 0)) + b"\n")
    bare = acc.take_reading_json(with_totals=False)
    assert bare.totals is None
    assert orjson.loads(bare.delta) == {
        "api_server": {"process_startup_time_us": 9},
        "signals": {"sigpipe": 1, "sigsegv": 1},
    }
    # not published, the totals were still summed
    assert acc.take_reading().totals["net_eth0"]["rx_bytes_count"] == 20


# -- lines summed text to text (add_text): the readings of parsing and merging each line


def emulator_records(rng: random.Random) -> list[bytes]:
    """A metrics stream's records, each ending with ``\\n``: emulator lines with activity,
    and what else a stream holds: torn lines, garbage, NUL holes, blank records, lines not
    in the compact form, unfinished objects, a negative timestamp, lost lines, a device
    appearing mid-stream (its section lands in the middle of the line), two objects on one
    line, now and then a nested key literally named utc_timestamp_ms in every line, and
    Firecracker main's ``id``/``properties`` in every line. The first three are clean."""
    nested = rng.random() < 0.3
    labels = rng.choice([{}, LABELS, {"id": "vm-1"}, {"properties": {}}])
    vm = VmMetrics()
    plug = rng.randint(8, 40)
    records = []
    previous = b'{"utc_timestamp_ms":1,"vmm":{"panic_count":0}}'
    for i in range(rng.randint(15, 35)):
        if i == plug:
            vm = VmMetrics(nets=("eth0", "eth1"), blocks=("data", "rootfs"))
        vm.synthetic_activity(rng, 1.0)
        if rng.random() < 0.3:
            vm.bump_everything(rng)
        obj, deltas = vm.build_line(1_700_000_000_000 + 1000 * i)
        vm.commit(deltas, None, True)
        if nested:
            obj["extra"] = {"n": i, "utc_timestamp_ms": i}
        if labels:
            obj = {TIMESTAMP_KEY: obj.pop(TIMESTAMP_KEY), **labels, **obj}
        kind = rng.random() if i >= 3 else 1.0
        if 0.20 <= kind < 0.25:
            obj["logger"]["missed_metrics_count"] = rng.randint(1, 5)
        elif 0.25 <= kind < 0.28:
            obj["utc_timestamp_ms"] = -obj["utc_timestamp_ms"]
        text = orjson.dumps(obj)
        if kind < 0.05:
            text = previous[: rng.randint(0, len(previous))] + text
        elif kind < 0.08:
            text = rng.choice([b"garbage{", b"[]", b"{}", text[: rng.randint(1, len(text) - 1)]])
        elif kind < 0.12:
            text = b"\0" * rng.randint(1, 50) + text
        elif kind < 0.14:
            text = b"\0" * rng.randint(0, 5)
        elif kind < 0.17:
            text = json.dumps(obj).encode()
        elif kind < 0.20:
            text = text + rng.choice([b" ", b"\r", b"x"])
        elif 0.28 <= kind < 0.31:
            text = previous + text
        records.append(text + b"\n")
        previous = text
    return records


def assert_same_readings(fast: MetricsReading, slow: MetricsReading) -> None:
    counts = ("utc_timestamp_ms", "lines", "torn_lines", "unparsed_lines", "lost_lines", "labels")
    for name in counts:
        a, b = getattr(fast, name), getattr(slow, name)
        assert (type(a), a) == (type(b), b), name

    def as_json(value: Any) -> bytes:  # take_reading_json gives the text already
        return value if isinstance(value, bytes) else orjson.dumps(value)

    assert as_json(fast.delta) == as_json(slow.delta)
    assert as_json(fast.totals) == as_json(slow.totals)


class Counting:
    """``add_text``, counting the lines it took."""

    def __init__(self) -> None:
        self.taken = 0

    def __call__(self, layout: bytes, totals: bytes, line: bytes) -> Any:
        got = _fc_sum.add_text(layout, totals, line)
        self.taken += got is not None
        return got


def refuse(layout: bytes, totals: bytes, line: bytes) -> None:
    """An ``add_text`` that takes no line: every line parsed and merged as objects."""


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**64))
def test_readings_are_the_same_with_and_without_the_text_path(seed: int) -> None:
    """Totals kept as text (add_text) give every reading exactly as parsing and
    merging each line does."""
    rng = random.Random(seed)
    records = emulator_records(rng)
    fast, slow = MetricsAccumulator(), MetricsAccumulator()
    counting = Counting()

    def feed(chunk: bytes) -> None:
        with patch.object(fc_metrics_parse, "add_text", counting):
            completed = fast.feed(chunk)
        with patch.object(fc_metrics_parse, "add_text", refuse):
            assert slow.feed(chunk) == completed
        assert fast.records == slow.records

    def compare() -> None:
        if rng.random() < 0.5:
            assert_same_readings(fast.take_reading(), slow.take_reading())
        else:
            assert_same_readings(fast.take_reading_json(), slow.take_reading_json())

    feed(b"".join(records[:2]))  # the totals begin
    compare()
    feed(records[2])  # a reading's first line, shaped as the totals: added from its text
    assert counting.taken == 1
    compare()
    stream = b"".join(records[3:])
    at = 0
    while at < len(stream):
        size = rng.choice([rng.randint(1, 300), rng.randint(1, 8000), rng.randint(1, 30000)])
        feed(stream[at : at + size])
        at += size
        if rng.random() < 0.05:
            fast.truncated()
            slow.truncated()
        if rng.random() < 0.3:
            compare()
    compare()


def test_add_text_keeps_the_parse_of_a_line_delta_text_cannot_cut() -> None:
    base = orjson.loads(line(1, 10, 0, (1, 2, 3), missed=1))
    nested = copy.deepcopy(base)
    nested["net_eth0"]["utc_timestamp_ms"] = 5  # the text cut would be wrong
    for first, second in [
        (nested, {**nested, "utc_timestamp_ms": 2}),
        (base, {**base, "utc_timestamp_ms": -2}),  # delta_text wants digits
    ]:
        fast, slow = MetricsAccumulator(), MetricsAccumulator()
        counting = Counting()
        for accumulator, add in ((fast, counting), (slow, refuse)):
            with patch.object(fc_metrics_parse, "add_text", add):
                accumulator.feed(orjson.dumps(first) + b"\n")
                accumulator.take_reading_json()
                accumulator.feed(orjson.dumps(second) + b"\n")
        assert counting.taken == 1
        assert fast._pending_text is None
        assert fast._pending is not None
        assert TIMESTAMP_KEY not in fast._pending
        assert_same_readings(fast.take_reading_json(), slow.take_reading_json())


def test_a_reading_of_several_lines_keeps_the_totals_as_text() -> None:
    """Every VMM's own 60 s timer adds a second line to a reading now and then: the
    totals stay text (only the delta is summed as objects), and the reading is the
    same as parsing and merging every line."""
    fast, slow = MetricsAccumulator(), MetricsAccumulator()
    first = line(1, 10, 0, (1, 2, 3)) + b"\n"
    pair = line(2, 5, 1, (1, 1, 1)) + b"\n" + line(3, 7, 0, (2, 2, 2)) + b"\n"
    with patch.object(fc_metrics_parse, "add_text", refuse):
        slow.feed(first)
        expected = [slow.take_reading_json()]
        slow.feed(pair)
        expected.append(slow.take_reading_json())
    fast.feed(first)
    got = [fast.take_reading_json()]
    assert fast._totals_text is not None  # from the first reading on
    fast.feed(pair)
    assert fast._totals_text is not None  # not taken back as objects for the second line
    assert fast._pending is not None  # the delta of two lines: a sum of objects
    got.append(fast.take_reading_json())
    for a, b in zip(got, expected, strict=True):
        assert_same_readings(a, b)
    assert got[1].lines == 2
    assert orjson.loads(got[1].totals)["net_eth0"]["rx_bytes_count"] == 22


# -- Firecracker main's id / properties: labels, cut from the text, never summed


def labelled(text: bytes, labels: dict[str, Any] = LABELS) -> bytes:
    """A line as Firecracker main writes it with ``emit_id`` and ``properties``."""
    obj = orjson.loads(text)
    return orjson.dumps({TIMESTAMP_KEY: obj.pop(TIMESTAMP_KEY), **labels, **obj})


def test_labels_are_cut_from_the_text_as_firecracker_writes_them() -> None:
    plain = line(7, 1, 0, (1, 2, 3))
    text = labelled(plain)
    assert text.startswith(b'{"utc_timestamp_ms":7,"id":"cell-1","properties":{"bundle_id":')
    cut, rest = split_labels(text)
    assert rest == plain
    assert cut is not None
    assert orjson.loads(b"{" + cut + b"}") == LABELS
    assert decode_labels(cut) == LABELS
    assert split_labels(plain) == (None, plain)
    assert split_labels(labelled(plain, {"properties": {}})) == (b'"properties":{}', plain)
    # anything but the compact form is the parse's to take apart
    for odd in (
        b'{"utc_timestamp_ms":7,"id":"x"}',  # nothing after it
        b'{"utc_timestamp_ms":7, "id":"x","vmm":{}}',
        b'{"utc_timestamp_ms":7,"id":5,"vmm":{}}',
        b'{"utc_timestamp_ms":7,"id":"\\q","vmm":{}}',  # not a JSON escape
        b'{"utc_timestamp_ms":7,"properties":{"a":1},"vmm":{}}',
        b'{"utc_timestamp_ms":7,"vmm":{},"id":"x"}',
    ):
        assert split_labels(odd) == (None, odd)
    assert decode_labels({"id": 5, "properties": {"a": 1}}) is None  # named only when strings
    assert decode_labels({"id": "x", "properties": []}) == {"id": "x"}
    assert decode_labels(b'"id":"\xff"') is None  # not UTF-8


def test_lines_with_labels_are_summed_by_the_fast_path_and_name_them() -> None:
    texts = [line(i, i, i % 3, (i, 2 * i, 3 * i)) for i in range(1, 8)]
    # emit_id set from the second line on (a restart with PUT /metrics, say)
    records = [texts[0] + b"\n", *(labelled(text) + b"\n" for text in texts[1:])]
    chunks = [records[0], records[1], b"".join(records[2:5]), b"".join(records[5:])]
    counting = Counting()
    fast, slow = MetricsAccumulator(), MetricsAccumulator()
    fast_readings, slow_readings = [], []
    with patch.object(fc_metrics_parse, "add_text", counting):
        for chunk in chunks:
            fast.feed(chunk)
            fast_readings.append(fast.take_reading_json())
    with patch.object(fc_metrics_parse, "add_text", refuse):
        for chunk in chunks:
            slow.feed(chunk)
            slow_readings.append(slow.take_reading_json())
    assert counting.taken == 6  # every line once the totals are text, each from its text
    for fast_reading, slow_reading in zip(fast_readings, slow_readings, strict=True):
        assert_same_readings(fast_reading, slow_reading)
    assert [reading.labels for reading in fast_readings] == [None, LABELS, LABELS, LABELS]
    for reading in fast_readings:
        for sums in (reading.delta, reading.totals):
            assert b'"id"' not in sums
            assert b"properties" not in sums


def test_the_newest_labels_of_a_reading_are_named_and_odd_ones_left_out() -> None:
    acc = MetricsAccumulator()
    acc.feed(labelled(line(1, 1, 0, (1, 1, 1)), {"id": "old"}) + b"\n")
    acc.feed(line(2, 1, 0, (1, 1, 1)) + b"\n")  # a new process without emit_id
    first = acc.take_reading()
    assert first.labels == {"id": "old"}  # the newest line that had them
    odd = b'{"utc_timestamp_ms": 3, "id": 5, "properties": {"a": 1}, "vmm": {"panic_count": 0}}'
    acc.feed(odd + b"\n")
    second = acc.take_reading()
    assert second.labels is None
    assert second.lines == 1
    assert "id" not in second.delta
    assert "properties" not in second.totals
    acc.feed(b'{"utc_timestamp_ms": 4, "id": "spaced", "vmm": {"panic_count": 0}}\n')
    assert acc.take_reading().labels == {"id": "spaced"}  # taken from the parse
