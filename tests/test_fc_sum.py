"""The C ``merge_into`` (``_fc_sum.c``) against its specification, ``merge_into_reference``.

Results are compared leaf by leaf with their types (``True == 1``), key order
included; errors by type and message; the gauge caches too. The C function is
called with its configuration spelt out, the reference with the module
globals it reads patched to match (a fresh gauge cache, the same limit).
"""

from __future__ import annotations

import copy
import gc
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    merge_into_reference,
)
from testbed.fc_emulator.metrics import VmMetrics

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


@contextmanager
def reference_config(
    limit: int = p._GAUGE_CACHE_LIMIT, is_gauge: Callable[[str, str], object] | None = None
) -> Iterator[dict[Any, Any]]:
    """The reference's globals for a test: a new gauge cache (yielded), ``limit``, ``is_gauge``."""
    cache: dict[Any, Any] = {}
    with (
        patch.object(p, "_section_gauges", cache),
        patch.object(p, "_GAUGE_CACHE_LIMIT", limit),
        patch.object(p, "is_gauge", is_gauge or p.is_gauge),
    ):
        yield cache


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
    with reference_config(limit) as ref_cache:
        for new in news:
            snapshot = copy.deepcopy(new)
            expected = outcome(merge_into_reference, ref_total, new)
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
    with reference_config(limit) as ref_cache:
        for new in news:
            snapshot = copy.deepcopy(new)
            merge_into_reference(ref_total, new)
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
        merge_into_reference(ref_total, new)
        merge_into(c_total, new)
        assert_same(c_total, ref_total)
    assert TIMESTAMP_KEY not in c_total
    # the accumulator's readings, bytes for bytes, with two lines per reading at times
    stream = [orjson.dumps(new) + b"\n" for new in realistic_lines(30, seed=8)]
    readings = []
    for merge in (merge_into_reference, merge_into):
        accumulator = MetricsAccumulator()
        with patch.object(p, "merge_into", merge):
            got = []
            for i in range(0, len(stream), 3):
                accumulator.feed(stream[i])
                accumulator.feed(b"".join(stream[i + 1 : i + 3]))
                reading = accumulator.take_reading_json()
                got.append((reading.lines, orjson.dumps([reading.delta, reading.totals])))
        readings.append(got)
    assert readings[0] == readings[1]


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
    with reference_config():
        merge_into_reference(ref_total, new)
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
    with reference_config(limit=4) as ref_cache:
        for new in [*known, *known, *devices, *devices, *devices]:
            merge_into_reference(ref_total, new)
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
        keys["tx_count"],  # 0 added: nothing stored
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
    with reference_config(is_gauge=boom) as ref_cache:
        with pytest.raises(Boom, match="signals/sigpipe"):
            merge_into_reference(ref_total, new)
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

        def answering(section: str, field: str, answer: object = answer) -> object:
            return answer

        with reference_config(is_gauge=answering) as ref_cache:
            for _ in range(2):  # the second time from the cache
                expected = outcome(merge_into_reference, ref_total, new)
                assert outcome(c_merge(c_cache, is_gauge=answering), c_total, new) == expected
                assert_same(c_total, ref_total)
                assert c_cache == ref_cache


def test_a_none_cache_entry_is_a_missing_one() -> None:
    c_cache: dict[Any, Any] = {"net": None}
    ref_total: Tree = {"net": {"a": 1}}
    c_total: Tree = {"net": {"a": 1}}
    with reference_config() as ref_cache:
        ref_cache["net"] = None
        merge_into_reference(ref_total, {"net": {"a": 2}})
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
            if merge == "reference":
                with reference_config(is_gauge=meddling):
                    merge_into_reference(total, new)
            else:
                c_merge({}, is_gauge=meddling)(total, new)
            results.append(total)
        assert results[0] == results[1] == {"net": {"a": 5 + value, "b": 0}}


def test_a_total_merged_into_itself_doubles_as_in_the_reference() -> None:
    line = realistic_lines(1, seed=4)[0]
    line["id"] = "vm"
    ref_total, c_total = copy.deepcopy(line), copy.deepcopy(line)
    with reference_config():
        merge_into_reference(ref_total, ref_total)
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
            if merge == "reference":
                with reference_config(is_gauge=gauge):
                    results.append((outcome(merge_into_reference, mine, new), mine, new))
            else:
                results.append((outcome(c_merge({}, is_gauge=gauge), mine, new), mine, new))
        (ref_error, ref_total, ref_new), (c_error, c_total, c_new) = results
        assert ref_error is not None
        assert c_error == ref_error
        if gauge is grows:  # BadEq keys cannot be compared, even to themselves
            assert_same(c_total, ref_total)
            assert_same(c_new, ref_new)
