"""Logging: structlog on stderr, JSON for journald, readable on a terminal.

stdout belongs to ``once`` and ``tail`` output. Every line carries the
``cell`` and ``probe`` bound by the task that logs it (trio copies the
context into child tasks and worker threads). nats-py's and pyroute2's
stdlib loggers go through the same processors, so the journal sees one
shape of line.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any

import structlog

#: the (cell, probe) a task is working for. One C-level ContextVar set per
#: probe task per tick: structlog's bind_contextvars was a tenth of the
#: daemon's CPU at a thousand cells.
log_subject: ContextVar[tuple[str | None, str | None] | None] = ContextVar(
    "log_subject", default=None
)


def add_log_subject(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Every log line says which cell and probe it is about, where the task knows."""
    current = log_subject.get()
    if current is not None:
        if current[0] is not None:
            event_dict.setdefault("cell", current[0])
        if current[1] is not None:
            event_dict.setdefault("probe", current[1])
    return event_dict


_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    add_log_subject,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(*, level: str = "info", json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger once, at start-up."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
        tail: list[Any] = [structlog.processors.dict_tracebacks]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=True)
        tail = []
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*_SHARED, *tail, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # no caching: logging is rare here (state changes, not ticks), and an
        # uncached logger follows a later reconfiguration (tests capture logs)
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *_SHARED],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # nats-py logs every reconnect attempt at error level; pyroute2 is chatty
    logging.getLogger("nats").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("pyroute2").setLevel(max(numeric, logging.WARNING))


class RepeatedErrorFilter:
    """Log a probe's failure when it starts or changes, and its recovery; not every tick.

    Keyed by (cell, probe); the value is the last error's text, so the same
    failure tick after tick produces one line, and a different one a new line.
    At most ``lines_per_tick`` such lines a tick: when a thousand cells fail
    together (a stuck host, an overloaded tick) the rest are counted and
    summed up in one line (``end_tick``), so the log cannot become the load.
    """

    def __init__(self, lines_per_tick: int = 20) -> None:
        self._last: dict[tuple[str, str], str] = {}
        self.suppressed = 0
        self._lines_per_tick = lines_per_tick
        self._lines = 0
        self._held_failed: dict[str, int] = {}
        self._held_recovered: dict[str, int] = {}

    def start_tick(self) -> None:
        self._lines = 0
        self._held_failed.clear()
        self._held_recovered.clear()

    def end_tick(self) -> dict[str, dict[str, int]] | None:
        """What was not logged line by line this tick, by probe (None: nothing)."""
        if not self._held_failed and not self._held_recovered:
            return None
        return {"failed": dict(self._held_failed), "recovered": dict(self._held_recovered)}

    def _within_budget(self, held: dict[str, int], probe: str) -> bool:
        if self._lines < self._lines_per_tick:
            self._lines += 1
            return True
        held[probe] = held.get(probe, 0) + 1
        return False

    def failed(self, cell: str, probe: str, text: str) -> bool:
        """True when this failure should be logged."""
        key = (cell, probe)
        if self._last.get(key) == text:
            self.suppressed += 1
            return False
        self._last[key] = text
        return self._within_budget(self._held_failed, probe)

    def recovered(self, cell: str, probe: str) -> bool:
        """True when the probe had been failing (log its recovery once)."""
        if not self._last:  # nothing failing: the usual case, four thousand times a tick
            return False
        if self._last.pop((cell, probe), None) is None:
            return False
        return self._within_budget(self._held_recovered, probe)

    def forget_cell(self, cell: str) -> None:
        for key in [key for key in self._last if key[0] == cell]:
            del self._last[key]
