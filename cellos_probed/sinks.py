"""Where finished events go: the sink interface, and the sinks that need no network.

A sink takes each event without waiting (:meth:`EventSink.emit_nowait`:
the daemon hands a tick's thousands of events over without a coroutine
each) and reports its figures as one frozen :class:`SinkStatistics`. The
NATS sink (``nats_sink.NatsSink``) is the daemon's; the others serve
``once``, the demo and tests.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TextIO

import trio

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.config import NatsSettings


@dataclass(frozen=True, slots=True)
class SinkStatistics:
    """A sink's figures at one moment (``agent`` events, ``STATUS=``).

    ``connected`` is ``None`` for a sink with no connection to lose (stdout,
    a list); the delivery figures are then zero.
    """

    emitted: int = 0
    published: int = 0
    #: published with a JetStream acknowledgement (0 in core NATS mode)
    acknowledged: int = 0
    buffered: int = 0
    dropped: int = 0
    #: ``dropped`` by the reason its gap event gives (``buffer_full``, ``spool_full``,
    #: ``too_large``, ``permission_denied``): (reason, count) pairs in reason order
    dropped_by_reason: tuple[tuple[str, int], ...] = ()
    gaps_declared: int = 0
    spooled: int = 0
    spool_bytes: int = 0
    reconnects: int = 0
    connected: bool | None = None
    #: publishes and subscriptions the server refused for the NATS user's permissions
    #: (a held JetStream event counts at each attempt)
    permission_violations: int = 0
    #: while the server refuses: its last refusal, e.g. ``publish to "<subject>"``
    refusing: str | None = None


class EventSink(ABC):
    """What the daemon needs of a sink. Only :meth:`emit_nowait` must be written;
    every other hook has a default that suits a sink with nothing to deliver."""

    @abstractmethod
    def emit_nowait(self, event: CloudEvent) -> None:
        """Take ``event``; never waits (a bounded sink drops the oldest, declared)."""

    async def emit(self, event: CloudEvent) -> None:
        """:meth:`emit_nowait`, for callers that are coroutines already (the seed's API)."""
        self.emit_nowait(event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled. Default: nothing to deliver in the background."""
        task_status.started()

    async def drain(self, timeout: float) -> bool:
        """Deliver what is held, for at most ``timeout`` seconds; True if all went.
        Default: nothing is held."""
        return True

    def apply_settings(self, settings: NatsSettings) -> None:  # noqa: B027
        """A reload changed ``[nats]``. Default: the sink has no connection to change."""

    def statistics(self) -> SinkStatistics:
        """The sink's figures now. Default: a sink that delivers at once and never drops."""
        return SinkStatistics()


@dataclass(slots=True, eq=False)
class CapturingSink(EventSink):
    """Records every event emitted through it, in order (tests, the demo)."""

    events: list[CloudEvent] = field(default_factory=list)

    def emit_nowait(self, event: CloudEvent) -> None:
        self.events.append(event)

    def snapshot(self) -> list[CloudEvent]:
        return list(self.events)

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(emitted=len(self.events))


class StdoutSink(EventSink):
    """Events as JSON lines on stdout: the ``once`` command's sink."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout
        self._emitted = 0

    def emit_nowait(self, event: CloudEvent) -> None:
        # one short write per event; `once` prints a handful of lines and exits
        self._stream.write(event.to_json().decode() + "\n")
        self._stream.flush()
        self._emitted += 1

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(emitted=self._emitted)
