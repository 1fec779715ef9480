"""The bounded buffer between the probes and the network, with declared loss.

Readings wait here, already serialised (so a retry re-sends the same
bytes), until the publisher confirms them. When a bound (events or bytes)
is hit the oldest go, and per (cell, probe) the dropped ``sequence`` range
is kept until a ``gap`` event declaring it has been published. Gap events
are never themselves dropped: there is at most one open range per
(cell, probe), so they are bounded by the number of cells.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.events import gap_event


@dataclass(slots=True)
class OutboxEntry:
    serial: int
    subject: str
    payload: bytes
    #: the event id, sent as Nats-Msg-Id so JetStream stores a retry once
    msg_id: str
    # for gap accounting; None for events without a sequence (gap, agent)
    sequence: int | None
    probe_source: str | None
    attribution: dict[str, Any] | None
    #: monotonic time of its first publish attempt (None: never sent; -inf: maybe
    #: sent by an earlier run): past the duplicate window a re-send is looked up
    first_sent: float | None = None


_ATTRIBUTION_KEYS = ("cellId", "hostId", "runId", "specSignatureHash")


def entry_for(event: CloudEvent, subject_prefix: str, serial: int) -> OutboxEntry:
    """``event`` as the outbox holds it: subject, JSON, and what its gap accounting needs."""
    subject = event.nats_subject(subject_prefix)
    if event.cellosseq is None:  # gap and agent events: counted in no sequence
        return OutboxEntry(serial, subject, event.to_json(), event.id, None, None, None)
    data = event.data
    attribution = event.attribution  # shared by its maker, or taken from the data
    return OutboxEntry(
        serial,
        subject,
        event.to_json(),
        event.id,
        event.cellosseq,
        data.get("probeSource"),
        {key: data[key] for key in _ATTRIBUTION_KEYS} if attribution is None else attribution,
    )


@dataclass(slots=True)
class GapRange:
    attribution: dict[str, Any]
    probe_source: str
    first: int
    last: int
    reason: str
    #: the boot the dropped readings belong to ("" = this one)
    boot_id: str = ""


class GapTracker:
    """Dropped sequences per (boot, cell, probe), kept as contiguous ranges until sealed.

    Oldest-first dropping makes each key's drops contiguous; a drop that is
    not (an earlier range was already sealed and published, say) seals the
    open range and starts a new one.
    """

    def __init__(self, seal: Callable[[GapRange], None]) -> None:
        self._open: dict[tuple[str, str, str], GapRange] = {}
        self._seal = seal
        #: every drop, by the reason its gap event gives (the Prometheus metrics)
        self.dropped_by_reason: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._open)

    def drop(self, entry: OutboxEntry, reason: str, boot_id: str = "") -> GapRange | None:
        """Record ``entry`` as dropped; the new range if one was opened."""
        self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + 1
        if entry.sequence is None or entry.attribution is None or entry.probe_source is None:
            return None  # an agent event: the daemon's own figures, superseded by the next
        key = (boot_id, entry.attribution["cellId"], entry.probe_source)
        gap = self._open.get(key)
        if gap is not None and gap.last + 1 == entry.sequence:
            gap.last = entry.sequence
            return None
        if gap is not None:
            self._seal(self._open.pop(key))
        gap = GapRange(
            entry.attribution, entry.probe_source, entry.sequence, entry.sequence, reason, boot_id
        )
        self._open[key] = gap
        return gap

    def seal_all(self) -> list[GapRange]:
        sealed = list(self._open.values())
        self._open.clear()
        for gap in sealed:
            self._seal(gap)
        return sealed


class Outbox:
    def __init__(
        self, subject_prefix: str, boot_id: str, *, max_events: int, max_bytes: int
    ) -> None:
        self.subject_prefix = subject_prefix
        self.boot_id = boot_id
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._entries: deque[OutboxEntry] = deque()
        self._bytes = 0
        self._serials = itertools.count(1)
        self._gaps = GapTracker(self._seal)
        self._sealed: deque[OutboxEntry] = deque()
        #: the last serial of the batch being published (0: none). An entry of it
        #: pushed out meanwhile may still arrive: its drop waits for the outcome
        self._in_flight_last = 0
        self._held: list[OutboxEntry] = []
        self.accepted = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._sealed)

    @property
    def dropped(self) -> int:
        return sum(self._gaps.dropped_by_reason.values())

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        return self._gaps.dropped_by_reason

    @property
    def bytes(self) -> int:
        return self._bytes

    def has_open_gaps(self) -> bool:
        return bool(self._gaps)

    def put(self, event: CloudEvent) -> list[GapRange]:
        """Queue ``event``; returns the ranges newly dropped to make room."""
        entry = entry_for(event, self.subject_prefix, next(self._serials))
        self._entries.append(entry)
        self._bytes += len(entry.payload)
        self.accepted += 1
        dropped: list[GapRange] = []
        if len(self._entries) <= self.max_events and self._bytes <= self.max_bytes:
            return dropped
        while self._entries and (
            len(self._entries) > self.max_events or self._bytes > self.max_bytes
        ):
            victim = self._entries.popleft()
            self._bytes -= len(victim.payload)
            if victim.serial <= self._in_flight_last:
                self._held.append(victim)  # being published: lost only if the batch fails
                continue
            gap = self._gaps.drop(victim, "buffer_full")
            if gap is not None:
                dropped.append(gap)
        return dropped

    def batch_failed(self) -> list[GapRange]:
        """The batch in flight was not confirmed: what was pushed out of it is lost."""
        held, self._held = self._held, []
        self._in_flight_last = 0
        lost: list[GapRange] = []
        for victim in held:
            gap = self._gaps.drop(victim, "buffer_full")
            if gap is not None:
                lost.append(gap)
        return lost

    def reject(self, entries: list[OutboxEntry], reason: str) -> None:
        """Count ``entries`` (of a batch about to be confirmed) as dropped for ``reason``."""
        for entry in entries:
            self._gaps.drop(entry, reason)

    def seal_gaps(self) -> list[GapRange]:
        """Turn every open range into a ``gap`` event queued ahead of readings."""
        return self._gaps.seal_all()

    def _seal(self, gap: GapRange) -> None:
        event = gap_event(
            gap.attribution,
            gap.probe_source,
            gap.first,
            gap.last,
            gap.reason,
            gap.boot_id or self.boot_id,
        )
        self._sealed.append(entry_for(event, self.subject_prefix, 0))

    def batch(self, limit: int) -> list[OutboxEntry]:
        """The next entries to publish, gap events first; they stay until :meth:`confirm`."""
        out = list(itertools.islice(self._sealed, limit))
        out.extend(itertools.islice(self._entries, max(0, limit - len(out))))
        self._in_flight_last = max((entry.serial for entry in out), default=0)
        return out

    def confirm(self, batch: list[OutboxEntry]) -> None:
        """Remove what ``batch`` published (entries dropped meanwhile are already gone)."""
        gaps = sum(1 for entry in batch if entry.serial == 0)
        for _ in range(min(gaps, len(self._sealed))):
            self._sealed.popleft()
        last = max((entry.serial for entry in batch if entry.serial), default=0)
        while self._entries and self._entries[0].serial <= last:
            self._bytes -= len(self._entries.popleft().payload)
        # what was pushed out of the batch while it was in flight arrived after all
        self._held.clear()
        self._in_flight_last = 0
