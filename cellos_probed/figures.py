"""The daemon's own counts: what the ``agent`` event, ``STATUS=`` and the
Prometheus collector read (``daemon.Prober`` keeps them; ``metrics.py`` reads
them through :class:`DaemonFigures` without importing the daemon)."""

from __future__ import annotations

from collections.abc import Mapping, Sized
from dataclasses import dataclass
from typing import Protocol

from cellos_probed.scheduler import TickStats


@dataclass(slots=True)
class ProbeStats:
    readings: int = 0
    errors: int = 0
    #: errors by (probe name, kind)
    errors_by: dict[tuple[str, str], int] | None = None

    def count_error(self, kind: str, probe: str) -> None:
        self.errors += 1
        if self.errors_by is None:
            self.errors_by = {}
        key = (probe, kind)
        self.errors_by[key] = self.errors_by.get(key, 0) + 1

    @property
    def errors_by_kind(self) -> dict[str, int] | None:
        if self.errors_by is None:
            return None
        by_kind: dict[str, int] = {}
        for (_, kind), count in self.errors_by.items():
            by_kind[kind] = by_kind.get(kind, 0) + count
        return by_kind


@dataclass(slots=True)
class ProbeTiming:
    """A probe type's reads in the last tick that read it, as node_exporter's
    ``node_scrape_collector_duration_seconds`` and ``_success`` report a collector."""

    #: ``TickCount.begun`` of that tick
    tick: int
    #: its slowest group's read: the groups of a tick run side by side
    seconds: float
    #: every cell's read succeeded
    success: bool


class DaemonFigures(Protocol):
    """What a reader of the daemon's figures may ask of it (``daemon.Prober``)."""

    @property
    def cells(self) -> Sized: ...

    @property
    def tick_stats(self) -> TickStats: ...

    @property
    def probe_stats(self) -> ProbeStats: ...

    @property
    def probe_timings(self) -> Mapping[str, ProbeTiming]: ...
