"""Host-side observability probes: the port of the seed's ``probes/mod.rs``.

These are the host-side counterpart of the in-guest agent's declarations.
Where the guest *declares* what happened, these probes watch the cell from
outside, through primitives the guest has no path to: cgroup-v2 files,
nftables counters, the TAP link's state and the Firecracker VMM's metrics.
That makes every reading a witness against which a guest's claims are
checked, so silence must mean "nothing happened", never "the probe broke".

Doctrine D12: every event names its probe (``probe_source``), the concrete
``inputs`` it read and the ``output`` it extracted.

This module holds what every probe shares: the context that attributes a
reading to a cell, the reading itself, the typed error family, the
``HostProbe`` protocol, and the one place where a reading becomes a
CloudEvent (``emit_reading`` / ``build_host_probe_envelope``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Protocol, runtime_checkable

import orjson

from cellos_probed.cloudevent import CloudEvent, new_event_id, rfc3339_millis

#: CloudEvents ``source`` for host-probe-emitted events. The pair
#: ``(source, type)`` is the CloudEvents idempotency key.
HOST_PROBE_EVENT_SOURCE: Final = "cellos-host-telemetry/probes"

#: CloudEvents type prefix; the full type is ``<prefix>.<probe>``.
HOST_PROBE_EVENT_TYPE_PREFIX: Final = "dev.cellos.events.cell.observability.host.v1"

#: The four probes, in the order a cell runs them.
PROBE_NAMES: Final = ("cgroup", "tap_link", "nftables", "fc_metrics")

#: Event kinds that belong to the daemon rather than to one probe reading.
PROBE_ERROR_KIND: Final = "probe_error"
GAP_KIND: Final = "gap"
AGENT_KIND: Final = "agent"


@dataclass(frozen=True, slots=True)
class ProbeContext:
    """Per-cell attribution every reading carries (ADR-0006 section 6)."""

    cell_id: str
    run_id: str
    spec_signature_hash: str


@dataclass(slots=True)
class ProbeReading:
    """One reading: which probe, what it read, what it found (D12).

    ``host_received_at`` stays ``None`` until :func:`emit_reading` stamps it
    at dispatch, so "probe ran" and "sink saw it" remain distinguishable.
    """

    probe_source: str
    inputs: dict[str, Any]
    output: dict[str, Any]
    host_received_at: datetime | None = None
    #: ``orjson.dumps(output)``, when the probe made it where the output was made
    #: (a worker thread, with the objects still in its cache); never changed after.
    #: Or that JSON's pieces, in order, when some are big and made already (a
    #: Firecracker reading's totals): the event's JSON is joined from them directly
    output_json: bytes | tuple[bytes, ...] | None = None


class ProbeError(Exception):
    """A probe could not produce a reading. ``kind`` is the event's error kind."""

    kind: ClassVar[str] = "io"
    prefix: ClassVar[str] = "host probe error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.prefix}: {self.message}" if self.message else self.prefix


class ProbePlatformUnsupported(ProbeError):
    kind = "platform_unsupported"
    prefix = "host probe is not supported on this platform"


class ProbeIoError(ProbeError):
    kind = "io"
    prefix = "host probe i/o error"


class ProbeParseError(ProbeError):
    kind = "parse"
    prefix = "host probe parse error"


class ProbeTimeoutError(ProbeError):
    kind = "timeout"
    prefix = "host probe timed out"


class ProbeSinkError(ProbeError):
    """The sink refused an event. Never published as a ``probe_error``."""

    kind = "sink"
    prefix = "host probe sink error"


@runtime_checkable
class HostProbe(Protocol):
    """A single host-side probe bound to one cell.

    ``read`` may keep state between calls (delta baselines); the scheduler
    never runs two reads of the same probe instance at once.
    """

    def probe_name(self) -> str: ...

    def inputs(self) -> dict[str, Any]:
        """What the probe is configured to read; named in ``probe_error`` events."""
        ...

    async def read(self, ctx: ProbeContext) -> ProbeReading: ...


@runtime_checkable
class EventSink(Protocol):
    """Where finished events go (NATS, stdout, a test's list)."""

    async def emit(self, event: CloudEvent) -> None: ...


#: A sink that can also take an event synchronously, never waiting: the daemon
#: hands a tick's thousands of events over without three coroutines each.
#: (``emit_nowait(event) -> None``; looked up with ``getattr``.)
EMIT_NOWAIT: Final = "emit_nowait"


@dataclass(slots=True)
class CapturingSink:
    """Records every event emitted through it, in order (tests, ``once``)."""

    events: list[CloudEvent] = field(default_factory=list)

    async def emit(self, event: CloudEvent) -> None:
        self.emit_nowait(event)

    def emit_nowait(self, event: CloudEvent) -> None:
        """:meth:`emit` without a coroutine (the daemon's per-event path); a
        subclass extends this one, which both paths go through."""
        self.events.append(event)

    def snapshot(self) -> list[CloudEvent]:
        return list(self.events)


class EventStream:
    """One (cell, probe)'s events: their sequence, and the JSON they all share.

    Of a probe's event only the id, the time, the sequence, the inputs and
    the output (or error) differ from one to the next; the rest (envelope
    attributes, the cell's attribution, the boot) is serialised here once,
    when the stream is first used or its cell's identity changes (a reload
    with a new run), and each event's JSON is joined from those parts and
    its own. The result is byte for byte what ``orjson.dumps(event.to_dict())``
    gives (tests/test_event_stream.py); building the envelope and serialising
    it whole was ~7 us an event, a sixth of the daemon at a thousand cells.
    """

    __slots__ = (
        "_after_sequence",
        "_after_stamp",
        "_error_head",
        "_reading_head",
        "attribution",
        "context",
        "probe_source",
        "sequence",
    )

    def __init__(self) -> None:
        self.sequence = 0
        self.context: ProbeContext | None = None
        self.probe_source = ""
        self.attribution: dict[str, str] = {}
        self._reading_head = self._error_head = b""
        self._after_sequence = self._after_stamp = b""

    def bind(self, ctx: ProbeContext, probe_source: str, boot_id: str) -> None:
        """Make the shared parts for ``ctx`` and ``probe_source`` (the sequence goes on)."""
        self.context, self.probe_source = ctx, probe_source
        self.attribution = {
            "cellId": ctx.cell_id,
            "runId": ctx.run_id,
            "specSignatureHash": ctx.spec_signature_hash,
        }
        short = _known_probe(probe_source)

        def head(kind: str) -> bytes:
            return b'","source":%b,"type":%b,"datacontenttype":"application/json","time":"' % (
                orjson.dumps(HOST_PROBE_EVENT_SOURCE),
                orjson.dumps(event_type_for(kind)),
            )

        self._reading_head, self._error_head = head(short), head(PROBE_ERROR_KIND)
        # the attribution object, open after specSignatureHash, ready for hostReceivedAt
        self._after_sequence = b'","cellosagentboot":%b,"data":%b,"hostReceivedAt":"' % (
            orjson.dumps(boot_id),
            orjson.dumps(self.attribution)[:-1],
        )
        self._after_stamp = b'","probeSource":%b,"inputs":' % orjson.dumps(probe_source)

    def event(
        self,
        stamp: str,
        inputs: dict[str, Any],
        result_key: str,
        result: Any,
        boot_id: str,
        result_json: bytes | tuple[bytes, ...] | None = None,
    ) -> CloudEvent:
        """The next event: ``data[result_key]`` (``output`` or ``error``) is ``result``,
        ``result_json`` its JSON (or that JSON's pieces) if already made."""
        self.sequence += 1
        sequence = str(self.sequence)
        event_id = new_event_id()
        is_error = result_key == "error"
        data = {
            **self.attribution,
            "hostReceivedAt": stamp,
            "probeSource": self.probe_source,
            "inputs": inputs,
            result_key: result,
        }
        stamp_bytes = stamp.encode()
        parts = [
            b'{"specversion":"1.0","id":"',
            event_id.encode(),
            self._error_head if is_error else self._reading_head,
            stamp_bytes,
            b'","sequence":"',
            sequence.encode(),
            self._after_sequence,
            stamp_bytes,
            self._after_stamp,
            orjson.dumps(inputs),
            b',"error":' if is_error else b',"output":',
        ]
        if result_json is None:
            parts.append(orjson.dumps(result))
        elif isinstance(result_json, bytes):
            parts.append(result_json)
        else:  # pieces: joined here, in one copy
            parts.extend(result_json)
        parts.append(b"}}")
        json = b"".join(parts)
        kind = PROBE_ERROR_KIND if is_error else _SHORT_NAMES[self.probe_source]
        return CloudEvent(
            event_id,
            HOST_PROBE_EVENT_SOURCE,
            _EVENT_TYPES[kind],
            stamp,
            data,
            sequence,
            boot_id,
            None,
            "1.0",
            "application/json",
            self.attribution["cellId"],
            kind=kind,
            json=json,
            attribution=self.attribution,
        )


class EventStamper:
    """The loss-visibility extensions: one boot id, one count per (cell, probe).

    A reading and a ``probe_error`` of the same cell and probe share the
    count, so each (boot, cell, probe) sequence has no holes unless a ``gap``
    event declares them. The stamper outlives config reloads.
    """

    __slots__ = ("_streams", "boot_id")

    def __init__(self, boot_id: str | None = None) -> None:
        self.boot_id = boot_id or str(uuid.uuid4())
        self._streams: dict[tuple[str, str], EventStream] = {}

    def stream(self, ctx: ProbeContext, probe_source: str) -> EventStream:
        """The (cell, probe) stream, bound to ``ctx``; an unknown probe is a parse error."""
        key = (ctx.cell_id, _known_probe(probe_source))
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = EventStream()
        bound = stream.context
        if (bound is not ctx and bound != ctx) or stream.probe_source != probe_source:
            stream.bind(ctx, probe_source, self.boot_id)
        return stream

    def next_sequence(self, cell_id: str, probe: str) -> int:
        key = (cell_id, probe)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = EventStream()
        stream.sequence += 1
        return stream.sequence

    def last_sequence(self, cell_id: str, probe: str) -> int:
        stream = self._streams.get((cell_id, probe))
        return 0 if stream is None else stream.sequence


def probe_short_name(probe_source: str) -> str:
    """Strip the optional ``host.`` prefix: ``host.cgroup`` -> ``cgroup``."""
    return probe_source.removeprefix("host.")


def event_type_for(kind: str) -> str:
    known = _EVENT_TYPES.get(kind)
    return known if known is not None else f"{HOST_PROBE_EVENT_TYPE_PREFIX}.{kind}"


#: the types of every kind this module emits, made once rather than per event
_EVENT_TYPES: Final = {
    kind: f"{HOST_PROBE_EVENT_TYPE_PREFIX}.{kind}"
    for kind in (*PROBE_NAMES, PROBE_ERROR_KIND, GAP_KIND, AGENT_KIND)
}
#: ``cgroup`` and ``host.cgroup`` alike, to the short name
_SHORT_NAMES: Final = {
    **{name: name for name in PROBE_NAMES},
    **{f"host.{name}": name for name in PROBE_NAMES},
}


def cell_observability_host_fc_metrics_v1_type() -> str:
    return event_type_for("fc_metrics")


def cell_observability_host_cgroup_v1_type() -> str:
    return event_type_for("cgroup")


def cell_observability_host_nftables_v1_type() -> str:
    return event_type_for("nftables")


def cell_observability_host_tap_v1_type() -> str:
    return event_type_for("tap_link")


def _known_probe(probe_source: str) -> str:
    short = _SHORT_NAMES.get(probe_source)
    if short is None:
        raise ProbeParseError(f"unknown host probe short name: {probe_short_name(probe_source)}")
    return short


def _attribution(ctx: ProbeContext, stamp: str, probe_source: str) -> dict[str, Any]:
    return {
        "cellId": ctx.cell_id,
        "runId": ctx.run_id,
        "specSignatureHash": ctx.spec_signature_hash,
        "hostReceivedAt": stamp,
        "probeSource": probe_source,
    }


def _envelope(
    kind: str,
    token: str,
    data: dict[str, Any],
    stamp: str,
    sequence: int | None,
    boot_id: str | None,
) -> CloudEvent:
    return CloudEvent(
        id=new_event_id(),
        source=HOST_PROBE_EVENT_SOURCE,
        type=event_type_for(kind),
        time=stamp,
        data=data,
        sequence=None if sequence is None else str(sequence),
        cellosagentboot=boot_id,
        subject_token=token,
    )


def build_host_probe_envelope(
    ctx: ProbeContext,
    reading: ProbeReading,
    *,
    sequence: int | None = None,
    boot_id: str | None = None,
) -> CloudEvent:
    """The CloudEvent for ``reading``; an unknown probe is a parse error."""
    short = _known_probe(reading.probe_source)
    received = reading.host_received_at or datetime.now(UTC)
    stamp = rfc3339_millis(received)
    data = _attribution(ctx, stamp, reading.probe_source)
    data["inputs"] = reading.inputs
    data["output"] = reading.output
    return _envelope(short, ctx.cell_id, data, stamp, sequence, boot_id)


def _error_data(error: ProbeError) -> dict[str, str]:
    return {"kind": error.kind, "message": error.message or error.prefix}


def build_probe_error_envelope(
    ctx: ProbeContext,
    probe_source: str,
    inputs: dict[str, Any],
    error: ProbeError,
    *,
    sequence: int | None = None,
    boot_id: str | None = None,
    received_at: datetime | None = None,
) -> CloudEvent:
    """The ``probe_error`` event published on the failing probe's behalf."""
    _known_probe(probe_source)
    stamp = rfc3339_millis(received_at or datetime.now(UTC))
    data = _attribution(ctx, stamp, probe_source)
    data["inputs"] = inputs
    data["error"] = _error_data(error)
    return _envelope(PROBE_ERROR_KIND, ctx.cell_id, data, stamp, sequence, boot_id)


def reading_event(
    ctx: ProbeContext, reading: ProbeReading, stamper: EventStamper | None = None
) -> CloudEvent:
    """Stamp ``host_received_at`` and build the reading's envelope.

    With :func:`emit_reading`, the single point where "a probe produced
    something" turns into an event, so host-stamping cannot be bypassed.
    """
    reading.host_received_at = received = datetime.now(UTC)
    if stamper is None:
        return build_host_probe_envelope(ctx, reading)
    return stamper.stream(ctx, reading.probe_source).event(
        rfc3339_millis(received),
        reading.inputs,
        "output",
        reading.output,
        stamper.boot_id,
        reading.output_json,
    )


async def emit_reading(
    sink: EventSink,
    ctx: ProbeContext,
    reading: ProbeReading,
    stamper: EventStamper | None = None,
) -> CloudEvent:
    """:func:`reading_event`, handed to ``sink``."""
    event = reading_event(ctx, reading, stamper)
    await sink.emit(event)
    return event


def probe_error_event(
    ctx: ProbeContext,
    probe_source: str,
    inputs: dict[str, Any],
    error: ProbeError,
    stamper: EventStamper | None = None,
) -> CloudEvent:
    """That ``probe_source`` failed, sharing the probe's sequence."""
    if stamper is None:
        return build_probe_error_envelope(ctx, probe_source, inputs, error)
    return stamper.stream(ctx, probe_source).event(
        rfc3339_millis(datetime.now(UTC)),
        inputs,
        "error",
        _error_data(error),
        stamper.boot_id,
    )


async def emit_probe_error(
    sink: EventSink,
    ctx: ProbeContext,
    probe_source: str,
    inputs: dict[str, Any],
    error: ProbeError,
    stamper: EventStamper | None = None,
) -> CloudEvent:
    """:func:`probe_error_event`, handed to ``sink``."""
    event = probe_error_event(ctx, probe_source, inputs, error, stamper)
    await sink.emit(event)
    return event


def build_gap_envelope(
    attribution: dict[str, Any],
    probe_source: str,
    first_sequence: int,
    last_sequence: int,
    reason: str,
    boot_id: str,
) -> CloudEvent:
    """A ``gap`` event: readings of this daemon (this boot) that were dropped.

    ``attribution`` holds the dropped events' ``cellId``, ``runId`` and
    ``specSignatureHash``.
    """
    stamp = rfc3339_millis(datetime.now(UTC))
    data = {
        "cellId": attribution["cellId"],
        "runId": attribution["runId"],
        "specSignatureHash": attribution["specSignatureHash"],
        "hostReceivedAt": stamp,
        "probeSource": probe_source,
        "dropped": last_sequence - first_sequence + 1,
        "firstSequence": first_sequence,
        "lastSequence": last_sequence,
        "reason": reason,
    }
    return _envelope(GAP_KIND, attribution["cellId"], data, stamp, None, boot_id)


def build_agent_envelope(host_id: str, boot_id: str, figures: dict[str, Any]) -> CloudEvent:
    """The daemon's own figures, on ``<prefix>.agent.<hostId>``; no ``sequence``."""
    stamp = rfc3339_millis(datetime.now(UTC))
    data = {"hostId": host_id, "hostReceivedAt": stamp, **figures}
    return _envelope(AGENT_KIND, host_id, data, stamp, None, boot_id)
