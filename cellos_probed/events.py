"""Readings into CloudEvents: the one place every event of the daemon is built.

The daemon's ticks, ``once``, the outbox's and spool's ``gap`` events and
the seed's ``emit_reading`` / ``build_host_probe_envelope`` all build here.
A (cell, probe)'s events are joined from parts serialised once per stream
(:class:`EventStream`); ``gap`` and ``agent`` events, rare, from a dict.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import orjson

from cellos_probed.cloudevent import CloudEvent, new_event_id, rfc3339_millis
from cellos_probed.config import default_host_id
from cellos_probed.readings import (
    PROBE_NAMES,
    ProbeContext,
    ProbeError,
    ProbeReading,
    known_probe,
)
from cellos_probed.schemas import schema_id

if TYPE_CHECKING:
    from cellos_probed.sinks import EventSink

#: CloudEvents ``source`` for host-probe-emitted events. The pair
#: ``(source, type)`` is the CloudEvents idempotency key.
HOST_PROBE_EVENT_SOURCE: Final = "cellos-host-telemetry/probes"

#: CloudEvents type prefix; the full type is ``<prefix>.<probe>``.
HOST_PROBE_EVENT_TYPE_PREFIX: Final = "dev.cellos.events.cell.observability.host.v1"

#: Event kinds that belong to the daemon rather than to one probe reading.
PROBE_ERROR_KIND: Final = "probe_error"
GAP_KIND: Final = "gap"
AGENT_KIND: Final = "agent"

_KINDS: Final = (*PROBE_NAMES, PROBE_ERROR_KIND, GAP_KIND, AGENT_KIND)
#: the types and schema ids of every kind this module emits, made once rather than per event
_EVENT_TYPES: Final = {kind: f"{HOST_PROBE_EVENT_TYPE_PREFIX}.{kind}" for kind in _KINDS}
_SCHEMA_IDS: Final = {kind: schema_id(kind) for kind in _KINDS}


def event_type_for(kind: str) -> str:
    known = _EVENT_TYPES.get(kind)
    return known if known is not None else f"{HOST_PROBE_EVENT_TYPE_PREFIX}.{kind}"


def cell_observability_host_fc_metrics_v1_type() -> str:
    return event_type_for("fc_metrics")


def cell_observability_host_cgroup_v1_type() -> str:
    return event_type_for("cgroup")


def cell_observability_host_nftables_v1_type() -> str:
    return event_type_for("nftables")


def cell_observability_host_tap_v1_type() -> str:
    return event_type_for("tap_link")


class EventStream:
    """One (cell, probe)'s events: their ``cellosseq``, and the JSON they all share.

    Of a probe's event only the id, the time, the count, the inputs and the
    output (or error) differ from one to the next; the rest (envelope
    attributes, the cell's attribution, the boot) is serialised once, when
    the stream is first used or its cell's identity changes (a reload with a
    new run). Each event's JSON is byte for byte what
    ``orjson.dumps(event.to_dict())`` gives (tests/test_event_stream.py).
    """

    __slots__ = (
        "_after_count",
        "_after_stamp",
        "_error_head",
        "_error_middle",
        "_reading_head",
        "_reading_middle",
        "attribution",
        "context",
        "kind",
        "probe_source",
        "route",
        "sequence",
    )

    def __init__(self) -> None:
        self.sequence = 0
        self.context: ProbeContext | None = None
        self.probe_source = self.kind = self.route = ""
        self.attribution: dict[str, str] = {}
        self._reading_head = self._error_head = b""
        self._reading_middle = self._error_middle = b""
        self._after_count = self._after_stamp = b""

    def bind(self, ctx: ProbeContext, probe_source: str, boot_id: str, host_id: str) -> None:
        """Make the shared parts for ``ctx`` and ``probe_source`` (the count goes on)."""
        self.context, self.probe_source = ctx, probe_source
        self.kind = known_probe(probe_source)
        self.route = f"{host_id}.{ctx.cell_id}"
        self.attribution = {
            "cellId": ctx.cell_id,
            "hostId": host_id,
            "runId": ctx.run_id,
            "specSignatureHash": ctx.spec_signature_hash,
        }
        subject = orjson.dumps(ctx.cell_id)

        def head(kind: str) -> bytes:
            return b'","source":%b,"type":%b,"datacontenttype":"application/json","time":"' % (
                orjson.dumps(HOST_PROBE_EVENT_SOURCE),
                orjson.dumps(event_type_for(kind)),
            )

        def middle(kind: str) -> bytes:
            return b'","subject":%b,"dataschema":%b,"cellosseq":' % (
                subject,
                orjson.dumps(schema_id(kind)),
            )

        self._reading_head, self._error_head = head(self.kind), head(PROBE_ERROR_KIND)
        self._reading_middle, self._error_middle = middle(self.kind), middle(PROBE_ERROR_KIND)
        # the attribution object, open after specSignatureHash, ready for hostReceivedAt
        self._after_count = b',"cellosagentboot":%b,"data":%b,"hostReceivedAt":"' % (
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
        count = self.sequence
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
            self._error_middle if is_error else self._reading_middle,
            b"%d" % count,
            self._after_count,
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
        kind = PROBE_ERROR_KIND if is_error else self.kind
        cell_id = self.attribution["cellId"]
        return CloudEvent(
            event_id,
            HOST_PROBE_EVENT_SOURCE,
            _EVENT_TYPES[kind],
            stamp,
            data,
            subject=cell_id,
            dataschema=_SCHEMA_IDS[kind],
            cellosseq=count,
            cellosagentboot=boot_id,
            route=self.route,
            kind=kind,
            json=b"".join(parts),
            attribution=self.attribution,
        )


class SequenceRegistry:
    """Who sends (the host id, one boot id) and the ``cellosseq`` count per (cell, probe).

    A reading and a ``probe_error`` of the same cell and probe share the
    count, so each (boot, host, cell, probe) count has no holes unless a
    ``gap`` event declares them. The registry outlives config reloads.
    """

    __slots__ = ("_streams", "boot_id", "host_id")

    def __init__(self, boot_id: str | None = None, host_id: str | None = None) -> None:
        self.boot_id = boot_id or str(uuid.uuid4())
        self.host_id = host_id or default_host_id()
        self._streams: dict[tuple[str, str], EventStream] = {}

    def stream(self, ctx: ProbeContext, probe_source: str) -> EventStream:
        """The (cell, probe) stream, bound to ``ctx``; an unknown probe is a parse error."""
        key = (ctx.cell_id, known_probe(probe_source))
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = EventStream()
        bound = stream.context
        if (bound is not ctx and bound != ctx) or stream.probe_source != probe_source:
            stream.bind(ctx, probe_source, self.boot_id, self.host_id)
        return stream

    def last_sequence(self, cell_id: str, probe: str) -> int:
        stream = self._streams.get((cell_id, probe))
        return 0 if stream is None else stream.sequence


def build_host_probe_envelope(
    ctx: ProbeContext, reading: ProbeReading, registry: SequenceRegistry | None = None
) -> CloudEvent:
    """The CloudEvent for ``reading``, next in ``registry``'s count for its cell and
    probe (without one, a one-off count of its own); an unknown probe is a parse error."""
    registry = registry or SequenceRegistry()
    received = reading.host_received_at or datetime.now(UTC)
    return registry.stream(ctx, reading.probe_source).event(
        rfc3339_millis(received),
        reading.inputs,
        "output",
        reading.output,
        registry.boot_id,
        reading.output_json,
    )


def reading_event(
    ctx: ProbeContext, reading: ProbeReading, registry: SequenceRegistry | None = None
) -> CloudEvent:
    """Stamp ``host_received_at`` now and build the reading's event: the single point
    where "a probe produced something" turns into an event."""
    reading.host_received_at = datetime.now(UTC)
    return build_host_probe_envelope(ctx, reading, registry)


async def emit_reading(
    sink: EventSink,
    ctx: ProbeContext,
    reading: ProbeReading,
    registry: SequenceRegistry | None = None,
) -> CloudEvent:
    """:func:`reading_event`, handed to ``sink``."""
    event = reading_event(ctx, reading, registry)
    await sink.emit(event)
    return event


def error_data(error: ProbeError) -> dict[str, str]:
    return {"kind": error.kind, "message": error.message or error.prefix}


def build_probe_error_envelope(
    ctx: ProbeContext,
    probe_source: str,
    inputs: dict[str, Any],
    error: ProbeError,
    registry: SequenceRegistry | None = None,
) -> CloudEvent:
    """That ``probe_source`` failed, stamped now, sharing the probe's count."""
    registry = registry or SequenceRegistry()
    return registry.stream(ctx, probe_source).event(
        rfc3339_millis(datetime.now(UTC)), inputs, "error", error_data(error), registry.boot_id
    )


async def emit_probe_error(
    sink: EventSink,
    ctx: ProbeContext,
    probe_source: str,
    inputs: dict[str, Any],
    error: ProbeError,
    registry: SequenceRegistry | None = None,
) -> CloudEvent:
    """:func:`build_probe_error_envelope`, handed to ``sink``."""
    event = build_probe_error_envelope(ctx, probe_source, inputs, error, registry)
    await sink.emit(event)
    return event


def _envelope(
    kind: str, subject: str, route: str, data: dict[str, Any], stamp: str, boot_id: str
) -> CloudEvent:
    return CloudEvent(
        new_event_id(),
        HOST_PROBE_EVENT_SOURCE,
        _EVENT_TYPES[kind],
        stamp,
        data,
        subject=subject,
        dataschema=_SCHEMA_IDS[kind],
        cellosagentboot=boot_id,
        route=route,
        kind=kind,
    )


def gap_event(
    attribution: dict[str, Any],
    probe_source: str,
    first_sequence: int,
    last_sequence: int,
    reason: str,
    boot_id: str,
) -> CloudEvent:
    """A ``gap`` event: readings of this daemon (this boot) that were dropped.

    ``attribution`` holds the dropped events' ``cellId``, ``hostId``, ``runId``
    and ``specSignatureHash``; the sequences are their ``cellosseq`` values.
    """
    stamp = rfc3339_millis(datetime.now(UTC))
    cell_id, host_id = attribution["cellId"], attribution["hostId"]
    data = {
        "cellId": cell_id,
        "hostId": host_id,
        "runId": attribution["runId"],
        "specSignatureHash": attribution["specSignatureHash"],
        "hostReceivedAt": stamp,
        "probeSource": probe_source,
        "dropped": last_sequence - first_sequence + 1,
        "firstSequence": first_sequence,
        "lastSequence": last_sequence,
        "reason": reason,
    }
    return _envelope(GAP_KIND, cell_id, f"{host_id}.{cell_id}", data, stamp, boot_id)


def agent_event(host_id: str, boot_id: str, figures: dict[str, Any]) -> CloudEvent:
    """The daemon's own figures, on ``<prefix>.agent.<hostId>``; no ``cellosseq``."""
    stamp = rfc3339_millis(datetime.now(UTC))
    data = {"hostId": host_id, "hostReceivedAt": stamp, **figures}
    return _envelope(AGENT_KIND, host_id, host_id, data, stamp, boot_id)
