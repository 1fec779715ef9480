"""The seed's four tests, ported, plus the envelope details DESIGN.md fixes."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import orjson
import pytest

from cellos_probed.probes import (
    HOST_PROBE_EVENT_SOURCE,
    CapturingSink,
    ProbeContext,
    ProbeIoError,
    ProbeParseError,
    ProbeReading,
    SequenceRegistry,
    build_host_probe_envelope,
    build_probe_error_envelope,
    cell_observability_host_cgroup_v1_type,
    cell_observability_host_fc_metrics_v1_type,
    cell_observability_host_nftables_v1_type,
    cell_observability_host_tap_v1_type,
    emit_probe_error,
    emit_reading,
    probe_short_name,
)

RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_probe_short_name_strips_host_prefix() -> None:
    assert probe_short_name("host.fc_metrics") == "fc_metrics"
    assert probe_short_name("fc_metrics") == "fc_metrics"


def test_f1b_stub_types_match_adr0006_shape() -> None:
    prefix = "dev.cellos.events.cell.observability.host.v1"
    assert cell_observability_host_fc_metrics_v1_type() == f"{prefix}.fc_metrics"
    assert cell_observability_host_cgroup_v1_type() == f"{prefix}.cgroup"
    assert cell_observability_host_nftables_v1_type() == f"{prefix}.nftables"
    assert cell_observability_host_tap_v1_type() == f"{prefix}.tap_link"


@pytest.mark.made_up_readings
def test_build_envelope_carries_attribution_fields() -> None:
    ctx = ProbeContext("cell-1", "run-7", "sha256:abcd")
    reading = ProbeReading(
        "host.fc_metrics",
        {"endpoint": "http://localhost/metrics"},
        {"vmm": {"reads": 0}},
        host_received_at=datetime.now(UTC),
    )
    env = build_host_probe_envelope(ctx, reading)
    assert env.specversion == "1.0"
    assert env.source == HOST_PROBE_EVENT_SOURCE
    assert env.type.endswith(".fc_metrics")
    data = env.data
    assert data["cellId"] == "cell-1"
    assert data["runId"] == "run-7"
    assert data["specSignatureHash"] == "sha256:abcd"
    assert data["probeSource"] == "host.fc_metrics"
    assert isinstance(data["inputs"], dict)
    assert isinstance(data["output"], dict)
    assert isinstance(data["hostReceivedAt"], str)


@pytest.mark.made_up_readings
async def test_emit_reading_stamps_host_received_at_and_dispatches() -> None:
    sink = CapturingSink()
    ctx = ProbeContext("cell-1", "run-7", "sha256:abcd")
    reading = ProbeReading(
        "host.fc_metrics",
        {"endpoint": "http://127.0.0.1:0/metrics"},
        {"vmm": {"reads": 1}},
    )
    await emit_reading(sink, ctx, reading)
    events = sink.snapshot()
    assert len(events) == 1
    data = events[0].data
    assert isinstance(data["hostReceivedAt"], str)
    assert data["probeSource"] == "host.fc_metrics"
    assert data["cellId"] == "cell-1"
    assert data["runId"] == "run-7"


# --- beyond the seed: the wire format DESIGN.md fixes ---------------------


def test_unknown_probe_is_a_parse_error_not_a_guessed_type() -> None:
    ctx = ProbeContext("c", "r", "h")
    with pytest.raises(ProbeParseError, match="unknown host probe short name: disk"):
        build_host_probe_envelope(ctx, ProbeReading("host.disk", {}, {}))


@pytest.mark.made_up_readings
async def test_structured_json_matches_the_contract() -> None:
    sink = CapturingSink()
    sequences = SequenceRegistry()
    ctx = ProbeContext("cell-1", "run-7", "sha256:abcd")
    await emit_reading(sink, ctx, ProbeReading("cgroup", {"cgroup_path": "x"}, {"a": 1}), sequences)
    event = orjson.loads(sink.events[0].to_json())
    assert list(event) == [
        "specversion", "id", "source", "type", "datacontenttype", "time",
        "subject", "dataschema", "cellosseq", "cellosagentboot", "data",
    ]  # fmt: skip
    assert event["specversion"] == "1.0"
    assert event["id"].startswith("urn:cellos:event:")
    assert uuid.UUID(event["id"].removeprefix("urn:cellos:event:")).version == 4
    assert event["source"] == "cellos-host-telemetry/probes"
    assert event["type"] == "dev.cellos.events.cell.observability.host.v1.cgroup"
    assert event["datacontenttype"] == "application/json"
    assert RFC3339_MS.fullmatch(event["time"])
    assert event["time"] == event["data"]["hostReceivedAt"]
    assert event["cellosseq"] == 1
    assert event["subject"] == "cell-1"
    assert event["dataschema"] == "urn:cellos:schema:host.v1.cgroup:1"
    assert event["data"]["hostId"] == sequences.host_id
    assert event["cellosagentboot"] == sequences.boot_id
    assert "traceparent" not in event
    # the probe source is kept as given; only the type strips `host.`
    assert event["data"]["probeSource"] == "cgroup"
    assert event["data"]["inputs"] == {"cgroup_path": "x"}
    assert event["data"]["output"] == {"a": 1}


@pytest.mark.made_up_readings
async def test_readings_and_errors_share_one_sequence_per_cell_and_probe() -> None:
    sink = CapturingSink()
    sequences = SequenceRegistry()
    a = ProbeContext("cell-a", "r", "h")
    b = ProbeContext("cell-b", "r", "h")
    await emit_reading(sink, a, ProbeReading("host.cgroup", {}, {}), sequences)
    await emit_probe_error(sink, a, "host.cgroup", {}, ProbeIoError("gone"), sequences)
    await emit_reading(sink, b, ProbeReading("host.cgroup", {}, {}), sequences)
    await emit_reading(sink, a, ProbeReading("host.tap_link", {}, {}), sequences)
    await emit_reading(sink, a, ProbeReading("host.cgroup", {}, {}), sequences)
    seen = [(e.data["cellId"], e.data["probeSource"], e.kind, e.cellosseq) for e in sink.events]
    assert seen == [
        ("cell-a", "host.cgroup", "cgroup", 1),
        ("cell-a", "host.cgroup", "probe_error", 2),
        ("cell-b", "host.cgroup", "cgroup", 1),
        ("cell-a", "host.tap_link", "tap_link", 1),
        ("cell-a", "host.cgroup", "cgroup", 3),
    ]
    assert {e.cellosagentboot for e in sink.events} == {sequences.boot_id}


@pytest.mark.made_up_readings
def test_probe_error_envelope_shape_and_subject() -> None:
    ctx = ProbeContext("cell-1", "run-7", "sha256:abcd")
    error = ProbeIoError("cgroup directory does not exist: x")
    sequences = SequenceRegistry()
    for _ in range(3):
        build_host_probe_envelope(ctx, ProbeReading("host.cgroup", {}, {}), sequences)
    env = build_probe_error_envelope(ctx, "host.cgroup", {"cgroup_path": "x"}, error, sequences)
    assert env.type == "dev.cellos.events.cell.observability.host.v1.probe_error"
    assert env.nats_subject("p.v1") == f"p.v1.probe_error.{sequences.host_id}.cell-1"
    assert env.subject == "cell-1"
    assert env.data["error"] == {"kind": "io", "message": "cgroup directory does not exist: x"}
    assert env.data["probeSource"] == "host.cgroup"
    assert env.data["inputs"] == {"cgroup_path": "x"}
    assert "output" not in env.data
    assert env.cellosseq == 4


def test_event_ids_are_distinct_random_uuids_across_threads() -> None:
    import threading
    import uuid

    from cellos_probed.cloudevent import new_event_id

    ids: list[str] = []

    def draw() -> None:
        ids.extend(new_event_id() for _ in range(20_000))

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == len(ids) == 80_000
    for event_id in ids[::997]:
        prefix, _, text = event_id.rpartition(":")
        assert prefix == "urn:cellos:event"
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
