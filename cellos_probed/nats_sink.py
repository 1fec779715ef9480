"""The NATS event sink: our own bounded outbox, flushed to nats-py in batches.

``emit`` only serialises and queues; a single flusher task hands batches of
up to ``batch_size`` events across to the asyncio thread and removes them
once the server has confirmed the batch (a flush round trip). While no
server is reachable, events wait here, in order, within the outbox bounds;
what the bounds force out is declared by ``gap`` events.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import trio

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.config import BufferSettings, NatsSettings, SpoolSettings
from cellos_probed.nats_bridge import NatsPublisher, NatsUnavailable, PublishRefused, Violation
from cellos_probed.outbox import GapRange, Outbox, OutboxEntry
from cellos_probed.sinks import EventSink, SinkStatistics
from cellos_probed.spool import SpoolOutbox

log = structlog.get_logger("cellos_probed.nats_sink")

#: the gap reason of readings the server refused to take from this NATS user
PERMISSION_DENIED = "permission_denied"
REFUSED = "NATS refuses this host's events: check [daemon] host_id and the NATS user"


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
                result = await self._publisher.publish_batch(
                    [(e.subject, e.payload, e.msg_id) for e in batch]
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
                self._refuse([batch[index] for index in result.too_large])
            if result.refused:
                # core NATS: the server dropped them; counted and declared (a gap
                # event, on the same host's subjects, may well be refused too)
                self.outbox.reject([batch[index] for index in result.refused], PERMISSION_DENIED)
            self._note_violations(result.violations, batch)
            self.outbox.confirm(batch)
            self._counts.published += len(batch) - len(result.too_large) - len(result.refused)

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
