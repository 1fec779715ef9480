"""CloudEvents 1.0 in JSON structured mode, as the NATS binding wants it.

One slotted class whose JSON is made once, plus event ids and time stamps
cheap enough for thousands of events a second: the SDK offers no NATS
binding and declares its API unstable, so our own is the safer contract.
"""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime
from typing import Any, Final

import orjson

#: The header that marks a NATS message as structured mode (NATS >= 2.2
#: treats a message without it as binary mode).
STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json"
NATS_HEADERS: Final = {"Content-Type": STRUCTURED_CONTENT_TYPE}


_last_stamp: tuple[tuple[int, ...], str] = ((), "")

#: random hex digits for event ids, drawn from the OS a few KiB at a time, per thread
_random = threading.local()
_POOL_BYTES: Final = 4096
#: RFC 4122 variant: the 17th hex digit's top two bits are 10
_VARIANT_DIGIT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_event_id() -> str:
    """``urn:cellos:event:<random UUID (version 4)>``.

    122 random bits cut from a pool of hex digits, the version and variant
    digits set as RFC 4122 wants: ``uuid.uuid4()``'s system call and object
    per id cost more than the envelope (docs/performance.md, "Event building").
    """
    pool: str = getattr(_random, "pool", "")
    at: int = getattr(_random, "at", 0)
    if at + 32 > len(pool):
        pool, at = os.urandom(_POOL_BYTES).hex(), 0
        _random.pool = pool
    _random.at = at + 32
    h = pool[at : at + 32]
    return (
        f"urn:cellos:event:{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:]}"
    )


def rfc3339_millis(instant: datetime) -> str:
    """RFC 3339 UTC with milliseconds and a ``Z``: ``2026-11-25T10:15:02.123Z``.

    Thousands of events a tick share a few milliseconds, so the text of the
    last millisecond is kept and reused.
    """
    global _last_stamp
    if instant.tzinfo is not UTC:
        return instant.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    i = instant
    key = (i.microsecond // 1000, i.second, i.minute, i.hour, i.day, i.month, i.year)
    if key != _last_stamp[0]:
        _last_stamp = (key, i.isoformat(timespec="milliseconds")[:-6] + "Z")
    return _last_stamp[1]


class CloudEvent:
    """One event: the CloudEvents attributes, its ``data``, and its JSON made once.

    ``json``: the structured-mode payload when the event's maker has it
    already (a probe's events are joined from parts made once per cell and
    probe, see ``events.EventStream``); otherwise it is serialised on first
    use. Either way it is what :meth:`to_dict` gives, serialised by orjson.
    Treat an event as immutable: its JSON is not made again.
    """

    __slots__ = (
        "_json",
        "attribution",
        "cellosagentboot",
        "cellosseq",
        "data",
        "datacontenttype",
        "dataschema",
        "id",
        "kind",
        "route",
        "source",
        "specversion",
        "subject",
        "time",
        "traceparent",
        "type",
    )

    def __init__(
        self,
        id: str,
        source: str,
        type: str,
        time: str,
        data: dict[str, Any],
        *,
        subject: str | None = None,
        dataschema: str | None = None,
        cellosseq: int | None = None,
        cellosagentboot: str | None = None,
        traceparent: str | None = None,
        specversion: str = "1.0",
        datacontenttype: str = "application/json",
        route: str = "",
        kind: str | None = None,
        json: bytes | None = None,
        attribution: dict[str, str] | None = None,
    ) -> None:
        self.id = id
        self.source = source
        self.type = type
        self.time = time
        self.data = data
        self.subject = subject
        self.dataschema = dataschema
        self.cellosseq = cellosseq
        self.cellosagentboot = cellosagentboot
        self.traceparent = traceparent
        self.specversion = specversion
        self.datacontenttype = datacontenttype
        #: the NATS subject's tokens after the kind: ``<hostId>.<cellId>``, or
        #: ``<hostId>`` for ``agent``; routing only, not a CloudEvents attribute
        self.route = route
        #: The type's last segment: ``cgroup``, ``probe_error``, ``gap`` ...
        self.kind = type.rsplit(".", 1)[-1] if kind is None else kind
        self._json = json
        #: the cell's ``cellId``, ``hostId``, ``runId`` and ``specSignatureHash`` as one
        #: object its maker shares between events (read only): what gap accounting keeps
        self.attribution = attribution

    def nats_subject(self, prefix: str) -> str:
        """``<prefix>.<kind>.<hostId>.<cellId>`` (``<prefix>.agent.<hostId>``)."""
        return f"{prefix}.{self.kind}.{self.route}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "specversion": self.specversion,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "datacontenttype": self.datacontenttype,
            "time": self.time,
        }
        if self.subject is not None:
            out["subject"] = self.subject
        if self.dataschema is not None:
            out["dataschema"] = self.dataschema
        if self.traceparent is not None:
            out["traceparent"] = self.traceparent
        if self.cellosseq is not None:
            out["cellosseq"] = self.cellosseq
        if self.cellosagentboot is not None:
            out["cellosagentboot"] = self.cellosagentboot
        out["data"] = self.data
        return out

    def to_json(self) -> bytes:
        """The structured-mode payload (made once)."""
        if self._json is None:
            self._json = orjson.dumps(self.to_dict())
        return self._json

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CloudEvent):
            return NotImplemented
        return (self.to_dict(), self.route) == (other.to_dict(), other.route)

    __hash__ = None  # type: ignore[assignment]  # data is a dict: not hashable

    def __repr__(self) -> str:
        return f"CloudEvent({self.to_dict()!r}, route={self.route!r})"
