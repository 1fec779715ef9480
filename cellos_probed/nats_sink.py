"""The NATS event sink: our own bounded outbox, flushed to nats-py in batches.

``emit`` only serialises and queues; a single flusher task hands batches of
up to ``batch_size`` events across to the asyncio thread and removes them
once the server has confirmed the batch (a flush round trip). While no
server is reachable, events wait here, in order, within the outbox bounds;
what the bounds force out is declared by ``gap`` events.

With JetStream, a re-send of what was first sent more than half the stream's
duplicate window ago (or by an earlier run) asks the stream first for the last
message it holds on each subject, and leaves out what is there already: past
the window the stream no longer drops a repeated ``Nats-Msg-Id``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import orjson
import structlog
import trio

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.config import BufferSettings, NatsSettings, SpoolSettings
from cellos_probed.nats_bridge import (
    NatsPublisher,
    NatsUnavailable,
    PublishRefused,
    StoredMessage,
    Violation,
)
from cellos_probed.outbox import GapRange, Outbox, OutboxEntry
from cellos_probed.sinks import EventSink, SinkStatistics
from cellos_probed.spool import SpoolOutbox

log = structlog.get_logger("cellos_probed.nats_sink")

#: the gap reason of readings the server refused to take from this NATS user
PERMISSION_DENIED = "permission_denied"
REFUSED = "NATS refuses this host's events: check [daemon] host_id and the NATS user"
NO_DIRECT_GET = (
    "the JetStream stream does not allow direct gets: readings re-sent past its duplicate "
    "window may be stored twice (nats stream edit STREAM --allow-direct, then reload)"
)


def already_stored(
    batch: Sequence[OutboxEntry], last: Mapping[str, StoredMessage | None]
) -> list[bool]:
    """Which entries of ``batch`` the stream holds already, given the last message ``M``
    it stored on each subject of ``last`` (the other subjects are not judged).

    The stream stores what the daemon sends in the order sent, and the daemon sends
    from the front of its outbox, again until confirmed: so what comes before ``M``
    in ``batch`` on its subject was stored too, and so was a reading of ``M``'s boot
    and probe numbered at or below ``M``'s ``cellosseq`` (a memory outbox puts new gap
    events in front: ``M`` may have been pushed past the end of this batch).
    """
    upto: dict[str, int] = {}
    for index, entry in enumerate(batch):
        stored = last.get(entry.subject)
        if stored is not None and entry.msg_id == stored.msg_id:
            upto[entry.subject] = index
    held = []
    for index, entry in enumerate(batch):
        stored = last.get(entry.subject)
        held.append(
            stored is not None
            and (index <= upto.get(entry.subject, -1) or _numbered_up_to(entry, stored))
        )
    return held


def _numbered_up_to(entry: OutboxEntry, stored: StoredMessage) -> bool:
    if (
        entry.sequence is None
        or stored.sequence is None
        or entry.sequence > stored.sequence
        or entry.probe_source != stored.probe_source
    ):
        return False
    # the boot is in the payload only; this is read for few entries (those stored)
    return bool(orjson.loads(entry.payload).get("cellosagentboot") == stored.boot)


def _log_dropped(gaps: list[GapRange]) -> None:
    for gap in gaps:
        log.warning(
            "buffer full: dropping oldest readings",
            cell=gap.attribution["cellId"],
            probe=gap.probe_source,
            first_sequence=gap.first,
            reason=gap.reason,
        )


@dataclass(slots=True)
class _Counts:
    emitted: int = 0
    published: int = 0
    gaps: int = 0
    publish_failures: int = 0
    permission_violations: int = 0


class NatsSink(EventSink):
    def __init__(
        self,
        settings: NatsSettings,
        boot_id: str,
        *,
        buffer: BufferSettings | None = None,
        spool: SpoolSettings | None = None,
        host_id: str | None = None,
        batch_size: int = 500,
        retry_seconds: float = 0.25,
    ) -> None:
        """``host_id``: [daemon] host_id, which names the connection's reply inbox
        (``nats_bridge.host_inbox``) and the refusals logged."""
        self.settings = settings
        self.host_id = host_id
        self.outbox: Outbox | SpoolOutbox
        if spool is not None:
            self.outbox = SpoolOutbox(
                spool.path, settings.subject_prefix, boot_id, max_bytes=spool.max_bytes
            )
        else:
            buffer = buffer or BufferSettings()
            self.outbox = Outbox(
                settings.subject_prefix,
                boot_id,
                max_events=buffer.max_events,
                max_bytes=buffer.max_bytes,
            )
        self._counts = _Counts()
        self._batch_size = batch_size
        self._retry_seconds = retry_seconds
        self._publisher = NatsPublisher(settings, host_id=host_id)
        #: per subject: when the stream was asked, and the last message it held on it
        self._looked_up: dict[str, tuple[float, StoredMessage | None]] = {}
        self._no_direct_logged = False
        #: while the server refuses: its last refusal, the subjects refused
        #: (lowercased, as nats-py reports them) and the operations logged
        self._refusing: Violation | None = None
        self._refused: set[str] = set()
        self._logged: set[str] = set()
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._token: trio.lowlevel.TrioToken | None = None
        self._state_event = trio.Event()
        self._nursery: trio.Nursery | None = None

    @property
    def connected(self) -> bool:
        return self._publisher.state.connected

    def statistics(self) -> SinkStatistics:
        outbox = self.outbox
        counts = self._counts
        spooled = isinstance(outbox, SpoolOutbox)
        return SinkStatistics(
            emitted=counts.emitted,
            published=counts.published,
            acknowledged=counts.published if self.settings.jetstream is not None else 0,
            buffered=len(outbox),
            dropped=outbox.dropped,
            dropped_by_reason=tuple(sorted(outbox.dropped_by_reason.items())),
            gaps_declared=counts.gaps,
            spooled=len(outbox) if spooled else 0,
            spool_bytes=outbox.bytes if isinstance(outbox, SpoolOutbox) else 0,
            reconnects=self._publisher.state.reconnects,
            connected=self._publisher.state.connected,
            permission_violations=counts.permission_violations,
            refusing=None if self._refusing is None else str(self._refusing),
        )

    def emit_nowait(self, event: CloudEvent) -> None:
        """Queue ``event``; never waits (a full outbox drops the oldest, declared)."""
        _log_dropped(self.outbox.put(event))
        self._counts.emitted += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()

    async def wait_connected(self, connected: bool = True) -> None:
        """Wait until the connection is (or is not) up."""
        while self.connected != connected:
            await self._state_event.wait()

    def _state_changed(self, what: str) -> None:
        # called on the asyncio thread: hop to trio to log with our context
        token = self._token
        if token is None:
            return
        state = self._publisher.state

        def on_trio() -> None:
            log.info(f"nats {what}", server=state.server, reconnects=state.reconnects)
            self._state_event.set()
            self._state_event = trio.Event()

        try:
            token.run_sync_soon(on_trio)
        except trio.RunFinishedError:
            pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher. Runs until cancelled; call :meth:`drain` first to empty the outbox."""
        self._token = trio.lowlevel.current_trio_token()
        self._publisher.state.on_change = self._state_changed
        self._publisher.start()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._flush_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self._publisher.aclose()
            if isinstance(self.outbox, SpoolOutbox):
                self.outbox.close()

    def apply_settings(self, settings: NatsSettings) -> None:
        """Reconnect with new settings (a reload); the outbox and what it holds stay.

        A batch in flight on the old connection either completes there or is
        retried on the new one: nothing held is dropped.
        """
        old = self._publisher
        self.settings = settings
        self.outbox.subject_prefix = settings.subject_prefix
        self._publisher = NatsPublisher(settings, host_id=self.host_id)
        self._publisher.state.on_change = self._state_changed
        self._looked_up.clear()  # perhaps another stream
        self._stop_refusing()  # other credentials: a refusal now is news
        self._publisher.start()
        if self._nursery is not None:
            self._nursery.start_soon(old.aclose)
        self._wakeup.set()

    async def _flush_forever(self) -> None:
        failing = False
        while True:
            if not len(self.outbox) and not self.outbox.has_open_gaps():
                self._idle.set()
                await self._wakeup.wait()
                self._wakeup = trio.Event()
            for gap in self.outbox.seal_gaps():
                self._counts.gaps += 1
                if gap.reason == PERMISSION_DENIED:
                    continue  # the refusal is logged once, not a line per cell and tick
                log.warning(
                    "declaring dropped readings",
                    cell=gap.attribution["cellId"],
                    probe=gap.probe_source,
                    first_sequence=gap.first,
                    last_sequence=gap.last,
                    reason=gap.reason,
                )
            batch = self.outbox.batch(self._batch_size)
            if not batch:
                continue
            try:
                send = await self._not_stored(batch)
                result = await self._publisher.publish_batch(
                    [(e.subject, e.payload, e.msg_id) for e in send]
                )
            except NatsUnavailable as exc:
                if isinstance(exc, PublishRefused):
                    self._note_violations(exc.violations)
                self._counts.publish_failures += 1
                _log_dropped(self.outbox.batch_failed())
                if not failing:
                    log.warning("cannot publish yet; holding events", error=str(exc))
                    failing = True
                await trio.sleep(self._retry_seconds)
                continue
            if failing:
                log.info("publishing again", held=len(self.outbox))
                failing = False
            if result.too_large:
                self._refuse([send[index] for index in result.too_large])
            if result.refused:
                # core NATS: the server dropped them; counted and declared (a gap
                # event, on the same host's subjects, may well be refused too)
                self.outbox.reject([send[index] for index in result.refused], PERMISSION_DENIED)
            self._note_violations(result.violations, send)
            self.outbox.confirm(batch)  # what was left out is in the stream already
            self._counts.published += len(batch) - len(result.too_large) - len(result.refused)

    async def _not_stored(self, batch: list[OutboxEntry]) -> list[OutboxEntry]:
        """``batch`` less what the stream holds already (JetStream; see the module's doc).

        One look-up per subject, all at once, and only for re-sends: none while every
        publish is confirmed. A look-up younger than half the window still tells:
        what was sent on its subject since then is within the window.
        """
        jetstream = self.settings.jetstream
        if jetstream is None:
            return batch
        now = time.monotonic()
        oldest = now
        for entry in batch:
            if entry.first_sent is None:
                entry.first_sent = now
            else:
                oldest = min(oldest, entry.first_sent)
        if oldest == now:
            return batch  # a first send
        facts = await self._publisher.stream_facts(jetstream)
        # half: a re-send decided now reaches the server well within the window
        due = now - facts.duplicate_window / 2
        if oldest > due:
            return batch
        if not facts.allow_direct:
            if not self._no_direct_logged:
                log.error(NO_DIRECT_GET, stream=jetstream.stream)
                self._no_direct_logged = True
            return batch
        subjects = {e.subject for e in batch if e.first_sent is not None and e.first_sent <= due}

        def known(subject: str) -> bool:
            looked_up = self._looked_up.get(subject)
            return looked_up is not None and looked_up[0] > due

        missing = [subject for subject in subjects if not known(subject)]
        if missing:
            # what was asked more than half a window ago tells nothing any more
            self._looked_up = {s: item for s, item in self._looked_up.items() if item[0] > due}
            asked = time.monotonic()
            found = await self._publisher.last_stored(jetstream, missing)
            self._looked_up.update((subject, (asked, found[subject])) for subject in missing)
        held = already_stored(batch, {subject: self._looked_up[subject][1] for subject in subjects})
        if not any(held):
            return batch
        log.info("already in the stream: not sent again", records=sum(held), looked_up=len(missing))
        return [entry for entry, stored in zip(batch, held, strict=True) if not stored]

    def _note_violations(
        self, violations: list[Violation], delivered: list[OutboxEntry] | None = None
    ) -> None:
        """Count the server's refusals and log each kind once, until it takes this
        host's events again (``delivered``: a batch it confirmed)."""
        if violations:
            self._counts.permission_violations += len(violations)
            self._refused.update(item.subject.lower() for item in violations)
            self._refusing = violations[-1]
            new: dict[str, Violation] = {}
            for item in violations:
                if item.operation not in self._logged:
                    new.setdefault(item.operation, item)
            if new:
                self._logged.update(new)
                if "subscription" in new:
                    # nats-py keeps a refused subscription as if it stood: only a
                    # new connection asks for it again
                    events = "held; once fixed, restart the daemon"
                elif self.settings.jetstream is not None:
                    events = "held and retried"
                else:
                    events = "dropped, counted and declared"
                log.error(
                    REFUSED,
                    host=self.host_id,
                    refused="; ".join(str(item) for item in new.values()),
                    events=events,
                )
            return
        if self._refusing is None or delivered is None:
            return
        # taken again: a JetStream batch was acknowledged whole, or core NATS
        # took a subject it had refused (not merely others it never refused)
        if self.settings.jetstream is not None or any(
            entry.subject.lower() in self._refused for entry in delivered
        ):
            log.info(
                "NATS takes this host's events again",
                permission_violations=self._counts.permission_violations,
            )
            self._stop_refusing()

    def _stop_refusing(self) -> None:
        self._refusing = None
        self._refused.clear()
        self._logged.clear()

    def _refuse(self, entries: list[OutboxEntry]) -> None:
        """Events the server will never take (over its max_payload): declared, not retried.

        Retrying would hold every later event behind them for good; a reading
        dropped here is declared by a ``gap`` event (reason ``too_large``).
        """
        for entry in entries:
            log.error(
                "event larger than the NATS server accepts: dropped and declared as a gap",
                subject=entry.subject,
                sequence=entry.sequence,
                bytes=len(entry.payload),
            )
        self.outbox.reject(entries, "too_large")

    async def drain(self, timeout: float) -> bool:
        """Wait until everything queued is published, at most ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            while len(self.outbox) or self.outbox.has_open_gaps():
                self._wakeup.set()
                await self._idle.wait()
            return True
        log.warning("drain timed out; events left unpublished", held=len(self.outbox))
        return False
