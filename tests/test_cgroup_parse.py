"""The cgroup parsers on files in the kernel's exact formats."""

from __future__ import annotations

import pytest

from cellos_probed.probes import ProbeParseError
from cellos_probed.probes.cgroup_parse import (
    counter_deltas,
    parse_flat_keyed,
    parse_pressure,
    parse_single_value,
)

# kernel 6.x memory.events of a cgroup that hit its limit and OOM-killed twice
MEMORY_EVENTS = "low 0\nhigh 12\nmax 40\noom 2\noom_kill 2\noom_group_kill 0\n"
# cpu.stat as printed by kernel 6.18 with the cpu controller enabled
CPU_STAT = (
    "usage_usec 1204813\nuser_usec 1003911\nsystem_usec 200902\nnice_usec 0\n"
    "core_sched.force_idle_usec 0\nnr_periods 12\nnr_throttled 3\nthrottled_usec 45120\n"
    "nr_bursts 0\nburst_usec 0\n"
)
PRESSURE = (
    "some avg10=1.53 avg60=0.40 avg300=0.09 total=2841003\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=120034\n"
)


def test_flat_keyed_passes_every_key_through_as_integers() -> None:
    assert parse_flat_keyed(MEMORY_EVENTS, "memory.events") == {
        "low": 0, "high": 12, "max": 40, "oom": 2, "oom_kill": 2, "oom_group_kill": 0,
    }  # fmt: skip
    stat = parse_flat_keyed(CPU_STAT, "cpu.stat")
    assert stat["usage_usec"] == 1204813
    assert stat["core_sched.force_idle_usec"] == 0
    assert stat["throttled_usec"] == 45120
    assert len(stat) == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("usage_usec\n", "line 1: expected 'key value'"),
        ("usage_usec 1 2\n", "line 1: expected 'key value'"),
        ("a 1\nusage_usec -5\n", "line 2: value is not a non-negative integer"),
        ("usage_usec 1.5\n", "value is not a non-negative integer"),
        ("usage_usec 1_000\n", "value is not a non-negative integer"),
        ("a 1\na 2\n", "line 2: duplicate key"),
        ("k\u00e9y 1\n", "malformed key"),
    ],
)
def test_flat_keyed_rejects_malformed_lines_without_quoting_them(text: str, message: str) -> None:
    with pytest.raises(ProbeParseError, match=message) as caught:
        parse_flat_keyed(text, "cpu.stat")
    assert "cpu.stat" in str(caught.value)
    assert "usage_usec" not in str(caught.value)  # never the file's contents


def test_single_value_files() -> None:
    assert parse_single_value("8388608\n", "memory.current") == 8388608
    for bad in ("", "max\n", "1\n2\n", "-1\n"):
        with pytest.raises(ProbeParseError, match=r"memory\.peak"):
            parse_single_value(bad, "memory.peak")


def test_pressure_lines_keep_averages_as_numbers_and_total_as_integer() -> None:
    parsed = parse_pressure(PRESSURE, "cpu.pressure")
    assert parsed == {
        "some": {"avg10": 1.53, "avg60": 0.40, "avg300": 0.09, "total": 2841003},
        "full": {"avg10": 0.0, "avg60": 0.0, "avg300": 0.0, "total": 120034},
    }
    assert isinstance(parsed["some"]["total"], int)
    # older kernels print no `full` line for cpu
    assert set(parse_pressure(PRESSURE.splitlines()[0] + "\n", "cpu.pressure")) == {"some"}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        "some avg10=0.00 avg60=0.00 total=0\n",
        "some avg10=x avg60=0.00 avg300=0.00 total=0\n",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0 extra=1\n",
        "most avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    ],
)
def test_pressure_rejects_malformed_files(text: str) -> None:
    with pytest.raises(ProbeParseError, match=r"io\.pressure"):
        parse_pressure(text, "io.pressure")


def test_deltas_are_null_first_then_increases() -> None:
    first = {"memory_events": {"oom": 1, "max": 5}, "cpu_stat": {"usage_usec": 100}}
    second = {"memory_events": {"oom": 3, "max": 5}, "cpu_stat": {"usage_usec": 250}}
    assert counter_deltas(None, first) is None
    assert counter_deltas(first, second) == {
        "memory_events": {"oom": 2, "max": 0},
        "cpu_stat": {"usage_usec": 150},
        "reset": False,
    }


def test_a_counter_going_down_resets_every_baseline() -> None:
    before = {"memory_events": {"oom": 7}, "cpu_stat": {"usage_usec": 9000}}
    after = {"memory_events": {"oom": 1}, "cpu_stat": {"usage_usec": 9500}}
    assert counter_deltas(before, after) == {
        "memory_events": {"oom": 1},
        "cpu_stat": {"usage_usec": 9500},
        "reset": True,
    }


def test_a_recreated_directory_resets_even_when_counters_grew() -> None:
    before = {"cpu_stat": {"usage_usec": 10}}
    after = {"cpu_stat": {"usage_usec": 20}}
    assert counter_deltas(before, after, recreated=True) == {
        "cpu_stat": {"usage_usec": 20},
        "reset": True,
    }


def test_a_new_file_counts_from_zero() -> None:
    before = {"cpu_stat": {"usage_usec": 10}}
    after = {"cpu_stat": {"usage_usec": 15}, "pids_events": {"max": 2}}
    assert counter_deltas(before, after) == {
        "cpu_stat": {"usage_usec": 5},
        "pids_events": {"max": 2},
        "reset": False,
    }
