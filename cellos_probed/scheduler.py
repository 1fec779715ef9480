"""The fixed tick: deadline-based, drift-free, never piling up.

Deadlines are ``start + k * tick``, so a late wake-up never shifts the
ones after it. A tick whose work runs past the next deadline is an
overrun: the deadlines it missed are skipped (and counted) rather than
run back to back.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio


@dataclass(slots=True)
class TickStats:
    ticks: int = 0
    overruns: int = 0
    skipped_ticks: int = 0
    last_duration: float = 0.0
    #: recent tick durations in seconds, for percentiles in status lines
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=1024))

    def percentile(self, fraction: float) -> float:
        if not self.durations:
            return 0.0
        ordered = sorted(self.durations)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_fixed_tick(
    tick_seconds: float,
    on_tick: Callable[[int], Awaitable[None]],
    stats: TickStats,
    *,
    first_deadline: float | None = None,
    after_tick: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_tick(index)`` at every deadline until cancelled.

    ``index`` counts deadlines, skipped ones included, so it also tells how
    far into the schedule a tick is (the probes' cadences are counted on it,
    so they stay on the grid through overruns). ``after_tick`` runs once the tick's
    figures are counted (the daemon's own reporting and watchdog).
    """
    deadline = trio.current_time() if first_deadline is None else first_deadline
    index = 0
    task_status.started()
    while True:
        await trio.sleep_until(deadline)
        started = trio.current_time()
        await on_tick(index)
        finished = trio.current_time()
        stats.ticks += 1
        stats.last_duration = finished - started
        stats.durations.append(stats.last_duration)
        index += 1
        deadline += tick_seconds
        if finished > deadline:
            missed = math.ceil((finished - deadline) / tick_seconds)
            stats.overruns += 1
            stats.skipped_ticks += missed
            index += missed
            deadline += missed * tick_seconds
        if after_tick is not None:
            await after_tick()
