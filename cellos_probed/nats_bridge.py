"""The one module that knows nats-py runs on asyncio.

nats-py lives on its own event loop in a dedicated thread. Trio hands it
whole batches (one cross-loop call per batch, never per event: a call
costs ~100 us, most of a core at thousands of events a second) and waits
for the result through a trio token callback, so no trio worker thread is
tied up waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import random
import re
import ssl
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import nats
import orjson
import structlog
import trio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cellos_probed.cloudevent import NATS_HEADERS, STRUCTURED_CONTENT_TYPE
from cellos_probed.config import JetStreamSettings, NatsSettings

T = TypeVar("T")
STREAM_READ_ATTEMPTS = 5
#: a stopped subscription's drain: one round trip to the server, then the
#: messages already received; bounded for a server that went away
DRAIN_SECONDS: Final = 2.0
#: Every event's NATS header block, made once: status line, Content-Type, blank line.
EVENT_HEADER_BLOCK: Final = f"NATS/1.0\r\nContent-Type: {STRUCTURED_CONTENT_TYPE}\r\n\r\n".encode()
_HEADER_LEN: Final = len(EVENT_HEADER_BLOCK)
log = structlog.get_logger("cellos_probed.nats")


def hpub_frame(subject: str, payload: bytes) -> bytes:
    """One event as the protocol's ``HPUB`` frame, the header block included.

    ``subject`` is ours (a validated prefix and subject tokens), so unlike
    ``nc.publish`` nothing is re-validated per message.
    """
    return b"HPUB %b %d %d\r\n%b%b\r\n" % (
        subject.encode(),
        _HEADER_LEN,
        _HEADER_LEN + len(payload),
        EVENT_HEADER_BLOCK,
        payload,
    )


#: A payload at least this big (a Firecracker event is ~14 KB) is queued as it
#: is, between its frame's head and tail, not copied into one frame: asyncio's
#: ``writelines`` joins the queue anyway. Smaller ones are one piece: three
#: queue calls cost more than the copy (docs/performance.md, "Publishing to NATS").
FRAME_SPLIT_BYTES: Final = 4096


def hpub_pieces(subject: str, payload: bytes) -> tuple[bytes, ...]:
    """:func:`hpub_frame`'s bytes in the pieces to queue: a big ``payload`` is not copied."""
    if len(payload) < FRAME_SPLIT_BYTES:
        return (hpub_frame(subject, payload),)
    head = b"HPUB %b %d %d\r\n%b" % (
        subject.encode(),
        _HEADER_LEN,
        _HEADER_LEN + len(payload),
        EVENT_HEADER_BLOCK,
    )
    return (head, payload, b"\r\n")


#: nats-py's own write queue, fed ready-made frames: ``nc.publish``'s checks and
#: formatting per message were a tenth of the daemon's CPU (docs/performance.md).
#: It is a private method: if a nats-py release drops it, the public
#: per-message path is used instead.
_queue_frames: Callable[[NatsClient, bytes], Coroutine[Any, Any, None]] | None = getattr(
    NatsClient, "_send_command", None
)


class NatsUnavailable(Exception):
    """Publishing failed because no server is reachable right now."""


#: the server's words for what the user's permissions refuse; nats-py hands
#: them to the error callback lowercased, the connection stays up
_VIOLATION: Final = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"')


@dataclass(frozen=True, slots=True)
class Violation:
    """A publish or a subscription the server refused for the NATS user's permissions."""

    operation: str  # "publish" or "subscription"
    #: as we sent it where we know it (an event's subject), else as nats-py reported it
    subject: str

    def __str__(self) -> str:
        return f'{self.operation} to "{self.subject}"'


class PublishRefused(NatsUnavailable):
    """A JetStream batch failed and the server refused some of it for the user's permissions."""

    def __init__(self, message: str, violations: list[Violation]) -> None:
        super().__init__(message)
        self.violations = violations


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What became of a published batch (the other events were confirmed)."""

    #: indices of events larger than the server accepts: not sent
    too_large: list[int]
    #: indices of events the server refused to take from this user (core NATS): not delivered
    refused: list[int]
    #: every permission violation the server reported since the previous batch
    violations: list[Violation]


@dataclass(frozen=True, slots=True)
class StreamFacts:
    """What re-sending needs to know of the JetStream stream."""

    #: seconds within which the stream drops a repeated ``Nats-Msg-Id``
    duplicate_window: float
    #: whether its servers answer direct gets (the last message on a subject)
    allow_direct: bool


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """The last message a stream holds on a subject, as far as re-sending needs it
    (``None``: not there, as in a message that is not one of ours)."""

    msg_id: str | None
    boot: str | None
    probe_source: str | None
    sequence: int | None


def stored_message(headers: Mapping[str, str] | None, data: bytes | None) -> StoredMessage:
    """A stored event's ``Nats-Msg-Id``, ``cellosagentboot``, ``data.probeSource`` and
    ``cellosseq``."""
    try:
        event = orjson.loads(data or b"")
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        event = {}
    body = event.get("data")
    probe = body.get("probeSource") if isinstance(body, dict) else None
    boot, sequence = event.get("cellosagentboot"), event.get("cellosseq")
    return StoredMessage(
        (headers or {}).get("Nats-Msg-Id"),
        boot if isinstance(boot, str) else None,
        probe if isinstance(probe, str) else None,
        sequence if isinstance(sequence, int) and not isinstance(sequence, bool) else None,
    )


def host_inbox(host_id: str) -> str:
    """The reply-subject prefix of ``host_id``'s daemon: one NATS user per host may be
    allowed to subscribe to its own (config/nats-authorization.example.conf)."""
    return f"_INBOX.cellos-probed.{host_id}"


class AsyncioThread:
    """An asyncio event loop running in a thread of its own."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the loop and wait for the thread (blocking; call from a worker thread)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)


async def wait_future(future: concurrent.futures.Future[T]) -> T:
    """Await a future completed in another thread, without a trio worker thread."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: concurrent.futures.Future[T]) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    future.add_done_callback(wake)
    try:
        await done.wait()
    except trio.Cancelled:
        future.cancel()
        raise
    return future.result()


@dataclass
class ConnectionState:
    """Written by the asyncio thread, read by trio (single attribute writes)."""

    connected: bool = False
    server: str | None = None
    reconnects: int = 0
    last_error: str | None = None
    published: int = 0
    on_change: Callable[[str], None] = field(default=lambda _: None)


def backoff_with_jitter(
    servers: list[Any], _info: dict[str, Any], *, base: float = 0.25, cap: float = 10.0
) -> tuple[Any, float]:
    """nats-py's reconnect hook: the least-tried server, after an exponential, jittered wait.

    Jitter keeps a fleet of hosts from reconnecting to a restarted server in
    lock step; the cap keeps a long outage's retries a few seconds apart.
    """
    fewest = min(server.reconnects for server in servers)
    candidates = [server for server in servers if server.reconnects == fewest]
    chosen = random.choice(candidates)
    delay = min(cap, base * 2 ** min(fewest, 8)) if fewest else 0.0
    return chosen, delay * random.uniform(0.5, 1.0)


def connect_options(settings: NatsSettings) -> dict[str, Any]:
    """nats.connect keyword arguments for ``settings`` (auth and TLS included)."""
    options: dict[str, Any] = {
        "servers": list(settings.servers),
        "name": settings.name,
        "allow_reconnect": True,
        # forever: nats-py drops its whole pending buffer when it gives up,
        # and our own outbox upstream holds what matters
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 1.0,
        "reconnect_to_server_handler": backoff_with_jitter,
        "connect_timeout": 2.0,
        # notice a half-open connection in ~40 s, not the default 6 minutes
        "ping_interval": 10,
        "max_outstanding_pings": 3,
        "pending_size": 8 * 1024 * 1024,
    }
    if settings.credentials:
        options["user_credentials"] = settings.credentials
    if settings.nkey_seed:
        options["nkeys_seed"] = settings.nkey_seed
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password
    if settings.token:
        options["token"] = settings.token
    if (
        settings.tls_ca
        or settings.tls_cert
        or any(s.startswith("tls://") for s in settings.servers)
    ):
        context = ssl.create_default_context(cafile=settings.tls_ca)
        if settings.tls_cert and settings.tls_key:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
        options["tls"] = context
    return options


class NatsPublisher:
    """A nats-py connection owned by an asyncio thread, fed batches from trio.

    Core mode publishes and confirms a batch with flush round trips
    (at-most-once past a crash, at-least-once across reconnects); what the
    server refused for the user's permissions is named, not confirmed. JetStream
    mode waits for every PubAck, with ``Nats-Msg-Id`` set to the event id, so
    a retried batch (same bytes, same ids) is stored once within the
    stream's duplicate window; past it, :meth:`last_stored` tells what the
    stream holds already.
    """

    def __init__(
        self, settings: NatsSettings, *, host_id: str | None = None, flush_timeout: int = 5
    ) -> None:
        self.settings = settings
        #: JetStream acknowledgements and API replies come under it (nats-py's
        #: default, ``_INBOX``, without a host)
        self.inbox_prefix = None if host_id is None else host_inbox(host_id)
        self._flush_timeout = flush_timeout
        #: what the server refused since the last batch took them (asyncio side)
        self._violations: list[Violation] = []
        self._thread = AsyncioThread("cellos-nats")
        self._nc: NatsClient | None = None
        self._js: Any = None
        #: the stream's, asked once (and the stream created, with ``create_stream``)
        self._facts: StreamFacts | None = None
        self._connected: asyncio.Event | None = None
        self._connect_task: concurrent.futures.Future[None] | None = None
        self.state = ConnectionState()

    # --- asyncio side -------------------------------------------------------
    async def _connect(self) -> None:
        self._connected = asyncio.Event()
        connected = self._connected

        async def disconnected() -> None:
            connected.clear()
            self.state.connected = False
            self.state.on_change("disconnected")

        async def reconnected() -> None:
            self.state.reconnects += 1
            self._mark_connected(connected)
            self.state.on_change("reconnected")

        async def error(exc: Exception) -> None:
            # nats-py reads the server's -ERRs in order, so a batch's are all
            # in once a round trip sent after it is answered
            violation = _VIOLATION.search(str(exc))
            if violation is not None:
                self._violations.append(Violation(violation[1], violation[2]))
                return
            self.state.last_error = f"{type(exc).__name__}: {exc}"

        options = connect_options(self.settings)
        if self.inbox_prefix is not None:
            options["inbox_prefix"] = self.inbox_prefix
        self._nc = await nats.connect(
            **options,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        jetstream = self.settings.jetstream
        if jetstream is not None:
            # every JetStream call goes through this context: with a domain, the
            # stream's API is $JS.<domain>.API (a leaf node's JetStream), wherever
            # in the leaf-connected system this connection landed
            self._js = self._nc.jetstream(
                timeout=jetstream.ack_timeout_seconds, domain=jetstream.domain
            )
        self._mark_connected(connected)
        self.state.on_change("connected")

    def _mark_connected(self, connected: asyncio.Event) -> None:
        nc = self._nc
        self.state.server = (
            None
            if nc is None or nc.connected_url is None
            else (f"{nc.connected_url.hostname}:{nc.connected_url.port}")
        )
        self.state.connected = True
        connected.set()

    def _connection(self) -> NatsClient:
        connected = self._connected
        if connected is None or self._nc is None or not connected.is_set():
            raise NatsUnavailable("not connected to any NATS server")
        return self._nc

    async def _publish_batch(self, batch: Sequence[tuple[str, bytes, str]]) -> BatchResult:
        nc = self._connection()
        jetstream = self.settings.jetstream
        # The server closes a connection that sends more than its max_payload
        # (headers included): such an event is never sent, its index returned.
        limit = nc.max_payload
        too_large = [
            index
            for index, (_, payload, msg_id) in enumerate(batch)
            if _HEADER_LEN + len(payload) + (0 if jetstream is None else len(msg_id) + 15) > limit
        ]
        sent = batch
        if too_large:
            skip = set(too_large)
            sent = [item for index, item in enumerate(batch) if index not in skip]
        if jetstream is not None:
            try:
                await self._publish_jetstream(sent, jetstream)
            except Exception as exc:
                violations = self._take_violations(batch)
                if violations:  # why no acknowledgement came
                    raise PublishRefused(f"{type(exc).__name__}: {exc}", violations) from None
                raise
            violations = self._take_violations(batch)
            refused: list[int] = []
        else:
            if _queue_frames is not None:
                for subject, payload, _ in sent:
                    # one by one: nats-py joins its queue into one write anyway, and a
                    # joined batch here (megabytes, a fresh mapping each) was a second copy
                    for piece in hpub_pieces(subject, payload):
                        await _queue_frames(nc, piece)
            else:
                for subject, payload, _ in sent:
                    await nc.publish(subject, payload, headers=NATS_HEADERS)
            # nats-py writes a flush's PING straight to the socket, ahead of the
            # frames its flusher task has not written yet (that task runs while
            # the first PONG is awaited): the second round trip is the one the
            # server answers after processing the batch, and after any -ERR for it.
            await nc.flush(timeout=self._flush_timeout)
            await nc.flush(timeout=self._flush_timeout)
            violations = self._take_violations(batch)
            refused = _refused_indices(batch, violations, set(too_large))
        self.state.published += len(sent) - len(refused)
        return BatchResult(too_large, refused, violations)

    def _take_violations(self, batch: Sequence[tuple[str, bytes, str]]) -> list[Violation]:
        """The violations reported since the last call, with the batch's subjects as sent."""
        violations, self._violations = self._violations, []
        if not violations:
            return violations
        as_sent = {subject.lower(): subject for subject, _, _ in batch}
        return [
            Violation(item.operation, as_sent.get(item.subject, item.subject))
            for item in violations
        ]

    async def _ensure_stream(self, jetstream: JetStreamSettings) -> None:
        if jetstream.create_stream:
            await self._stream_facts(jetstream)

    async def _stream_facts(self, jetstream: JetStreamSettings) -> StreamFacts:
        if self._facts is not None:
            return self._facts
        self._connection()
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        try:
            info = await self._js.stream_info(jetstream.stream)
        except NotFoundError:
            if not jetstream.create_stream:
                raise
            info = await self._js.add_stream(
                StreamConfig(
                    name=jetstream.stream,
                    subjects=list(jetstream.subjects),
                    storage=StorageType.FILE,
                    num_replicas=jetstream.replicas,
                    duplicate_window=jetstream.duplicate_window_seconds,
                    # the look-up of what was stored before re-sending past the window
                    allow_direct=True,
                )
            )
            log.info("created JetStream stream", stream=jetstream.stream)
        self._facts = StreamFacts(
            float(info.config.duplicate_window), bool(info.config.allow_direct)
        )
        return self._facts

    async def _last_stored(
        self, jetstream: JetStreamSettings, subjects: Sequence[str]
    ) -> dict[str, StoredMessage | None]:
        self._connection()
        from nats.js.errors import NotFoundError

        async def last(subject: str) -> StoredMessage | None:
            try:
                # $JS.API.DIRECT.GET.<stream>.<subject>: any server holding the stream answers
                msg = await self._js.get_last_msg(jetstream.stream, subject, direct=True)
            except NotFoundError:
                return None
            return stored_message(msg.headers, msg.data)

        # all at once: one round trip's wait for the lot, each bounded by the API timeout
        found = await asyncio.gather(
            *(last(subject) for subject in subjects), return_exceptions=True
        )
        failed = next((item for item in found if isinstance(item, BaseException)), None)
        if failed is not None:
            violations = self._take_violations(())
            if violations:
                raise PublishRefused(f"{type(failed).__name__}: {failed}", violations) from None
            raise failed
        return {
            subject: item
            for subject, item in zip(subjects, found, strict=True)
            if not isinstance(item, BaseException)
        }

    async def _publish_jetstream(
        self, batch: Sequence[tuple[str, bytes, str]], jetstream: JetStreamSettings
    ) -> None:
        await self._ensure_stream(jetstream)
        pending = [
            await self._js.publish_async(
                subject,
                payload,
                headers={"Content-Type": STRUCTURED_CONTENT_TYPE, "Nats-Msg-Id": msg_id},
            )
            for subject, payload, msg_id in batch
        ]
        # every PubAck, or the whole batch is retried (same ids: no duplicates)
        await asyncio.wait_for(
            asyncio.gather(*pending), timeout=jetstream.ack_timeout_seconds + 1.0
        )

    async def _close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.close(), timeout=2.0)
            except Exception as exc:  # closing a broken connection may fail; nothing is lost here
                log.debug("nats close failed", error=repr(exc))

    # --- trio side ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._connect_task = self._thread.submit(self._connect())

    async def publish_batch(self, batch: Sequence[tuple[str, bytes, str]]) -> BatchResult:
        """Publish ``(subject, payload, event id)`` items; raises unless all were confirmed.

        Items larger than the server accepts are not sent (sending one would
        cost the connection); in core NATS, items the server refused for the
        user's permissions were not delivered: the result names both. With
        JetStream a refusal fails the batch (:class:`PublishRefused`).
        """
        return await self._on_loop(self._publish_batch(list(batch)))

    async def stream_facts(self, jetstream: JetStreamSettings) -> StreamFacts:
        """The stream's duplicate window and direct-get setting (asked once)."""
        return await self._on_loop(self._stream_facts(jetstream))

    async def last_stored(
        self, jetstream: JetStreamSettings, subjects: Sequence[str]
    ) -> dict[str, StoredMessage | None]:
        """The last message the stream holds on each of ``subjects`` (``None``: none),
        asked all at once; a refusal for the user's permissions is :class:`PublishRefused`."""
        return await self._on_loop(self._last_stored(jetstream, list(subjects)))

    async def _on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        """``work`` on the asyncio thread; every failure is :class:`NatsUnavailable`."""
        try:
            return await wait_future(self._thread.submit(work))
        except NatsUnavailable:
            raise
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            raise NatsUnavailable("cancelled") from None
        except Exception as exc:
            raise NatsUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        if self._connect_task is not None:
            self._connect_task.cancel()
        with trio.move_on_after(3):
            try:
                await wait_future(self._thread.submit(self._close()))
            except Exception as exc:
                log.debug("nats close failed", error=repr(exc))
        await trio.to_thread.run_sync(self._thread.stop)


def _refused_indices(
    batch: Sequence[tuple[str, bytes, str]], violations: list[Violation], unsent: set[int]
) -> list[int]:
    """The items of ``batch`` the server refused: one per publish violation of their
    subject (compared lowercased, as nats-py reports it)."""
    left = Counter(item.subject.lower() for item in violations if item.operation == "publish")
    refused = []
    if left:
        for index, (subject, _, _) in enumerate(batch):
            key = subject.lower()
            if left[key] > 0 and index not in unsent:
                left[key] -= 1
                refused.append(index)
    return refused


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    subject: str
    headers: dict[str, str]
    data: bytes
    #: the message's sequence in its JetStream stream (stream reads only)
    stream_sequence: int | None = None


@asynccontextmanager
async def open_subscription(
    servers: Sequence[str],
    subject: str,
    *,
    connect_timeout: float = 5.0,
    settings: NatsSettings | None = None,
    stream: str | None = None,
    stop: trio.Event | None = None,
) -> AsyncIterator[trio.MemoryReceiveChannel[ReceivedMessage]]:
    """Subscribe to ``subject``; messages arrive on the yielded trio channel.

    The subscription is registered with the server (flushed) before this
    yields, so a publish that starts afterwards is seen. With ``stream``,
    read that JetStream stream from its first message instead (an ordered
    consumer); the channel closes after the message that was last when
    reading began. Once ``stop`` is set, interest ends but what the server
    had sent until then still arrives, then the channel closes: a reader
    stopped by its operator counts everything published before the stop.
    """
    thread = AsyncioThread("cellos-nats-sub")
    thread.start()
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[ReceivedMessage](math.inf)
    holder: dict[str, NatsClient] = {}
    subscriptions: list[Subscription] = []

    last_sequence = [0]

    def forward(item: ReceivedMessage | None) -> None:
        if item is None:
            send.close()
            return
        try:
            send.send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # the subscriber is gone (its channel closed, or the context left while
            # messages were still arriving): the rest are nobody's
            pass

    def hand_over(item: ReceivedMessage | None) -> None:
        try:
            token.run_sync_soon(forward, item)
        except trio.RunFinishedError:
            pass

    async def deliver(msg: Msg) -> None:
        sequence = None
        if stream is not None:
            sequence = msg.metadata.sequence.stream
        hand_over(ReceivedMessage(msg.subject, dict(msg.headers or {}), msg.data, sequence))
        if sequence is not None and sequence >= last_sequence[0]:
            hand_over(None)

    async def setup() -> None:
        base = settings or NatsSettings(servers=tuple(servers))
        options = connect_options(base)
        options.update(
            servers=list(servers),
            name="cellos-probed-tail",
            connect_timeout=connect_timeout,
        )
        nc = await nats.connect(**options)
        holder["nc"] = nc
        if stream is None:
            subscriptions.append(
                await nc.subscribe(subject, cb=deliver, pending_msgs_limit=1_000_000)
            )
            await nc.flush()
            return
        js = nc.jetstream()
        # a clustered stream that just lost a node answers again once it has
        # elected a new leader: retry for a while rather than fail the read
        for attempt in range(STREAM_READ_ATTEMPTS):
            try:
                info = await js.stream_info(stream)
                last_sequence[0] = info.state.last_seq
                if info.state.messages == 0:
                    hand_over(None)
                    return
                subjects = info.config.subjects or [subject]
                subscriptions.append(
                    await js.subscribe(
                        subjects[0] if len(subjects) == 1 else subject,
                        stream=stream,
                        ordered_consumer=True,
                        cb=deliver,
                        pending_msgs_limit=1_000_000,
                    )
                )
                return
            except nats.errors.TimeoutError:
                if attempt == STREAM_READ_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(1.0)

    async def drain() -> None:
        # nats-py's drain: UNSUB, a round trip (the server sends all it had
        # before its PONG), then every message received goes through deliver
        try:
            for subscription in subscriptions:
                draining = subscription.drain()  # type: ignore[no-untyped-call]  # nats-py
                await asyncio.wait_for(draining, timeout=DRAIN_SECONDS)
        finally:
            hand_over(None)

    async def drain_once_stopped(stop: trio.Event) -> None:
        await stop.wait()
        try:
            await wait_future(thread.submit(drain()))
        except Exception as exc:  # the channel is closed all the same
            log.debug("nats subscription drain failed", error=repr(exc))

    async def teardown() -> None:
        nc = holder.get("nc")
        if nc is not None:
            await asyncio.wait_for(nc.close(), timeout=2.0)

    try:
        with trio.fail_after(connect_timeout + 1 + (STREAM_READ_ATTEMPTS * 6 if stream else 0)):
            await wait_future(thread.submit(setup()))
        async with receive:
            if stop is None:
                yield receive
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drain_once_stopped, stop)
                    yield receive
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(3):
            try:
                await wait_future(thread.submit(teardown()))
            except Exception as exc:
                log.debug("nats subscription close failed", error=repr(exc))
            await trio.to_thread.run_sync(thread.stop)
