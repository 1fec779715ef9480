"""Coverage-guided fuzz targets (atheris): each parser, documented errors allowed, nothing else.

Run with ``make fuzz`` (FUZZ_SECONDS per target, default 600) or
``python fuzz/targets.py NAME -max_total_time=60``. A target raises (and
atheris reports a crash) only when a parser fails in an undocumented way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import atheris

with atheris.instrument_imports():
    from cellos_probed.config import ConfigError, parse_config
    from cellos_probed.probes import ProbeParseError
    from cellos_probed.probes.cgroup_parse import (
        parse_flat_keyed,
        parse_pressure,
        parse_single_value,
    )


def cgroup(data: bytes) -> None:
    text = data.decode("latin-1")
    for parse, name in (
        (parse_flat_keyed, "cpu.stat"),
        (parse_pressure, "cpu.pressure"),
        (parse_single_value, "memory.current"),
    ):
        try:
            parse(text, name)  # type: ignore[operator]
        except ProbeParseError as error:
            if text.strip() and text.strip() in error.message and len(text.strip()) > 8:
                raise AssertionError("input leaked into the error message") from None


def config(data: bytes) -> None:
    try:
        parse_config(data.decode("utf-8", "replace"), "fuzz.toml")
    except ConfigError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {"cgroup": cgroup, "config": config}


def extra_targets() -> None:
    """Targets of the other probes' parsers, registered when their modules exist."""
    try:
        from fuzz.probe_targets import TARGETS as MORE
    except ImportError:
        return
    TARGETS.update(MORE)


def main() -> None:
    extra_targets()
    name = sys.argv[1]
    if name == "--list":
        print(" ".join(TARGETS))
        return
    atheris.Setup([sys.argv[0], *sys.argv[2:]], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
