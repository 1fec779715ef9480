"""Pure parsers for cgroup v2 interface files, in the kernel's exact formats.

Three shapes cover every file the cgroup probe reads
(Documentation/admin-guide/cgroup-v2.rst, "Interface Files"):

- flat keyed, ``memory.events`` / ``cpu.stat`` / ``pids.events``::

      usage_usec 123
      user_usec 100

- single value, ``memory.current`` / ``memory.peak`` / ``pids.current``: ``8192``
- pressure stall information, ``*.pressure``::

      some avg10=0.00 avg60=0.00 avg300=0.00 total=0
      full avg10=0.00 avg60=0.00 avg300=0.00 total=0

Errors name the file and line, never the contents: the readings and the
logs must not leak what a hostile file holds.
"""

from __future__ import annotations

import re
from typing import Any, Final

from cellos_probed.readings import ProbeParseError

_PSI_AVERAGES: Final = ("avg10", "avg60", "avg300")
_PSI_LINES: Final = ("some", "full")
_KEY: Final = re.compile(r"[A-Za-z0-9_.]+", re.ASCII)


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


def _counter(token: str, file: str, line_no: int) -> int:
    # int() accepts "1_000", "+5" and surrounding blanks; the kernel writes none
    if not token.isascii() or not token.isdigit():
        raise ProbeParseError(f"{file}: line {line_no}: value is not a non-negative integer")
    return int(token)


# The whole file in the kernel's exact format, checked in one regex pass: the
# fast path for every tick. Anything else goes through the line-by-line
# parser below, which names the line and the reason.
_FLAT_KEYED_FILE: Final = re.compile(r"(?:[A-Za-z0-9_.]+ [0-9]+\n)*", re.ASCII)
_PSI_LINE: Final = (
    r" avg10=([0-9]+\.[0-9]+) avg60=([0-9]+\.[0-9]+) avg300=([0-9]+\.[0-9]+) total=([0-9]+)\n"
)
_PSI_FILE: Final = re.compile(f"some{_PSI_LINE}(?:full{_PSI_LINE})?", re.ASCII)


def parse_flat_keyed(text: str, file: str) -> dict[str, int]:
    """``key value`` per line, every key passed through as an integer."""
    if _FLAT_KEYED_FILE.fullmatch(text):
        fields = text.split()
        keys = fields[0::2]
        if len(set(keys)) == len(keys):
            return dict(zip(keys, map(int, fields[1::2]), strict=True))
    return _parse_flat_keyed_slowly(text, file)


def _parse_flat_keyed_slowly(text: str, file: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line_no, line in enumerate(_lines(text), start=1):
        fields = line.split()
        if len(fields) != 2:
            raise ProbeParseError(f"{file}: line {line_no}: expected 'key value'")
        key, value = fields
        if not _KEY.fullmatch(key):
            raise ProbeParseError(f"{file}: line {line_no}: malformed key")
        if key in out:
            raise ProbeParseError(f"{file}: line {line_no}: duplicate key")
        out[key] = _counter(value, file, line_no)
    return out


def parse_single_value(text: str, file: str) -> int:
    lines = _lines(text)
    if len(lines) != 1:
        raise ProbeParseError(f"{file}: expected one value, found {len(lines)} lines")
    return _counter(lines[0].strip(), file, 1)


def _average(token: str, file: str, line_no: int) -> float:
    whole, dot, frac = token.partition(".")
    digits = whole.isascii() and whole.isdigit()
    if not digits or (dot and not (frac.isascii() and frac.isdigit())):
        raise ProbeParseError(f"{file}: line {line_no}: average is not a decimal number")
    return float(token)


def parse_pressure(text: str, file: str) -> dict[str, dict[str, Any]]:
    """PSI lines into ``{"some": {...}, "full": {...}}`` (``full`` may be absent)."""
    exact = _PSI_FILE.fullmatch(text)
    if exact:
        g = exact.groups()
        out = {"some": {"avg10": float(g[0]), "avg60": float(g[1]), "avg300": float(g[2]),
                        "total": int(g[3])}}  # fmt: skip
        if g[4] is not None:
            out["full"] = {"avg10": float(g[4]), "avg60": float(g[5]), "avg300": float(g[6]),
                           "total": int(g[7])}  # fmt: skip
        return out
    return _parse_pressure_slowly(text, file)


def _parse_pressure_slowly(text: str, file: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for line_no, line in enumerate(_lines(text), start=1):
        fields = line.split()
        if not fields or fields[0] not in _PSI_LINES:
            raise ProbeParseError(f"{file}: line {line_no}: expected 'some' or 'full'")
        if fields[0] in out:
            raise ProbeParseError(f"{file}: line {line_no}: duplicate '{fields[0]}' line")
        values: dict[str, Any] = {}
        for pair in fields[1:]:
            key, eq, value = pair.partition("=")
            if not eq or key in values:
                raise ProbeParseError(f"{file}: line {line_no}: expected key=value pairs")
            if key in _PSI_AVERAGES:
                values[key] = _average(value, file, line_no)
            elif key == "total":
                values[key] = _counter(value, file, line_no)
            else:
                raise ProbeParseError(f"{file}: line {line_no}: unknown pressure field")
        missing = [key for key in (*_PSI_AVERAGES, "total") if key not in values]
        if missing:
            raise ProbeParseError(f"{file}: line {line_no}: missing {', '.join(missing)}")
        out[fields[0]] = values
    if "some" not in out:
        raise ProbeParseError(f"{file}: no 'some' line")
    return out


def output_key(file: str) -> str:
    """``memory.events`` -> ``memory_events``."""
    return file.replace(".", "_")


def counter_deltas(
    previous: dict[str, dict[str, int]] | None,
    current: dict[str, dict[str, int]],
    *,
    recreated: bool = False,
) -> dict[str, Any] | None:
    """Increase of every counter since ``previous``; ``None`` on the first reading.

    A counter that went down (or ``recreated``: the directory is a new one)
    means the cgroup was recreated: every baseline restarts at zero, so the
    deltas are the new counters' values and ``reset`` is true. A counter or
    file new since the previous reading also counts from zero.
    """
    if previous is None:
        return None
    deltas: dict[str, Any] = {}
    reset = recreated
    if not reset:
        # one pass: the increases, and on the first decrease the reset instead
        for name, counters in current.items():
            before = previous.get(name)
            if before is None:
                deltas[name] = dict(counters)
                continue
            increases = {key: value - before.get(key, 0) for key, value in counters.items()}
            if increases and min(increases.values()) < 0:
                reset = True
                break
            deltas[name] = increases
    if reset:
        deltas = {name: dict(counters) for name, counters in current.items()}
    deltas["reset"] = reset
    return deltas
