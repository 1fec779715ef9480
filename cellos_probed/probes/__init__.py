"""Host-side observability probes: the port of the seed's ``probes/mod.rs``.

These are the host-side counterpart of the in-guest agent's declarations:
they watch a cell from outside, through primitives the guest has no path
to (cgroup-v2 files, nftables counters, the TAP link, the Firecracker VMM's
metrics), so every reading is a witness a guest's claims are checked
against. Doctrine D12: every event names its probe, the concrete inputs it
read and the output it extracted.

This module is the package's face: it only re-exports. The probe interface
is in ``probes.base``, the probes in their own modules, the domain types in
``cellos_probed.readings``, event building in ``cellos_probed.events``,
sinks in ``cellos_probed.sinks``.
"""

from cellos_probed.events import (
    AGENT_KIND,
    GAP_KIND,
    HOST_PROBE_EVENT_SOURCE,
    HOST_PROBE_EVENT_TYPE_PREFIX,
    PROBE_ERROR_KIND,
    EventStream,
    SequenceRegistry,
    build_host_probe_envelope,
    build_probe_error_envelope,
    cell_observability_host_cgroup_v1_type,
    cell_observability_host_fc_metrics_v1_type,
    cell_observability_host_nftables_v1_type,
    cell_observability_host_tap_v1_type,
    emit_probe_error,
    emit_reading,
    event_type_for,
)
from cellos_probed.probes.base import HostProbe
from cellos_probed.readings import (
    PROBE_NAMES,
    ProbeContext,
    ProbeError,
    ProbeIoError,
    ProbeParseError,
    ProbePlatformUnsupported,
    ProbeReading,
    ProbeResult,
    ProbeTimeoutError,
    probe_short_name,
)
from cellos_probed.sinks import CapturingSink, EventSink

__all__ = [
    "AGENT_KIND",
    "GAP_KIND",
    "HOST_PROBE_EVENT_SOURCE",
    "HOST_PROBE_EVENT_TYPE_PREFIX",
    "PROBE_ERROR_KIND",
    "PROBE_NAMES",
    "CapturingSink",
    "EventSink",
    "EventStream",
    "HostProbe",
    "ProbeContext",
    "ProbeError",
    "ProbeIoError",
    "ProbeParseError",
    "ProbePlatformUnsupported",
    "ProbeReading",
    "ProbeResult",
    "ProbeTimeoutError",
    "SequenceRegistry",
    "build_host_probe_envelope",
    "build_probe_error_envelope",
    "cell_observability_host_cgroup_v1_type",
    "cell_observability_host_fc_metrics_v1_type",
    "cell_observability_host_nftables_v1_type",
    "cell_observability_host_tap_v1_type",
    "emit_probe_error",
    "emit_reading",
    "event_type_for",
    "probe_short_name",
]
