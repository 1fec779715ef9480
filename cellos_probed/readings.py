"""What a probe produces: the cell it reads for, its reading, its typed errors.

The seed's domain types (``probes/mod.rs``). Everything that handles
readings imports them from here, below the probes, so that helpers the
probes use (``netns``, the outbox) never import a probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Final

#: The four probes, in the order a cell runs them.
PROBE_NAMES: Final = ("cgroup", "tap_link", "nftables", "fc_metrics")


@dataclass(frozen=True, slots=True)
class ProbeContext:
    """The attribution every event of a cell carries (ADR-0006 section 6)."""

    cell_id: str
    run_id: str
    spec_signature_hash: str


@dataclass(slots=True)
class ProbeReading:
    """One reading: which probe, what it read, what it found (D12).

    ``host_received_at`` stays ``None`` until the reading is handed to the
    sink (``events.reading_event``), so "probe ran" and "sink saw it" remain
    distinguishable.
    """

    probe_source: str
    inputs: dict[str, Any]
    output: dict[str, Any]
    host_received_at: datetime | None = None
    #: ``orjson.dumps(output)`` (or its pieces, in order) when the probe made it
    #: already, where the objects were still in cache; never changed after
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


#: what one probe's read of one cell came to; ``None`` while not yet read
ProbeResult = ProbeReading | ProbeError

#: ``cgroup`` and ``host.cgroup`` alike, to the short name
_SHORT_NAMES: Final = {
    **{name: name for name in PROBE_NAMES},
    **{f"host.{name}": name for name in PROBE_NAMES},
}


def probe_short_name(probe_source: str) -> str:
    """Strip the optional ``host.`` prefix: ``host.cgroup`` -> ``cgroup``."""
    return probe_source.removeprefix("host.")


def known_probe(probe_source: str) -> str:
    """The short name of a probe this daemon has; any other is a parse error."""
    short = _SHORT_NAMES.get(probe_source)
    if short is None:
        raise ProbeParseError(f"unknown host probe short name: {probe_short_name(probe_source)}")
    return short
