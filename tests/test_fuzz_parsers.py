"""Property tests: every input parses to the documented shape or raises the documented error."""

from __future__ import annotations

import re
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellos_probed.cgroupfs import parse_mountinfo_cgroup2
from cellos_probed.config import Config, ConfigError, parse_config
from cellos_probed.probes import ProbeParseError
from cellos_probed.probes.cgroup_parse import (
    parse_flat_keyed,
    parse_pressure,
    parse_single_value,
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# what an error message may say: the file, maybe a line number, a fixed reason; never contents
ERROR_SHAPE = re.compile(r"^(cpu\.stat|io\.pressure|memory\.peak)(: line \d+)?: (?P<reason>.+)$")
# the closed set of reasons a parser may give: the message can carry nothing else
REASONS = re.compile(
    r"expected 'key value'|malformed key|duplicate key|value is not a non-negative integer"
    r"|expected one value, found \d+ lines|average is not a decimal number"
    r"|expected 'some' or 'full'|duplicate '(some|full)' line|expected key=value pairs"
    r"|unknown pressure field|missing (avg10|avg60|avg300|total)(, (avg10|avg60|avg300|total))*"
    r"|no 'some' line"
)
keys = st.text(string.ascii_lowercase + "_", min_size=1, max_size=20)
counters = st.integers(min_value=0, max_value=2**64)


def assert_clean_error(error: ProbeParseError, text: str) -> None:
    shape = ERROR_SHAPE.match(error.message)
    assert shape, error.message
    assert REASONS.fullmatch(shape.group("reason")), error.message


@FUZZ
@given(st.text(max_size=400))
def test_flat_keyed_on_arbitrary_text(text: str) -> None:
    try:
        parsed = parse_flat_keyed(text, "cpu.stat")
    except ProbeParseError as error:
        assert_clean_error(error, text)
        return
    assert all(isinstance(v, int) and v >= 0 for v in parsed.values())
    assert len(parsed) == len([line for line in text.split("\n") if line.strip()])


@FUZZ
@given(st.dictionaries(keys, counters, max_size=30))
def test_flat_keyed_round_trips_kernel_output(values: dict[str, int]) -> None:
    text = "".join(f"{k} {v}\n" for k, v in values.items())
    assert parse_flat_keyed(text, "cpu.stat") == values


@FUZZ
@given(st.text(max_size=200))
def test_pressure_on_arbitrary_text(text: str) -> None:
    try:
        parsed = parse_pressure(text, "io.pressure")
    except ProbeParseError as error:
        assert_clean_error(error, text)
        return
    assert "some" in parsed
    for line in parsed.values():
        assert set(line) == {"avg10", "avg60", "avg300", "total"}
        assert isinstance(line["total"], int)
        assert all(isinstance(line[k], float) for k in ("avg10", "avg60", "avg300"))


averages = st.floats(min_value=0, max_value=100, allow_nan=False).map(lambda x: round(x, 2))


@FUZZ
@given(averages, averages, averages, counters, st.booleans())
def test_pressure_round_trips_kernel_output(
    a10: float, a60: float, a300: float, total: int, with_full: bool
) -> None:
    line = f"avg10={a10:.2f} avg60={a60:.2f} avg300={a300:.2f} total={total}"
    text = f"some {line}\n" + (f"full {line}\n" if with_full else "")
    parsed = parse_pressure(text, "io.pressure")
    expected = {"avg10": a10, "avg60": a60, "avg300": a300, "total": total}
    assert parsed["some"] == expected
    assert ("full" in parsed) is with_full


@FUZZ
@given(st.text(max_size=40))
def test_single_value_on_arbitrary_text(text: str) -> None:
    try:
        value = parse_single_value(text, "memory.peak")
    except ProbeParseError as error:
        assert_clean_error(error, text)
        return
    assert value >= 0
    assert str(value) == text.strip().lstrip("0") or value == 0


@FUZZ
@given(st.text(max_size=300))
def test_config_on_arbitrary_text(text: str) -> None:
    try:
        config = parse_config(text, "fuzz.toml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.toml")
        return
    assert isinstance(config, Config)


toml_values = st.one_of(
    st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=12).map(lambda s: '"' + s.replace("\\", "").replace('"', "") + '"'),
    st.just("[]"), st.just('["nats://127.0.0.1:4222"]'), st.just("{}"),
)  # fmt: skip
sections = st.sampled_from(
    ["daemon", "nats", "paths", "buffer", "spool", "nats.jetstream", "cell.cgroup"]
)
option_keys = st.sampled_from([
    "tick_seconds", "probe_timeout_seconds", "host_id", "servers", "subject_prefix",
    "max_events", "max_bytes", "path", "replicas", "cgroup_root", "id", "run_id", "bogus",
])  # fmt: skip


@FUZZ
@given(st.lists(st.tuples(sections, option_keys, toml_values), max_size=8), st.booleans())
def test_config_on_plausible_documents(
    entries: list[tuple[str, str, str]], with_cell: bool
) -> None:
    text = ""
    for section, key, value in entries:
        value = {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), str(value))
        if isinstance(value, str) and value in ("True", "False"):
            value = value.lower()
        text += f"[{section}]\n{key} = {value}\n" if "cell" not in section else ""
    if with_cell:
        text += '[[cell]]\nid = "c"\nrun_id = "r"\nspec_signature_hash = "h"\n'
    try:
        parse_config(text, "fuzz.toml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.toml")


@FUZZ
@given(st.text(max_size=300))
def test_mountinfo_on_arbitrary_text(text: str) -> None:
    result = parse_mountinfo_cgroup2(text)
    assert result is None or str(result)
