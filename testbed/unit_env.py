"""glibc's malloc settings from the shipped systemd unit, for a daemon started outside systemd.

The benchmark and the demo start ``cellos-probed run`` themselves, and the
tests start interpreters to check those settings: all take the unit's
``Environment=GLIBC_TUNABLES=...`` line, so the unit stays the one place
they are written and the benchmark's figures stay those of an installed daemon.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

UNIT: Final = Path(__file__).resolve().parent.parent / "systemd" / "cellos-probed.service"
_LINE_START: Final = "Environment=GLIBC_TUNABLES="


class UnitSettingMissing(Exception):
    """The unit has no ``Environment=GLIBC_TUNABLES=`` line, or more than one."""


def glibc_tunables(unit: Path = UNIT) -> str:
    """The value of the unit's one ``Environment=GLIBC_TUNABLES=`` line (written unquoted)."""
    found = [
        line.removeprefix(_LINE_START)
        for line in unit.read_text().splitlines()
        if line.startswith(_LINE_START)
    ]
    if len(found) != 1:
        raise UnitSettingMissing(
            f"{unit}: {len(found)} lines start with {_LINE_START!r}; expected exactly one"
        )
    return found[0]


def tunable_values(unit: Path = UNIT) -> dict[str, int]:
    """The unit's tunables by name (``glibc.malloc.arena_max``: 2, ...)."""
    values: dict[str, int] = {}
    for setting in glibc_tunables(unit).split(":"):
        name, _, value = setting.partition("=")
        values[name] = int(value, 0)
    return values


def environment_like_the_unit(unit: Path = UNIT) -> dict[str, str]:
    """This process's environment with the unit's ``GLIBC_TUNABLES``, for a child daemon."""
    return {**os.environ, "GLIBC_TUNABLES": glibc_tunables(unit)}
