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

from cellos_probed.probes import fc_metrics_parse
from cellos_probed.probes.fc_metrics_parse import (
    TIMESTAMP_KEY,
    LineSplitter,
    MetricsAccumulator,
    MetricsReading,
    is_gauge,
    merge,
    parse_line,
)
from testbed.fc_emulator.metrics import VmMetrics


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
    assert splitter.feed(b"xx\nok\n" + b"y" * 200 + b"\nfine\n") == [b"ok", b"fine"]
    assert splitter.oversize == 2


def test_torn_line_is_recovered_from_the_last_line_start() -> None:
    whole = line(2, 5, 0, (1, 2, 3))
    torn = line(1, 7, 0, (1, 2, 3))[:50] + whole
    assert parse_line(torn) == (json.loads(whole), True)
    assert parse_line(b'{"utc_timestamp_ms":1,"net":{') == (None, True)
    assert parse_line(b"\0\0\0" + whole) == (json.loads(whole), False)  # a truncated file's hole
    assert parse_line(b"\0\0") == (None, False)
    assert parse_line(b"[1,2]") == (None, True)


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
    total = merge(merge(None, first), second)
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
    accumulator.feed(whole + b"\n")
    reading = accumulator.take_reading_json()
    expected = json.loads(whole)
    del expected["utc_timestamp_ms"]
    assert reading.delta == whole.replace(b'"utc_timestamp_ms":7,', b"")
    assert orjson.loads(reading.delta) == expected
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
    # read, not yet taken: already in the totals, and held only as text
    assert acc._totals["net_eth0"]["rx_bytes_count"] == 10
    assert acc._pending is None
    assert acc._pending_text is not None
    reading = acc.take_reading_json()
    assert reading.lost_lines == 2
    acc.feed(line(2, 5, 0, (1, 1, 1), missed=1) + b"\n" + line(3, 7, 0, (1, 1, 1)) + b"\n")
    two = acc.take_reading()
    assert (two.lines, two.lost_lines) == (2, 1)
    assert two.delta["net_eth0"]["rx_bytes_count"] == 12
    assert two.totals["net_eth0"]["rx_bytes_count"] == 22
    assert two.totals["logger"]["missed_metrics_count"] == 3


# -- a reading's first line added from its text (add_line): the readings of the ordinary path


def emulator_records(rng: random.Random) -> list[bytes]:
    """A metrics stream's records, each ending with ``\\n``: emulator lines with activity,
    and what else a stream holds: torn lines, garbage, NUL holes, blank records, lines not
    in the compact form, unfinished objects, a negative timestamp, lost lines, a device
    appearing mid-stream (its section lands in the middle of the line), and now and then a
    nested key literally named utc_timestamp_ms in every line. The first three are clean."""
    nested = rng.random() < 0.3
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
        records.append(text + b"\n")
        previous = text
    return records


def assert_same_readings(fast: MetricsReading, slow: MetricsReading) -> None:
    counts = ("utc_timestamp_ms", "lines", "torn_lines", "unparsed_lines", "lost_lines")
    for name in counts:
        a, b = getattr(fast, name), getattr(slow, name)
        assert (type(a), a) == (type(b), b), name

    def as_json(value: Any) -> bytes:  # take_reading_json gives the text already
        return value if isinstance(value, bytes) else orjson.dumps(value)

    assert as_json(fast.delta) == as_json(slow.delta)
    assert as_json(fast.totals) == as_json(slow.totals)


class Counting:
    """``add_line`` (or ``add_text``), counting the lines it took."""

    def __init__(self, name: str = "add_line") -> None:
        self.real = getattr(fc_metrics_parse, name)
        assert self.real is not None
        self.taken = 0

    def __call__(self, *args: Any) -> Any:
        assert self.real is not None
        got = self.real(*args)
        self.taken += got is not None
        return got


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**64), path=st.sampled_from(["add_text", "add_line"]))
def test_readings_are_the_same_with_and_without_the_fast_paths(seed: int, path: str) -> None:
    """Totals kept as text (add_text), or as objects a line's text is added into
    (add_line), give every reading exactly as parsing and merging each line does."""
    rng = random.Random(seed)
    records = emulator_records(rng)
    fast, slow = MetricsAccumulator(), MetricsAccumulator()
    counting = Counting(path)
    other = "add_line" if path == "add_text" else "add_text"

    def feed(chunk: bytes) -> None:
        with (
            patch.object(fc_metrics_parse, path, counting),
            patch.object(fc_metrics_parse, other, None),
        ):
            completed = fast.feed(chunk)
        with (
            patch.object(fc_metrics_parse, "add_line", None),
            patch.object(fc_metrics_parse, "add_text", None),
        ):
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


def test_add_line_keeps_the_parse_of_a_line_delta_text_cannot_cut() -> None:
    base = orjson.loads(line(1, 10, 0, (1, 2, 3), missed=1))
    nested = copy.deepcopy(base)
    nested["net_eth0"]["utc_timestamp_ms"] = 5  # the text cut would be wrong
    for first, second in [
        (nested, {**nested, "utc_timestamp_ms": 2}),
        (base, {**base, "utc_timestamp_ms": -2}),  # delta_text wants digits
    ]:
        fast, slow = MetricsAccumulator(), MetricsAccumulator()
        counting = Counting()
        for accumulator, add in ((fast, counting), (slow, None)):
            with (
                patch.object(fc_metrics_parse, "add_line", add),
                patch.object(fc_metrics_parse, "add_text", None),
            ):
                accumulator.feed(orjson.dumps(first) + b"\n")
                accumulator.take_reading_json()
                accumulator.feed(orjson.dumps(second) + b"\n")
        assert counting.taken == 1
        assert fast._pending_text is None
        assert fast._pending is not None
        assert TIMESTAMP_KEY not in fast._pending
        assert_same_readings(fast.take_reading_json(), slow.take_reading_json())


def test_add_line_is_tried_on_a_reading_s_first_line_only() -> None:
    counting = Counting()
    accumulator = MetricsAccumulator()
    with (
        patch.object(fc_metrics_parse, "add_line", counting),
        patch.object(fc_metrics_parse, "add_text", None),
    ):
        accumulator.feed(line(1, 10, 0, (1, 1, 1)) + b"\n")  # the first: the totals are empty
        assert counting.taken == 0
        accumulator.take_reading()
        accumulator.feed(
            b"\0\0" + line(2, 5, 0, (1, 1, 1)) + b"\n" + line(3, 7, 0, (1, 1, 1)) + b"\n"
        )
        assert counting.taken == 1  # the second line of the reading is parsed and summed
        reading = accumulator.take_reading()
    assert (reading.lines, reading.utc_timestamp_ms) == (2, 3)
    assert reading.delta["net_eth0"]["rx_bytes_count"] == 12
    assert reading.totals["net_eth0"]["rx_bytes_count"] == 22


def test_a_reading_of_several_lines_keeps_the_totals_as_text() -> None:
    """Every VMM's own 60 s timer adds a second line to a reading now and then: the
    totals stay text (only the delta is summed as objects), and the reading is the
    same as parsing and merging every line."""
    fast, slow = MetricsAccumulator(), MetricsAccumulator()
    first = line(1, 10, 0, (1, 2, 3)) + b"\n"
    pair = line(2, 5, 1, (1, 1, 1)) + b"\n" + line(3, 7, 0, (2, 2, 2)) + b"\n"
    with (
        patch.object(fc_metrics_parse, "add_line", None),
        patch.object(fc_metrics_parse, "add_text", None),
    ):
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
