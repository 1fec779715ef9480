"""The C summing (``_fc_sum.c``) against its specification, tests/fc_sum_reference.py.

``merge_into`` is held to ``merge_into_reference`` called with the same
configuration: results compared leaf by leaf with their types (``True == 1``),
key order included; errors by type and message; the gauge caches too.
``add_text`` (totals kept as JSON text) is held to ``orjson.loads`` of the
totals and the line, the reference, and ``orjson.dumps``, where it takes a
line; which lines it must take and must refuse is tested too. ``trim`` (what a
reading publishes of a delta or the totals) is held likewise to
``trim_reference`` on the parsed text, serialised.
"""

from __future__ import annotations

import copy
import gc
import random
import re
import sys
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any
from unittest.mock import patch

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellos_probed.probes import _fc_sum
from cellos_probed.probes import fc_metrics_parse as p
from cellos_probed.probes.fc_metrics_parse import (
    TIMESTAMP_KEY,
    MetricsAccumulator,
    is_gauge,
    merge_into,
)
from testbed.fc_emulator.metrics import VmMetrics
from tests.fc_sum_reference import merge_into_reference, trim_reference

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Tree = dict[Any, Any]
Merge = Callable[[Tree, Tree], None]


class IntSub(int):
    pass


class DictSub(dict[Any, Any]):
    pass


def c_merge(
    cache: dict[Any, Any],
    limit: int = p._GAUGE_CACHE_LIMIT,
    is_gauge: Callable[[str, str], object] = p.is_gauge,
) -> Merge:
    return partial(_fc_sum.merge_into, cache, is_gauge, p._AGG_GAUGES, limit)


def ref_merge(
    cache: dict[Any, Any],
    limit: int = p._GAUGE_CACHE_LIMIT,
    is_gauge: Callable[[str, str], object] = p.is_gauge,
) -> Merge:
    return partial(merge_into_reference, cache, is_gauge, p._AGG_GAUGES, limit)


def reference(total: Tree, new: Tree) -> None:
    """The reference with the module's configuration (a cache of its own)."""
    ref_merge({})(total, new)


def refuse_text(layout: bytes, totals: bytes, line: bytes) -> None:
    """An ``add_text`` that takes no line: every line parsed and merged."""


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """``a == b`` with the type of every node and key and the order of every dict."""
    assert type(a) is type(b), f"{path}: {a!r} ({type(a)}) != {b!r} ({type(b)})"
    if isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], path
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key!r}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def outcome(merge: Merge, total: Tree, new: Tree) -> str | None:
    try:
        merge(total, new)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def exact_dicts(tree: Tree) -> Iterator[Tree]:
    """The sections and the fields of ``tree`` that are dicts (exactly): what a merge copies."""
    for section in tree.values():
        if type(section) is dict:
            yield section
            yield from (field for field in section.values() if type(field) is dict)


def realistic_lines(count: int, seed: int) -> list[Tree]:
    vm = VmMetrics()
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        vm.synthetic_activity(rng, 1.0)
        obj, deltas = vm.build_line(1_700_000_000_000 + 1000 * i)
        vm.commit(deltas, None, True)
        lines.append(orjson.loads(orjson.dumps(obj)))
    return lines


# -- random trees: the real gauge names (every rule of is_gauge), and all a line should not hold
SECTIONS = ["api_server", "latencies_us", "seccomp", "vmm", "signals", "vhost_user_block_vu0"]
SECTIONS += ["net_eth0", "block", "logger", TIMESTAMP_KEY]
FIELDS = ["num_faults", "panic_count", "sigpipe", "sigsegv", "init_time_us", "cfg_fails"]
FIELDS += ["rx_bytes_count", "tap_write_agg", "pause_vm", "missed_metrics_count"]
SUBS = ["min_us", "max_us", "sum_us", "count"]

ints = st.one_of(
    st.sampled_from([0, 0, 0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1]),
    st.integers(-5, 300),
    st.integers(-(2**80), 2**80),
)
sub_keys = st.one_of(st.sampled_from(SUBS), st.sampled_from(SUBS), st.text(max_size=2))
flat_others = st.one_of(
    st.booleans(),
    st.none(),
    st.floats(),
    st.text(max_size=3),
    st.builds(IntSub, st.integers(-3, 3)),
    st.builds(DictSub, st.dictionaries(st.sampled_from(SUBS), ints, max_size=2)),
    st.lists(ints, max_size=2),
)
nested = st.dictionaries(sub_keys, st.one_of(ints, flat_others), max_size=2)
others = st.one_of(flat_others, nested)
# bools and int subclasses often, where an int would be: they must not be added
not_quite_ints = st.one_of(st.booleans(), st.builds(IntSub, st.integers(-3, 3)))
agg_leaves = st.one_of(ints, ints, ints, not_quite_ints, others)
aggs = st.one_of(
    st.fixed_dictionaries({}, optional=dict.fromkeys(SUBS, agg_leaves)),
    st.dictionaries(sub_keys, agg_leaves, max_size=4),
)
field_keys = st.one_of(
    st.sampled_from(FIELDS), st.sampled_from(FIELDS), st.text(max_size=2), st.integers(0, 1)
)
field_values = st.one_of(ints, ints, ints, not_quite_ints, aggs, aggs, others)
fields = st.dictionaries(field_keys, field_values, max_size=8)
section_keys = st.one_of(
    st.sampled_from(SECTIONS), st.sampled_from(SECTIONS), st.text(max_size=2), st.integers(0, 1)
)
lines = st.dictionaries(section_keys, st.one_of(fields, fields, ints, others), max_size=6)


mostly = st.sampled_from([True] * 5 + [False])
# a field of a stream's shape is mostly a counter or mostly an agg, now and then something else
agg_subs = st.one_of(ints, ints, ints, agg_leaves)
agg_objects = st.one_of(
    *[st.fixed_dictionaries(dict.fromkeys(SUBS[:3], agg_subs), optional={"count": agg_subs})] * 3,
    field_values,
)
counters = st.one_of(ints, ints, ints, field_values)


@st.composite
def line_sequences(draw: st.DrawFn) -> tuple[Tree, list[Tree]]:
    """A start and lines over one shape (sections and their fields), as a stream is.

    Each line has most of the shape's leaves, in its own order at times, with
    values of any kind; a section may be an int or anything else, or absent,
    and unrelated sections come along now and then.
    """
    shape = {
        section: {
            field: draw(st.sampled_from([counters, counters, agg_objects, field_values]))
            for field in draw(st.lists(field_keys, min_size=1, max_size=8, unique=True))
        }
        for section in draw(st.lists(section_keys, min_size=1, max_size=5, unique=True))
    }

    def one_line() -> Tree:
        line: Tree = {}
        for section in draw(st.permutations(list(shape))):
            kind = draw(st.sampled_from(["dict"] * 6 + ["absent", "int", "other"]))
            if kind == "dict":
                names = list(shape[section])
                if draw(st.integers(0, 3)) == 0:
                    names = draw(st.permutations(names))
                values = shape[section]
                line[section] = {f: draw(values[f]) for f in names if draw(mostly)}
            elif kind == "int":
                line[section] = draw(ints)
            elif kind == "other":
                line[section] = draw(others)
        if draw(st.integers(0, 3)) == 0:
            line.update(draw(lines))
        return line

    start = one_line() if draw(st.booleans()) else {}
    return start, [one_line() for _ in range(draw(st.integers(1, 6)))]


@FUZZ
@given(stream=line_sequences(), limit=st.integers(0, 5))
def test_c_merge_is_the_reference(stream: tuple[Tree, list[Tree]], limit: int) -> None:
    start, news = stream
    ref_total, c_total = copy.deepcopy(start), copy.deepcopy(start)
    c_cache: dict[Any, Any] = {}
    ref_cache: dict[Any, Any] = {}
    for new in news:
        snapshot = copy.deepcopy(new)
        expected = outcome(ref_merge(ref_cache, limit), ref_total, new)
        assert outcome(c_merge(c_cache, limit), c_total, new) == expected
        assert_same(c_total, ref_total)
        assert_same(c_cache, ref_cache)
        assert_same(new, snapshot)
    assert len(c_cache) <= limit


ODD_LEAVES: list[object] = [True, False, None, 1.5, float("nan"), "x", IntSub(2), -1, [1]]
ODD_LEAVES += [DictSub(sum_us=1), {"x": {"y": 1}}, 2**64, 2**70, -(2**63) - 1]


def random_leaf(rng: random.Random) -> object:
    draw = rng.random()
    if draw < 0.45:
        return 0
    if draw < 0.8:
        return rng.randint(1, 10**6)
    return copy.deepcopy(rng.choice(ODD_LEAVES))


def random_line(rng: random.Random, template: Tree) -> Tree:
    """A line of ``template``'s shape (a real one): values mostly ints, now and then anything."""
    line: Tree = {}
    for section, values in template.items():
        if rng.random() < 0.1:
            continue
        if type(values) is not dict or rng.random() < 0.05:
            line[section] = random_leaf(rng)
            continue
        fields = list(values.items())
        if rng.random() < 0.1:
            rng.shuffle(fields)
        out: Tree = {}
        line[section] = out
        for field, value in fields:
            if rng.random() < 0.1:
                continue
            if type(value) is dict and rng.random() < 0.9:
                out[field] = {sub: random_leaf(rng) for sub in value if rng.random() < 0.9}
            else:
                out[field] = random_leaf(rng)
    return line


TEMPLATE = realistic_lines(1, seed=5)[0]


@settings(max_examples=150, deadline=None)
@given(rng=st.randoms(use_true_random=False), limit=st.sampled_from([0, 5, 100_000]))
def test_c_merge_is_the_reference_on_real_shapes(rng: random.Random, limit: int) -> None:
    news = [random_line(rng, TEMPLATE) for _ in range(rng.randint(2, 5))]
    ref_total: Tree = {}
    c_total: Tree = {}
    c_cache: dict[Any, Any] = {}
    ref_cache: dict[Any, Any] = {}
    for new in news:
        snapshot = copy.deepcopy(new)
        ref_merge(ref_cache, limit)(ref_total, new)
        c_merge(c_cache, limit)(c_total, new)
        assert_same(c_total, ref_total)
        assert_same(c_cache, ref_cache)
        assert_same(new, snapshot)


@FUZZ
@given(stream=line_sequences())
def test_new_is_never_changed_nor_shared(stream: tuple[Tree, list[Tree]]) -> None:
    start, news = stream
    total = copy.deepcopy(start)
    for new in news:
        snapshot = copy.deepcopy(new)
        outcome(c_merge({}), total, new)
        assert_same(new, snapshot)
    copied = {id(d) for new in news for d in exact_dicts(new)}
    assert not copied & {id(d) for d in exact_dicts(total)}
    frozen = copy.deepcopy(total)
    for new in news:
        for d in list(exact_dicts(new)):
            for key in d:
                d[key] = "changed"
            d["added"] = 1
    assert_same(total, frozen)


def test_real_lines_and_readings_are_the_reference() -> None:
    news = realistic_lines(40, seed=7)
    ref_total: Tree = {}
    c_total: Tree = {}
    for new in news:
        reference(ref_total, new)
        merge_into(c_total, new)
        assert_same(c_total, ref_total)
    assert TIMESTAMP_KEY not in c_total
    # the accumulator's readings, bytes for bytes, against one that sums every line by
    # the reference (add_text refusing all), with two lines per reading at times,
    # two objects on one line (a newline lost to a full pipe), and lines with Firecracker
    # main's id and properties (never summed)
    lines = [orjson.dumps(new) for new in realistic_lines(30, seed=8)]
    labels = {"id": "vm-1", "properties": {"k": "v"}}
    for i in range(15, 30):
        found = orjson.loads(lines[i])
        lines[i] = orjson.dumps({TIMESTAMP_KEY: found.pop(TIMESTAMP_KEY), **labels, **found})
    stream = [line + b"\n" for line in lines]
    stream[7] = lines[7] + stream[8]
    stream[8] = b""
    readings = []
    for merge, text in ((reference, refuse_text), (merge_into, p.add_text)):
        accumulator = MetricsAccumulator()
        with patch.multiple(p, merge_into=merge, add_text=text):
            got = []
            for i in range(0, len(stream), 3):
                accumulator.feed(stream[i])
                accumulator.feed(b"".join(stream[i + 1 : i + 3]))
                reading = accumulator.take_reading_json()
                got.append((reading.lines, reading.delta, reading.totals, reading.labels))
        readings.append(got)
    assert readings[0] == readings[1]
    assert sum(lines for lines, *_ in readings[0]) == 30
    assert readings[0][-1][3] == labels


@pytest.mark.parametrize(
    ("total", "new"),
    [
        ({"s": {"c": 5}}, {"s": {"c": True}}),
        ({"s": {"c": True}}, {"s": {"c": 2}}),
        ({"s": {"c": 5}}, {"s": {"c": IntSub(2)}}),
        ({"s": {"c": IntSub(5)}}, {"s": {"c": 2}}),
        ({"s": {"a": {"sum_us": 5}}}, {"s": {"a": {"sum_us": True}}}),
        ({"s": {"a": {"sum_us": True}}}, {"s": {"a": {"sum_us": 1}}}),
        ({"s": {"a": {"sum_us": IntSub(5)}}}, {"s": {"a": {"sum_us": 1}}}),
        ({"s": {"a": {"sum_us": 5}}}, {"s": {"a": DictSub(sum_us=1)}}),
        ({"s": {"a": DictSub(sum_us=5)}}, {"s": {"a": {"sum_us": 1}}}),
        ({"s": {"c": 5}}, {"s": DictSub(c=1)}),
        ({"s": DictSub(c=5)}, {"s": {"c": 1, "a": {"sum_us": 1}}}),
        ({"s": {"c": 5}}, {"s": 7}),
        ({"s": 7}, {"s": {"c": 1, "a": {"sum_us": 1}, "d": DictSub(x=1)}}),
        ({"s": {"c": 2**64 - 1}}, {"s": {"c": 2**64 - 1}}),
        ({"s": {"c": -(2**63)}}, {"s": {"c": -1}}),
        ({"s": {"a": {"min_us": 9, "max_us": 1, "sum_us": 2**70}}}, {"s": {"a": {"min_us": 3}}}),
        ({"s": {"a": {"sum_us": 1}}}, {"s": {"a": {"sum_us": 2**70, "max_us": 4, "n": None}}}),
    ],
)
def test_only_exact_ints_and_dicts_are_added(total: Tree, new: Tree) -> None:
    ref_total, c_total = copy.deepcopy(total), copy.deepcopy(total)
    reference(ref_total, new)
    c_merge({})(c_total, new)
    assert_same(c_total, ref_total)


def test_public_merge_into_binds_the_module_configuration() -> None:
    assert isinstance(merge_into, partial)
    assert merge_into.func is _fc_sum.merge_into
    assert merge_into.args[0] is p._section_gauges
    assert merge_into.args[1:] == (p.is_gauge, p._AGG_GAUGES, p._GAUGE_CACHE_LIMIT)
    assert not merge_into.keywords


def test_gauge_cache_is_filled_like_the_reference_and_bounded() -> None:
    line = realistic_lines(1, seed=3)[0]
    known = [{"signals": line["signals"]}, {"latencies_us": line["latencies_us"]}]
    devices = [{f"net_tap{i}": line["net_eth0"]} for i in range(8)]
    c_cache: dict[Any, Any] = {}
    ref_total: Tree = {}
    c_total: Tree = {}
    ref_cache: dict[Any, Any] = {}
    for new in [*known, *known, *devices, *devices, *devices]:
        ref_merge(ref_cache, limit=4)(ref_total, new)
        c_merge(c_cache, limit=4)(c_total, new)
        assert_same(c_total, ref_total)
        assert_same(c_cache, ref_cache)
    assert list(c_cache) == ["signals", "latencies_us", "net_tap0", "net_tap1"]
    assert c_cache["signals"] == {f: p.is_gauge("signals", f) for f in line["signals"]}
    assert c_cache["latencies_us"] == {f: True for f in line["latencies_us"]}
    ints = {f for f, v in line["net_eth0"].items() if type(v) is int}
    assert c_cache["net_tap1"] == {f: p.is_gauge("net_tap1", f) for f in ints}
    # over the limit a section still merges (a throwaway cache), the same as below it
    assert c_total["net_tap7"] == c_total["net_tap0"]
    # the module's own cache, through the public binding
    section = "vhost_user_block_test_fc_sum"
    total: Tree = {section: {"init_time_us": 5, "cfg_fails": 1}}
    merge_into(total, {section: {"init_time_us": 7, "cfg_fails": 2}})
    assert total == {section: {"init_time_us": 7, "cfg_fails": 3}}
    assert p._section_gauges[section] == {"init_time_us": True, "cfg_fails": False}


def leak_lines() -> list[Tree]:
    """Lines that take every path: sums, gauges, aggs, copies of sections and fields, non-ints."""
    line = {
        TIMESTAMP_KEY: 1_700_000_000_000,
        "net_eth0": {
            "rx_bytes_count": 1_234_567,
            "tx_count": 0,
            "tap_write_agg": {"min_us": 5000, "max_us": 9000, "sum_us": 777_777, "n": "x"},
            "name": "eth0",
            "flag": True,
            "huge": 2**70,
        },
        "latencies_us": {"pause_vm": 123_456},
        "signals": {"sigsegv": 1, "sigpipe": 3},
        "fresh": {"f": 1, "agg": {"sum_us": 2}},
        "id": "vm-1",
    }
    flip = {"fresh": 7, "net_eth0": {"tap_write_agg": 3, "rx_bytes_count": "text"}}
    return [line, flip, line]


def test_no_reference_leaks() -> None:
    news = leak_lines()
    cache: dict[Any, Any] = {}
    merges = [c_merge(cache), c_merge({}, limit=0), merge_into]  # cached, uncached, public
    totals: list[Tree] = [{}, {}, {}]
    for _ in range(2):  # the second round fills the gauge caches (flip makes the first a copy)
        for merge, total in zip(merges, totals, strict=True):
            for new in news:
                merge(total, new)
    line = news[0]
    keys = {key: key for key in line["net_eth0"]}  # the key objects themselves
    watched = [
        keys["rx_bytes_count"],  # summed
        keys["tx_count"],  # 0 added
        keys["tap_write_agg"],
        line["net_eth0"],
        line["net_eth0"]["rx_bytes_count"],
        line["net_eth0"]["huge"],
        line["latencies_us"]["pause_vm"],
        line["net_eth0"]["tap_write_agg"],
        line["net_eth0"]["tap_write_agg"]["sum_us"],
        line["fresh"],
        line["id"],
        totals[0]["net_eth0"],
        totals[0]["latencies_us"],
        cache["net_eth0"],
        p.is_gauge,
        p._AGG_GAUGES,
    ]
    gc.collect()
    counts = [sys.getrefcount(obj) for obj in watched]
    objects = len(gc.get_objects())
    blocks = sys.getallocatedblocks()
    for _ in range(100_000):
        for merge, total in zip(merges, totals, strict=True):
            for new in news:
                merge(total, new)
    gc.collect()
    assert [sys.getrefcount(obj) for obj in watched] == counts
    assert len(gc.get_objects()) <= objects + 10
    assert sys.getallocatedblocks() <= blocks + 100
    for total in totals:  # flip resets rx_bytes_count each time; huge is added twice a round
        assert total["net_eth0"]["rx_bytes_count"] == 1_234_567
        assert total["net_eth0"]["huge"] == 2**70 * 200_004
        assert total["net_eth0"]["tap_write_agg"] == line["net_eth0"]["tap_write_agg"]


class Boom(Exception):
    pass


def boom(section: str, field: str) -> bool:
    if field == "sigpipe":
        raise Boom(f"{section}/{field}")
    return is_gauge(section, field)


def test_is_gauge_raising_propagates_and_leaves_what_the_reference_leaves() -> None:
    total = {"signals": {"sigsegv": 1, "sigpipe": 5, "sigbus": 0}, "vmm": {"panic_count": 0}}
    new = {"vmm": {"panic_count": 1}, "signals": {"sigsegv": 1, "sigpipe": 2, "sigbus": 1}}
    ref_total, c_total = copy.deepcopy(total), copy.deepcopy(total)
    c_cache: dict[Any, Any] = {}
    ref_cache: dict[Any, Any] = {}
    with pytest.raises(Boom, match="signals/sigpipe"):
        ref_merge(ref_cache, is_gauge=boom)(ref_total, new)
    with pytest.raises(Boom, match="signals/sigpipe"):
        c_merge(c_cache, is_gauge=boom)(c_total, new)
    assert_same(c_total, ref_total)
    assert_same(c_cache, ref_cache)
    # nothing is left half-done: fields before the error merged, the rest as they were
    assert c_total == {
        "signals": {"sigsegv": 1, "sigpipe": 5, "sigbus": 0},
        "vmm": {"panic_count": 1},
    }
    assert c_cache == {"vmm": {"panic_count": True}, "signals": {"sigsegv": True}}
    assert new == {"vmm": {"panic_count": 1}, "signals": {"sigsegv": 1, "sigpipe": 2, "sigbus": 1}}
    # and the next merge, with a working is_gauge, goes on from there
    c_merge(c_cache)(c_total, new)
    assert c_total["signals"] == {"sigsegv": 1, "sigpipe": 7, "sigbus": 1}
    # the error path does not leak either
    gc.collect()
    counts = [sys.getrefcount(obj) for obj in (new["signals"], total, boom)]
    blocks = sys.getallocatedblocks()
    failing = c_merge({}, is_gauge=boom)
    for _ in range(20_000):
        with pytest.raises(Boom):
            failing(copy.copy(total), new)
    del failing
    gc.collect()
    assert [sys.getrefcount(obj) for obj in (new["signals"], total, boom)] == counts
    assert sys.getallocatedblocks() <= blocks + 100


def test_odd_gauge_answers_are_taken_for_their_truth() -> None:
    class Lying:
        def __bool__(self) -> bool:
            raise Boom("no truth")

    for answer in (0, 1, None, "", "yes", Lying()):
        total = {"net": {"a": 1, "b": 2}}
        new = {"net": {"a": 10, "b": 20}}
        ref_total, c_total = copy.deepcopy(total), copy.deepcopy(total)
        c_cache: dict[Any, Any] = {}
        ref_cache: dict[Any, Any] = {}

        def answering(section: str, field: str, answer: object = answer) -> object:
            return answer

        for _ in range(2):  # the second time from the cache
            expected = outcome(ref_merge(ref_cache, is_gauge=answering), ref_total, new)
            assert outcome(c_merge(c_cache, is_gauge=answering), c_total, new) == expected
            assert_same(c_total, ref_total)
            assert c_cache == ref_cache


def test_a_none_cache_entry_is_a_missing_one() -> None:
    c_cache: dict[Any, Any] = {"net": None}
    ref_total: Tree = {"net": {"a": 1}}
    c_total: Tree = {"net": {"a": 1}}
    ref_cache: dict[Any, Any] = {"net": None}
    ref_merge(ref_cache)(ref_total, {"net": {"a": 2}})
    c_merge(c_cache)(c_total, {"net": {"a": 2}})
    assert_same(c_cache, ref_cache)
    assert_same(c_total, ref_total)
    assert c_cache == {"net": {"a": False}}


def test_is_gauge_changing_the_total_meanwhile_is_overwritten_as_in_the_reference() -> None:
    """``out[field] = before + value`` uses the ``before`` read first, even when it adds 0."""
    for value in (0, 3):
        results = []
        for merge in ("reference", "c"):
            total: Tree = {"net": {"a": 5, "b": 0}}

            def meddling(section: str, field: str, total: Tree = total) -> bool:
                total["net"][field] = 999
                return False

            new = {"net": {"a": value, "b": 0}}
            (ref_merge if merge == "reference" else c_merge)({}, is_gauge=meddling)(total, new)
            results.append(total)
        assert results[0] == results[1] == {"net": {"a": 5 + value, "b": 0}}


def test_a_total_merged_into_itself_doubles_as_in_the_reference() -> None:
    line = realistic_lines(1, seed=4)[0]
    line["id"] = "vm"
    ref_total, c_total = copy.deepcopy(line), copy.deepcopy(line)
    reference(ref_total, ref_total)
    c_merge({})(c_total, c_total)
    assert_same(c_total, ref_total)
    assert c_total["net_eth0"]["rx_bytes_count"] == 2 * line["net_eth0"]["rx_bytes_count"]


def test_wrong_argument_types_are_type_errors() -> None:
    calls: list[Callable[[], object]] = [
        lambda: merge_into(None, {}),  # type: ignore[arg-type]
        lambda: merge_into({}, []),  # type: ignore[arg-type]
        lambda: merge_into(DictSub(), {}),
        lambda: merge_into({}, DictSub()),
        lambda: merge_into({}),  # type: ignore[call-arg]
        lambda: merge_into({}, {}, {}),  # type: ignore[call-arg]
        lambda: merge_into({}, new={}),  # type: ignore[call-arg]
        lambda: _fc_sum.merge_into([], p.is_gauge, p._AGG_GAUGES, 1, {}, {}),  # type: ignore[arg-type]
        lambda: _fc_sum.merge_into({}, None, p._AGG_GAUGES, 1, {}, {}),  # type: ignore[arg-type]
        lambda: _fc_sum.merge_into({}, p.is_gauge, p._AGG_GAUGES, "1", {}, {}),  # type: ignore[arg-type]
        lambda: _fc_sum.merge_into(DictSub(), p.is_gauge, p._AGG_GAUGES, 1, {}, {}),
        # a cache entry that is not a dict, found when a field needs it
        lambda: _fc_sum.merge_into(
            {"net": [True]},  # type: ignore[dict-item]
            p.is_gauge,
            p._AGG_GAUGES,
            1,
            {"net": {"a": 1}},
            {"net": {"a": 1}},
        ),
    ]
    for call in calls:
        with pytest.raises(TypeError):
            call()
    # a limit beyond 64 bits is as good as no limit
    cache: dict[Any, Any] = {}
    _fc_sum.merge_into(cache, p.is_gauge, p._AGG_GAUGES, 2**100, {"s": {"a": 1}}, {"s": {"a": 1}})
    assert cache == {"s": {"a": False}}


def test_hostile_keys_and_changes_during_the_merge_fail_as_the_reference_does() -> None:
    class BadEq:
        """Hashes as "rx" does, and cannot be compared."""

        def __hash__(self) -> int:
            return hash("rx")

        def __eq__(self, other: object) -> bool:
            raise Boom("compared")

    def grows(section: str, field: str) -> bool:
        new["net"][f"extra_{field}"] = 1  # the dict being merged changes size
        return False

    cases: list[tuple[Tree, Tree, Callable[[str, str], object]]] = []
    new: Tree = {"net": {"rx": 1, "tx": 2}}
    cases.append(({"net": {"rx": 1, "tx": 2}}, new, grows))
    cases.append(({"net": {"rx": 1}}, {"net": {BadEq(): 1}}, p.is_gauge))
    cases.append(({}, {BadEq(): {"rx": 1}, "utc_timestamp_ms": 1}, p.is_gauge))
    cases.append(({"net": {"agg": {"rx": 1}}}, {"net": {"agg": {BadEq(): 1}}}, p.is_gauge))
    for total, line, gauge in cases:
        results = []
        for merge in ("reference", "c"):
            new = copy.deepcopy(line)
            mine = copy.deepcopy(total)
            merging = (ref_merge if merge == "reference" else c_merge)({}, is_gauge=gauge)
            results.append((outcome(merging, mine, new), mine, new))
        (ref_error, ref_total, ref_new), (c_error, c_total, c_new) = results
        assert ref_error is not None
        assert c_error == ref_error
        if gauge is grows:  # BadEq keys cannot be compared, even to themselves
            assert_same(c_total, ref_total)
            assert_same(c_new, ref_new)


# -- add_text: totals kept as their JSON text


def reference_add(total: Tree, line: bytes) -> tuple[int, int]:
    """What add_text does with a line it takes, on the totals as objects."""
    found = orjson.loads(line)
    timestamp = found.pop(TIMESTAMP_KEY)
    reference(total, found)
    return timestamp, p._missed(found)


def loaded(line: bytes) -> Tree | None:
    """The line as the accumulator's parse takes it (a dict with an int timestamp), or None."""
    try:
        found = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(found) is dict and type(found.get(TIMESTAMP_KEY)) is int:
        return found
    return None


#: device sets: Firecracker's defaults, two of each, and six of each
SHAPES: list[dict[str, tuple[str, ...]]] = [
    {},
    {"nets": ("eth0", "eth1"), "blocks": ("rootfs", "data")},
    {
        "nets": tuple(f"eth{i}" for i in range(6)),
        "blocks": tuple(f"disk{i}" for i in range(6)),
        "vhost_user_blocks": ("vu0",),
    },
]


def emulator_lines(count: int, seed: int, devices: dict[str, tuple[str, ...]]) -> list[bytes]:
    """Lines as the emulator writes them, with activity: many leaves non-zero, gauges moving."""
    vm = VmMetrics(**devices)  # type: ignore[arg-type]
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        vm.synthetic_activity(rng, 1.0)
        if i % 2:
            vm.bump_everything(rng)
        obj, deltas = vm.build_line(1_700_000_000_000 + 1000 * i)
        vm.commit(deltas, None, True)
        lines.append(orjson.dumps(obj))
    return lines


LINE_POOL = [emulator_lines(6, 20 + i, shape) for i, shape in enumerate(SHAPES)]

Path = tuple[str, ...]


def dict_paths(tree: Tree, path: Path = ()) -> list[Path]:
    """Every dict of a line (the line itself first), as key paths."""
    out = [path]
    for key, value in tree.items():
        if type(value) is dict:
            out += dict_paths(value, (*path, key))
    return out


def leaf_paths(tree: Tree, path: Path = ()) -> list[Path]:
    out: list[Path] = []
    for key, value in tree.items():
        if type(value) is dict:
            out += leaf_paths(value, (*path, key))
        elif path:  # not the timestamp
            out.append((*path, key))
    return out


def at(tree: Tree, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def rebuilt(tree: Tree, path: Path, change: Callable[[list[tuple[Any, Any]]], None]) -> Tree:
    """``tree`` with the dict at ``path`` rebuilt from its items, changed in place by ``change``."""
    if path:
        items = list(tree.items())
        return {k: rebuilt(v, path[1:], change) if k == path[0] else v for k, v in items}
    items = list(tree.items())
    change(items)
    return dict(items)


def renamed(tree: Tree, path: Path, old: Any, new: Any) -> Tree:
    def rename(items: list[tuple[Any, Any]]) -> None:
        items[:] = [(new if k == old else k, v) for k, v in items]

    return rebuilt(tree, path, rename)


def set_at(tree: Tree, path: Path, value: Any) -> Tree:
    def put(items: list[tuple[Any, Any]]) -> None:
        items[:] = [(k, value if k == path[-1] else v) for k, v in items]

    return rebuilt(tree, path[:-1], put)


NUMBER = re.compile(rb'(?<=":)-?\d+(?=[,}])')
INT_MEMBER = re.compile(rb'"([^"\\]+)":(-?\d+)(?=[,}])')
KEY = re.compile(rb'"([^"\\]+)":')
BAD_NUMBERS = [b"1.0", b"1e3", b"1E3", b"-1.5", b'"1"', b"true", b"false", b"null", b"01"]
BAD_NUMBERS += [b"-01", b"00", b"-0", b"18446744073709551616", b"-9223372036854775809"]
BAD_NUMBERS += [b"99999999999999999999999", b"+1", b"-", b"", b"[1]", b"{}", b"[]", b"NaN"]
BAD_NUMBERS += [b"Infinity", b"0x1", b"1_0"]
GOOD_NUMBERS = [0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 10**12]
PLAIN_NAMES = ["net_é", "blöck_€", "ключ", "𝄞x", "a\x7fb", "sp ace", "x" * 70, "", "a:b,c{}"]
ESCAPED_NAMES = ['q"uote', "back\\slash", "tab\tkey", "nl\nkey", "\x00", "\x1f"]
MUST_TAKE = ["canonical", "new_values", "plain_names", "empty_dicts", "big_totals", "nested_ts"]
MUST_REFUSE = ["bad_number", "whitespace", "rename", "drop", "add", "reorder", "escape"]
MUST_REFUSE += ["truncate", "trailing", "duplicate", "timestamp_again", "escaped_names"]
MUST_REFUSE += ["top_timestamp", "totals_type", "totals_key"]


class StrSub(str):
    pass


Mutation = Callable[[Tree, bytes], tuple[Tree, bytes]]


def mutation(kind: str, rng: random.Random, template: Tree) -> Mutation:
    """One kind of change, its places drawn once, for every line of a template's shape.

    ``template`` is a parsed line of the shape; the mutation takes (totals, line)
    and gives them back changed (totals only by the kinds that change the shape
    of both, or only the totals' types).
    """
    dicts = dict_paths(template)
    inner = [path for path in dicts if path]
    leaves = leaf_paths(template)

    def text(change: Callable[[bytes], bytes]) -> Mutation:
        return lambda total, line: (total, change(line))

    def obj(change: Callable[[Tree], Tree]) -> Mutation:
        return lambda total, line: (total, orjson.dumps(change(orjson.loads(line))))

    def both(change: Callable[[Tree, bool], Tree]) -> Mutation:
        return lambda total, line: (
            change(total, False),
            orjson.dumps(change(orjson.loads(line), True)),
        )

    if kind == "canonical":
        return lambda total, line: (total, line)
    if kind == "new_values":
        picks = rng.sample(leaves, 5)
        values = [rng.choice(GOOD_NUMBERS) for _ in picks]
        missed = rng.choice([0, 1, 7, 2**64 - 1])

        def values_in(tree: Tree) -> Tree:
            for path, value in zip(picks, values, strict=True):
                tree = set_at(tree, path, value)
            if type(tree.get("logger")) is dict and "missed_metrics_count" in tree["logger"]:
                tree = set_at(tree, ("logger", "missed_metrics_count"), missed)
            return tree

        return obj(values_in)
    if kind == "top_timestamp":  # a section named so in both: the line has two timestamps
        old = rng.choice(list(template)[1:])
        member = b'"' + old.encode() + b'":{'

        def second_timestamp(total: Tree, line: bytes) -> tuple[Tree, bytes]:
            spelt = b'"' + TIMESTAMP_KEY.encode() + b'":{'
            return renamed(total, (), old, TIMESTAMP_KEY), line.replace(member, spelt, 1)

        return second_timestamp
    if kind in ("plain_names", "escaped_names", "nested_ts"):
        path = rng.choice(inner if kind == "nested_ts" else dicts)
        old = rng.choice(list(at(template, path)))
        if path == () and old == TIMESTAMP_KEY:
            old = list(template)[1]
        names = {"plain_names": PLAIN_NAMES, "escaped_names": ESCAPED_NAMES}.get(kind)
        name = rng.choice(names or [TIMESTAMP_KEY])
        return both(lambda tree, _: renamed(tree, path, old, name))
    if kind == "empty_dicts":
        path = rng.choice(inner)
        return both(lambda tree, _: set_at(tree, path, {}))
    if kind == "big_totals":
        picks = rng.sample(leaves, 6)
        values = [rng.choice([2**64 - 1, 2**64, 2**70, -(2**80), -1, 0]) for _ in picks]

        def big(total: Tree, line: bytes) -> tuple[Tree, bytes]:
            for path, value in zip(picks, values, strict=True):
                if type(at(total, path[:-1])) is dict and type(at(total, path)) is int:
                    total = set_at(total, path, value)
            return total, line

        return big
    if kind == "bad_number":
        bad = rng.choice(BAD_NUMBERS)
        which = rng.random()

        def bad_number(line: bytes) -> bytes:
            numbers = list(NUMBER.finditer(line))
            m = numbers[int(which * len(numbers))]
            return line[: m.start()] + bad + line[m.end() :]

        return text(bad_number)
    if kind == "whitespace":
        space = rng.choice([b" ", b"\t", b"\n", b"\r", b" \n"])
        where, anywhere = rng.random(), rng.random() < 0.5

        def whitespace(line: bytes) -> bytes:
            places = [i for i, c in enumerate(line) if c in b"{}:,"] + [len(line)]
            at_ = int(where * (len(line) + 1)) if anywhere else places[int(where * len(places))]
            return line[:at_] + space + line[at_:]

        return text(whitespace)
    if kind == "rename":
        path = rng.choice(dicts)
        old = rng.choice(list(at(template, path)))
        return obj(lambda tree: renamed(tree, path, old, old + rng.choice(["x", "_", "é"])))
    if kind == "drop":
        path = rng.choice(dicts)
        old = rng.choice(list(at(template, path)))

        def drop(items: list[tuple[Any, Any]]) -> None:
            del items[[k for k, _ in items].index(old)]

        return obj(lambda tree: rebuilt(tree, path, drop))
    if kind == "add":
        path = rng.choice(dicts)
        where = rng.random()
        extra = rng.choice([1, 0, {"sum_us": 1}, {}])

        def add(items: list[tuple[Any, Any]]) -> None:
            items.insert(int(where * (len(items) + 1)), ("extra", copy.deepcopy(extra)))

        return obj(lambda tree: rebuilt(tree, path, add))
    if kind == "reorder":
        path = rng.choice([path for path in dicts if len(at(template, path)) > 1])
        i = rng.randrange(len(at(template, path)) - 1)

        def swap(items: list[tuple[Any, Any]]) -> None:
            items[i], items[i + 1] = items[i + 1], items[i]

        return obj(lambda tree: rebuilt(tree, path, swap))
    if kind == "escape":
        which, char = rng.random(), rng.random()

        def escape(line: bytes) -> bytes:
            keys = list(KEY.finditer(line))
            m = keys[int(which * len(keys))]
            i = m.start(1) + int(char * (m.end(1) - m.start(1)))
            return line[:i] + b"\\u%04x" % line[i] + line[i + 1 :]

        return text(escape)
    if kind == "truncate":
        where = rng.random()
        return text(lambda line: line[: int(where * len(line))])
    if kind == "trailing":
        tail = rng.choice([b" ", b"\n", b"\r\n", b"x", b"}", b",", b"\x00", b"{}", b"0", b"\xff"])
        return text(lambda line: line + tail)
    if kind == "duplicate":
        which, value = rng.random(), rng.choice([b"0", b"1", b"12345"])

        def duplicate(line: bytes) -> bytes:
            members = list(INT_MEMBER.finditer(line))
            m = members[int(which * len(members))]
            return line[: m.end()] + b',"' + m.group(1) + b'":' + value + line[m.end() :]

        return text(duplicate)
    if kind == "timestamp_again":
        which = rng.random()

        def again(line: bytes) -> bytes:
            places = [i + 1 for i, c in enumerate(line) if c == ord("{")] + [len(line) - 1]
            i = places[int(which * len(places))]
            member = b'"utc_timestamp_ms":5'
            return line[:i] + (b"," + member if i == len(line) - 1 else member + b",") + line[i:]

        return text(again)
    if kind == "totals_type":
        path = rng.choice(inner + leaves)
        value = at(template, path)
        if len(path) == 1:
            odd: Any = rng.choice([7, "x", None, DictSub(value), [1]])
        elif type(value) is dict:
            odd = rng.choice([DictSub(value), 5, True, None])
        elif len(path) == 3:
            odd = rng.choice([True, IntSub(1), None, {"x": 1}, 1.0])
        else:
            odd = rng.choice([True, False, IntSub(3), 1.5, "1", None, {}, {"sum_us": 0}])
        return lambda total, line: (set_at(total, path, copy.deepcopy(odd)), line)
    assert kind == "totals_key", kind
    path = rng.choice(dicts)
    old = rng.choice([key for key in at(template, path) if key != TIMESTAMP_KEY])
    odd_key: object = rng.choice([StrSub(old), "\ud800" + old, 1])
    return lambda total, line: (renamed(total, path, old, odd_key), line)


def shape_of(tree: Any) -> Any:
    """Keys in order, nested: what add_text compares between the totals and a line."""
    if type(tree) is not dict:
        return None
    return [(key, shape_of(value)) for key, value in tree.items()]


def plain_keys(tree: Any) -> bool:
    """No key orjson escapes (add_text refuses a backslash in a key)."""
    if type(tree) is not dict:
        return True
    return all(
        not re.search(r'[\x00-\x1f"\\]', key) and plain_keys(value) for key, value in tree.items()
    )


def text_must_take(total: Tree, line: bytes) -> bool:
    """Whether add_text must take ``line``: orjson's own compact text of a line shaped
    exactly as ``total``, its timestamp first, ints only, every sum within 64 bits."""
    found = loaded(line)
    if found is None or next(iter(found)) != TIMESTAMP_KEY or orjson.dumps(found) != line:
        return False
    found.pop(TIMESTAMP_KEY)
    if shape_of(found) != shape_of(total) or not plain_keys(found):
        return False
    if not all(type(at(found, path)) is int for path in leaf_paths(found)):
        return False
    merged = copy.deepcopy(total)
    reference(merged, found)
    return all(-(2**63) <= at(merged, path) <= 2**64 - 1 for path in leaf_paths(merged))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rng=st.randoms(use_true_random=False),
    kind=st.sampled_from(MUST_TAKE + MUST_REFUSE),
    shape=st.sampled_from(range(len(SHAPES))),
)
def test_add_text_is_the_parse_and_the_reference_or_nothing(
    rng: random.Random, kind: str, shape: int
) -> None:
    """Taken, a line gives the reference's totals serialised; refused, only a line
    that is not exactly the totals' shape in orjson's compact form (or overflows)."""
    pool = LINE_POOL[shape]
    start = rng.randint(1, 3)
    change = mutation(kind, rng, orjson.loads(pool[0]))
    total: Tree = {}
    for line in pool[:start]:
        reference_add(total, line)
    total, _ = change(total, pool[0])
    try:
        text = orjson.dumps(total)
    except TypeError:  # a sum beyond 64 bits (or a key not a str): kept as objects
        assert kind in ("big_totals", "totals_key")
        return
    layout = p.text_layout(total)
    if layout is None:  # an empty or odd section: kept as objects too
        assert kind in ("empty_dicts", "totals_type")
        return
    assert text_layout_flags(total) == list(layout)
    taken = []
    for original in pool[start : start + rng.randint(1, 3)]:
        _, line = change(orjson.loads(original), original)
        must = text_must_take(total, line)
        got = _fc_sum.add_text(layout, text, line)
        taken.append(got is not None)
        assert (got is not None) == must, (kind, line[:200])
        found = loaded(line)
        if got is None:
            if found is None:
                continue
            reference(total, found)  # the ordinary path; the text is made again from it
            try:
                text = orjson.dumps(total)
            except TypeError:
                return
            new_layout = p.text_layout(total)
            if new_layout is None:
                return
            layout = new_layout
            continue
        expected = reference_add(total, line)
        assert got == (orjson.dumps(total), *expected)
        assert [type(x) for x in got] == [bytes, int, int]
        text = got[0]
    if kind in MUST_TAKE:
        assert all(taken), kind


def text_layout_flags(total: Tree) -> list[int]:
    """The layout spelt out from is_gauge, leaf by leaf."""
    return [int(p.is_gauge(path[0], path[1], *path[2:3])) for path in leaf_paths(total)]


@pytest.mark.parametrize(
    ("before", "number", "gauge", "after"),
    [
        (2**64 - 2, 1, 0, 2**64 - 1),
        (2**64 - 1, 1, 0, None),  # beyond 64 bits: the exact sum stays with the objects
        (2**64 - 1, 0, 0, 2**64 - 1),
        (-(2**63), -1, 0, None),
        (-(2**63) + 1, -1, 0, -(2**63)),
        (2**64 - 1, -(2**63), 0, 2**63 - 1),
        (2**64 - 1, 5, 1, 5),  # a gauge takes the line's value
        (7, -(2**63), 1, -(2**63)),
        (10, -3, 0, 7),
    ],
)
def test_add_text_sums_exactly_within_64_bits(
    before: int, number: int, gauge: int, after: int | None
) -> None:
    totals = orjson.dumps({"s": {"a": before, "z": 0}})
    line = b'{"utc_timestamp_ms":5,"s":{"a":%d,"z":0}}' % number
    got = _fc_sum.add_text(bytes([gauge, 0]), totals, line)
    if after is None:
        assert got is None
    else:
        assert got == (orjson.dumps({"s": {"a": after, "z": 0}}), 5, 0)


@pytest.mark.parametrize(
    ("number", "value"),
    [
        (b"0", 0),
        (b"7", 7),
        (b"-7", -7),
        (b"18446744073709551615", 2**64 - 1),
        (b"-9223372036854775808", -(2**63)),
        (b"9223372036854775808", 2**63),
        (b"18446744073709551616", None),  # orjson: a float
        (b"-9223372036854775809", None),
        (b"184467440737095516150", None),
        (b"-0", None),  # orjson: 0; refused all the same
        (b"01", None),
        (b"00", None),
        (b"-", None),
        (b"1.0", None),
        (b"1e2", None),
        (b"true", None),
        (b"null", None),
        (b'"1"', None),
    ],
)
def test_add_text_integers_are_orjsons_ints(number: bytes, value: int | None) -> None:
    totals = b'{"s":{"a":0,"b":5}}'
    for line in (
        b'{"utc_timestamp_ms":1,"s":{"a":%s,"b":0}}' % number,
        b'{"utc_timestamp_ms":%s,"s":{"a":1,"b":0}}' % number,  # the timestamp too
    ):
        got = _fc_sum.add_text(b"\0\0", totals, line)
        if value is None:
            assert got is None
            continue
        expected: Tree = {"s": {"a": 0, "b": 5}}
        timestamp, missed = reference_add(expected, line)
        assert got == (orjson.dumps(expected), timestamp, missed)
        assert value in (timestamp, expected["s"]["a"])


def test_add_text_returns_the_line_s_timestamp_and_loss() -> None:
    totals = orjson.dumps({"logger": {"missed_metrics_count": 4, "x": {"sum_us": 1}}})
    layout = bytes(text_layout_flags(orjson.loads(totals)))
    for ts, missed in [(0, 0), (2**64 - 1, 9), (-(2**63), 2**63)]:
        line = b'{"utc_timestamp_ms":%d,"logger":{"missed_metrics_count":%d,"x":{"sum_us":2}}}'
        got = _fc_sum.add_text(layout, totals, line % (ts, missed))
        assert got == (
            orjson.dumps({"logger": {"missed_metrics_count": 4 + missed, "x": {"sum_us": 3}}}),
            ts,
            missed,
        )
    # no logger section, or the count as an agg: 0, as _missed says
    assert _fc_sum.add_text(b"\0", b'{"a":{"b":1}}', b'{"utc_timestamp_ms":1,"a":{"b":1}}') == (
        b'{"a":{"b":2}}',
        1,
        0,
    )
    agg = b'{"logger":{"missed_metrics_count":{"sum_us":1}}}'
    line = b'{"utc_timestamp_ms":1,"logger":{"missed_metrics_count":{"sum_us":6}}}'
    assert _fc_sum.add_text(b"\0", agg, line) == (
        b'{"logger":{"missed_metrics_count":{"sum_us":7}}}',
        1,
        0,
    )


def test_add_text_refuses_a_layout_that_does_not_fit_and_odd_totals() -> None:
    line = b'{"utc_timestamp_ms":1,"s":{"a":1,"b":2}}'
    totals = b'{"s":{"a":1,"b":2}}'
    assert _fc_sum.add_text(b"\0\0", totals, line) == (b'{"s":{"a":2,"b":4}}', 1, 0)
    for layout in (b"", b"\0", b"\0\0\0"):
        assert _fc_sum.add_text(layout, totals, line) is None
    for odd in (b'{"s":{"a":1,"b":2}} ', b'{"s":{"a":1,"b":2}', b'{"s":{"a":1,"b":2}}}', b""):
        assert _fc_sum.add_text(b"\0\0", odd, line) is None
    assert _fc_sum.add_text(b"", b"{}", b'{"utc_timestamp_ms":3}') == (b"{}", 3, 0)
    assert _fc_sum.add_text(b"", b"{}", line) is None


def test_add_text_wrong_argument_types_are_type_errors() -> None:
    good = (b"\0", b'{"s":{"a":1}}', b'{"utc_timestamp_ms":1,"s":{"a":1}}')
    assert _fc_sum.add_text(*good) is not None
    for index in range(3):
        for wrong in ("text", bytearray(good[index]), memoryview(good[index]), None):
            args: list[Any] = list(good)
            args[index] = wrong
            with pytest.raises(TypeError, match=f"argument {index + 1} must be bytes"):
                _fc_sum.add_text(*args)
    loose: Any = _fc_sum.add_text
    with pytest.raises(TypeError, match="takes 3 arguments"):
        loose(*good[:2])


def test_add_text_no_reference_leaks() -> None:
    lines = emulator_lines(3, seed=21, devices=SHAPES[2])
    total: Tree = {}
    reference_add(total, lines[0])
    layout = p.text_layout(total)
    assert layout is not None
    text = orjson.dumps(total)
    refused = [lines[1] + b" ", lines[1][:-100], lines[1].replace(b":0,", b":0.0,", 1)]

    def round_() -> None:
        for _ in range(200):
            got = _fc_sum.add_text(layout, text, lines[1])
            assert got is not None
            for line in refused:
                assert _fc_sum.add_text(layout, text, line) is None

    round_()
    gc.collect()
    refs = [sys.getrefcount(x) for x in (layout, text, lines[1])]
    blocks = sys.getallocatedblocks()
    for _ in range(5):
        round_()
    gc.collect()
    assert [sys.getrefcount(x) for x in (layout, text, lines[1])] == refs
    assert sys.getallocatedblocks() - blocks < 50


# -- trim: what a reading publishes of a delta or the totals


def names_of(sections: list[str] | None) -> tuple[bytes, ...] | None:
    """Section names as trim takes them: as JSON writes each between its quotes."""
    return None if sections is None else tuple(orjson.dumps(name)[1:-1] for name in sections)


def reference_trim(text: bytes, sections: list[str] | None) -> bytes:
    return orjson.dumps(trim_reference(orjson.loads(text), sections))


TRIM_KEYS = ["vcpu", "net_eth0", "block", "sum_us", "min_us", "a", "", "é", 'q"', "t\tab", "\x01"]
json_keys = st.one_of(st.sampled_from(TRIM_KEYS), st.text(max_size=3))
json_leaves = st.one_of(
    st.sampled_from([0, 0, 0, 0, 1, -1, 2**64 - 1, -(2**63), 0.0, -0.0]),
    st.integers(-(2**63), 2**64 - 1),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
    st.lists(st.sampled_from([0, 1, {}, {"a": 0}, "x", []]), max_size=3),
)
json_trees = st.recursive(
    json_leaves, lambda inner: st.dictionaries(json_keys, inner, max_size=5), max_leaves=40
)


@FUZZ
@given(
    tree=st.dictionaries(json_keys, json_trees, max_size=8),
    sections=st.one_of(st.none(), st.lists(json_keys, max_size=4)),
)
def test_trim_is_the_reference(tree: Tree, sections: list[str] | None) -> None:
    text = orjson.dumps(tree)
    assert _fc_sum.trim(text, names_of(sections)) == reference_trim(text, sections)


def canonical(text: bytes) -> bool:
    """Whether ``text`` is orjson's own compact JSON of a dict (what trim is given)."""
    try:
        tree = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return type(tree) is dict and orjson.dumps(tree) == text


edits = st.lists(
    st.tuples(
        st.floats(0, 1, exclude_max=True),
        st.sampled_from(["insert", "delete", "replace"]),
        st.one_of(st.sampled_from(list(b'{}[]":,0-1 \\u\x00\xff')), st.integers(0, 255)),
    ),
    min_size=1,
    max_size=3,
)


@FUZZ
@given(
    tree=st.dictionaries(json_keys, json_trees, max_size=6),
    changes=edits,
    sections=st.one_of(st.none(), st.lists(json_keys, max_size=3)),
)
def test_trim_of_any_bytes_is_the_reference_or_refused(
    tree: Tree, changes: list[tuple[float, str, int]], sections: list[str] | None
) -> None:
    """Whatever the bytes, no crash; whatever the change, canonical text is trimmed
    as the reference says (a change can keep it canonical: a digit for a digit)."""
    text = bytearray(orjson.dumps(tree))
    for where, how, byte in changes:
        at = int(where * (len(text) + (how == "insert")))
        if how == "insert":
            text.insert(at, byte)
        elif text:
            if how == "delete":
                del text[at]
            else:
                text[at] = byte
    changed = bytes(text)
    try:
        got: bytes | None = _fc_sum.trim(changed, names_of(sections))
    except ValueError:
        got = None
    if canonical(changed):
        assert got == reference_trim(changed, sections)


@settings(max_examples=200, deadline=None)
@given(
    rng=st.randoms(use_true_random=False),
    shape=st.sampled_from(range(len(SHAPES))),
    narrowed=st.booleans(),
)
def test_trim_is_the_reference_on_real_deltas_and_totals(
    rng: random.Random, shape: int, narrowed: bool
) -> None:
    lines = emulator_lines(3, rng.randint(0, 1000), SHAPES[shape])
    deltas = [p.delta_text(line) for line in lines]
    total: Tree = {}
    for line in lines:
        reference_add(total, line)
    names = list(total)
    sections = rng.sample([*names, "absent"], rng.randint(0, 5)) if narrowed else None
    for text in [*deltas, orjson.dumps(total)]:
        assert text is not None
        got = _fc_sum.trim(text, names_of(sections))
        assert got == reference_trim(text, sections)
        assert b":0," not in got
        assert b":0}" not in got
        assert b"{}" not in got[1:]


def test_trim_leaves_out_zero_leaves_and_emptied_objects_at_every_depth() -> None:
    text = orjson.dumps(
        {
            "vcpu": {
                "exit_io_in": 0,
                "exit_io_out": 3,
                "exit_io_in_agg": {"min_us": 0, "sum_us": 0},
            },
            "vmm": {"panic_count": 0},
            "empty": {},
            "net": {"tap_write_agg": {"min_us": 0, "max_us": 0, "sum_us": 9}},
            "odd": {"f": 0.0, "b": False, "n": None, "s": "0", "l": [0, {}], "m": -0.0},
            "top": 0,
        }
    )
    assert _fc_sum.trim(text, None) == orjson.dumps(
        {
            "vcpu": {"exit_io_out": 3},
            "net": {"tap_write_agg": {"sum_us": 9}},
            "odd": {"f": 0.0, "b": False, "n": None, "s": "0", "l": [0, {}], "m": -0.0},
        }
    )
    assert (
        _fc_sum.trim(text, (b"vmm", b"net", b"nope")) == b'{"net":{"tap_write_agg":{"sum_us":9}}}'
    )
    assert _fc_sum.trim(text, ()) == b"{}"
    assert _fc_sum.trim(b"{}", None) == b"{}"
    assert _fc_sum.trim(b'{"a":{"b":{}}}', None) == b"{}"
    # JSON's other spelling of the integer 0 is left out too, as orjson reads it as 0
    assert _fc_sum.trim(b'{"a":{"b":-0,"c":-0.0,"d":0e1}}', None) == b'{"a":{"c":-0.0,"d":0e1}}'


def test_trim_gives_the_text_itself_when_nothing_is_left_out() -> None:
    text = b'{"a":{"b":1,"c":{"d":[0]}},"e":"0"}'
    assert _fc_sum.trim(text, None) is text
    assert _fc_sum.trim(text, (b"a", b"e")) is text
    assert _fc_sum.trim(text, (b"a",)) == b'{"a":{"b":1,"c":{"d":[0]}}}'


def test_trim_matches_sections_by_their_key_as_written() -> None:
    text = orjson.dumps({"net_eth0": {"x": 1}, "net": {"x": 2}, 'q"': {"x": 3}, "n": {"x": 4}})
    assert _fc_sum.trim(text, (b"net",)) == b'{"net":{"x":2}}'  # not a prefix, not a part
    assert _fc_sum.trim(text, (b'q\\"',)) == b'{"q\\"":{"x":3}}'
    assert _fc_sum.trim(text, (b'q"',)) == b"{}"
    # only top-level keys are sections
    assert _fc_sum.trim(text, (b"x",)) == b"{}"


DEEP = 1024  # deeper than orjson serialises (255 levels): nothing it writes is refused


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"[]",
        b"0",
        b'"a"',
        b"{",
        b"}",
        b'{"a":1',
        b'{"a":1}}',
        b'{"a":1} ',
        b' {"a":1}',
        b'{ "a":1}',
        b'{"a" :1}',
        b'{"a": 1}',
        b'{"a":1 }',
        b'{"a":1 ,"b":2}',
        b'{"a":{"b":1} }',
        b'{"a":[1, 2]}',
        b'{"a":1,}',
        b'{,"a":1}',
        b'{"a":1,,"b":2}',
        b'{"a"}',
        b'{"a":}',
        b'{"a"1}',
        b"{a:1}",
        b"{'a':1}",
        b'{"a":01}',
        b'{"a":1.}',
        b'{"a":.5}',
        b'{"a":1e}',
        b'{"a":1e+}',
        b'{"a":+1}',
        b'{"a":-}',
        b'{"a":--1}',
        b'{"a":0x1}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":tru}',
        b'{"a":nul}',
        b'{"a":falsey}',
        b'{"a":"b}',
        b'{"a":"b\\"}',
        b'{"a":"\\x"}',
        b'{"a":"\\u12g4"}',
        b'{"a":"\\u12"}',
        b'{"a\x01":1}',
        b'{"a":"\x1f"}',
        b'{"a":[1,]}',
        b'{"a":[,1]}',
        b'{"a":[1 2]}',
        b'{"a":[}',
        b'{"a":{"b":1]}',
        b'{"a":1}\x00',
        b'{"a":' * (DEEP + 1) + b"1" + b"}" * (DEEP + 1),
        b'{"a":' + b"[" * (DEEP + 1) + b"]" * (DEEP + 1) + b"}",
    ],
)
def test_trim_refuses_what_is_not_compact_json_of_an_object(text: bytes) -> None:
    with pytest.raises(ValueError, match=r"^trim\(\): not compact JSON of an object at byte \d+$"):
        _fc_sum.trim(text, None)
    with pytest.raises(ValueError):
        _fc_sum.trim(text, (b"a",))  # a section left out is read all the same


def test_trim_takes_as_deep_as_it_goes() -> None:
    deep = b'{"a":' * DEEP + b"1" + b"}" * DEEP
    assert _fc_sum.trim(deep, None) is deep
    listed = b'{"a":' + b"[" * (DEEP - 1) + b"]" * (DEEP - 1) + b"}"
    assert _fc_sum.trim(listed, None) is listed


def test_trim_wrong_argument_types_are_type_errors() -> None:
    loose: Any = _fc_sum.trim
    for text in ("{}", bytearray(b"{}"), memoryview(b"{}"), None):
        with pytest.raises(TypeError, match="argument 1 must be bytes"):
            loose(text, None)
    for sections in ([b"a"], "a", b"a", (b"a", "b"), (bytearray(b"a"),)):
        with pytest.raises(TypeError, match="sections must be None or a tuple of bytes"):
            loose(b"{}", sections)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        loose(b"{}")


def test_trim_no_reference_leaks() -> None:
    lines = emulator_lines(2, seed=22, devices=SHAPES[2])
    text = p.delta_text(lines[1])
    assert text is not None
    same = b'{"a":{"b":1}}'
    sections = (b"net_eth0", b"vcpu")

    def round_() -> None:
        for _ in range(200):
            assert len(_fc_sum.trim(text, None)) < len(text)
            assert _fc_sum.trim(text, sections) is not text
            assert _fc_sum.trim(same, None) is same
            with pytest.raises(ValueError):
                _fc_sum.trim(text[:-1], sections)

    round_()
    gc.collect()
    refs = [sys.getrefcount(x) for x in (text, same, sections, *sections)]
    blocks = sys.getallocatedblocks()
    for _ in range(5):
        round_()
    gc.collect()
    assert [sys.getrefcount(x) for x in (text, same, sections, *sections)] == refs
    assert sys.getallocatedblocks() - blocks < 50


# -- the extension itself


def test_the_extension_is_built_for_the_stable_abi() -> None:
    """Built with Py_LIMITED_API: it cannot read CPython-internal fields (a dict's
    version tag, gone in 3.12), and one build serves every CPython from 3.11 on."""
    assert _fc_sum.__file__ is not None
    assert _fc_sum.__file__.endswith(".abi3.so")


def test_the_extension_sums_text_to_text_and_objects_only() -> None:
    """One function a step: totals kept as text (add_text), deltas and lines that do not
    fit the text as objects (merge_into), and what a reading publishes of them (trim)."""
    assert {name for name in dir(_fc_sum) if not name.startswith("_")} == {
        "add_text",
        "merge_into",
        "trim",
    }
