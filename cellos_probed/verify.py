"""Completeness a consumer can check: ``cellos-probed tail --verify``.

Per (boot, host, cell, probe): which ``cellosseq`` values arrived, which
arrived twice, which are missing, and which of the missing a ``gap`` event
declared. An undeclared hole is a loss the host did not own up to. Pure:
events in, report out.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, str, str, str]  # boot, host, cell, probe source


def _ranges(numbers: list[int]) -> str:
    if not numbers:
        return "-"
    out, start, prev = [], numbers[0], numbers[0]
    for n in numbers[1:]:
        if n == prev + 1:
            prev = n
            continue
        out.append(f"{start}" if start == prev else f"{start}..{prev}")
        start = prev = n
    out.append(f"{start}" if start == prev else f"{start}..{prev}")
    return ",".join(out)


@dataclass
class SequenceRow:
    key: Key
    received: int
    first: int
    last: int
    duplicates: list[int]
    holes: list[int]
    declared: list[int]
    undeclared: list[int]


@dataclass
class Completeness:
    """Feed it every event of a stream; ``from_start`` when the stream holds them all."""

    from_start: bool = False
    #: only this probe's events count (short name); its readings, errors and gaps
    #: arrive on three kinds of subject, so the filter is on ``probeSource``
    probe: str | None = None
    seen: dict[Key, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    declared: dict[Key, set[int]] = field(default_factory=lambda: defaultdict(set))
    other: int = 0

    def add(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type", "")).rsplit(".", 1)[-1]
        data = event.get("data") or {}
        boot = str(event.get("cellosagentboot", "?"))
        if self.probe is not None and (
            str(data.get("probeSource", "")).removeprefix("host.") != self.probe
        ):
            return
        key = (
            boot,
            str(data.get("hostId")),
            str(data.get("cellId")),
            str(data.get("probeSource")),
        )
        if kind == "gap":
            first, last = int(data["firstSequence"]), int(data["lastSequence"])
            self.declared[key].update(range(first, last + 1))
            return
        count = event.get("cellosseq")
        if not isinstance(count, int) or isinstance(count, bool):
            self.other += 1  # agent events: no cellosseq
            return
        self.seen[key][count] = self.seen[key].get(count, 0) + 1

    def rows(self) -> list[SequenceRow]:
        rows = []
        for key in sorted(set(self.seen) | set(self.declared)):
            counts = self.seen.get(key, {})
            declared = self.declared.get(key, set())
            known = set(counts) | declared
            first = 1 if self.from_start else min(counts, default=min(declared, default=1))
            last = max(known, default=0)
            holes = [n for n in range(first, last + 1) if n not in counts]
            rows.append(
                SequenceRow(
                    key,
                    sum(counts.values()),
                    first,
                    last,
                    sorted(n for n, c in counts.items() if c > 1),
                    holes,
                    [n for n in holes if n in declared],
                    [n for n in holes if n not in declared],
                )
            )
        return rows

    @property
    def ok(self) -> bool:
        return not any(row.undeclared for row in self.rows())

    def render(self) -> str:
        lines = [
            f"{'boot':<8} {'host':<16} {'cell':<16} {'probe':<16} {'received':>8} "
            f"{'range':>13} {'dups':>5} {'declared lost':>14} {'UNDECLARED':>10}"
        ]
        for row in self.rows():
            boot, host, cell, probe = row.key
            lines.append(
                f"{boot[:8]:<8} {host:<16} {cell:<16} {probe:<16} {row.received:>8} "
                f"{f'{row.first}..{row.last}':>13} {len(row.duplicates):>5} "
                f"{len(row.declared):>14} {len(row.undeclared):>10}"
            )
            if row.undeclared:
                lines.append(f"    undeclared holes: {_ranges(row.undeclared)}")
            if row.duplicates:
                lines.append(f"    duplicates: {_ranges(row.duplicates)}")
        verdict = "OK: every missing reading was declared" if self.ok else "FAIL: undeclared holes"
        lines.append(verdict)
        return "\n".join(lines)
