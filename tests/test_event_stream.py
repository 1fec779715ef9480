"""A probe's events joined from parts made once: the same bytes as the envelope serialised whole."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.outbox import Outbox
from cellos_probed.probes import (
    PROBE_NAMES,
    CapturingSink,
    ProbeContext,
    ProbeIoError,
    ProbeParseError,
    ProbeReading,
    ProbeTimeoutError,
    SequenceRegistry,
    build_host_probe_envelope,
    build_probe_error_envelope,
    emit_probe_error,
    emit_reading,
)

#: JSON values as probes produce them (ints within 64 bits, as orjson takes them)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
objects = st.dictionaries(st.text(), json_values, max_size=5)
#: identities with what JSON must escape: quotes, backslashes, control characters, non-ASCII
names = st.text(min_size=1, max_size=20)


HOST = "host-a"


def reference(event: CloudEvent) -> bytes:
    """What the envelope serialised whole gives."""
    return orjson.dumps(event.to_dict())


def expected_envelope(
    ctx: ProbeContext,
    kind: str,
    source: str,
    stamp: str,
    sequence: int,
    boot: str,
    inputs: dict[str, Any],
    result_key: str,
    result: Any,
) -> dict[str, Any]:
    """The reference: the envelope DESIGN.md describes, built whole, id aside."""
    return {
        "specversion": "1.0",
        "source": "cellos-host-telemetry/probes",
        "type": f"dev.cellos.events.cell.observability.host.v1.{kind}",
        "datacontenttype": "application/json",
        "time": stamp,
        "subject": ctx.cell_id,
        "dataschema": f"urn:cellos:schema:host.v1.{kind}:1",
        "cellosseq": sequence,
        "cellosagentboot": boot,
        "data": {
            "cellId": ctx.cell_id,
            "hostId": HOST,
            "runId": ctx.run_id,
            "specSignatureHash": ctx.spec_signature_hash,
            "hostReceivedAt": stamp,
            "probeSource": source,
            "inputs": inputs,
            result_key: result,
        },
    }


def same_envelope_but_id(event: CloudEvent, expected: dict[str, Any]) -> None:
    mine = orjson.loads(event.to_json())
    assert mine.pop("id").startswith("urn:cellos:event:")
    assert mine == expected
    assert (
        event.nats_subject("p")
        == f"p.{expected['type'].rsplit('.', 1)[1]}.{HOST}.{ctx_cell(expected)}"
    )


def ctx_cell(expected: dict[str, Any]) -> str:
    return str(expected["data"]["cellId"])


@pytest.mark.made_up_readings
@settings(max_examples=300, deadline=None)
@given(
    cell=names,
    run=names,
    spec=names,
    probe=st.sampled_from(PROBE_NAMES),
    prefixed=st.booleans(),
    inputs=objects,
    output=objects,
    boot=names,
)
def test_a_reading_joined_from_parts_is_the_envelope_serialised_whole(
    cell: str,
    run: str,
    spec: str,
    probe: str,
    prefixed: bool,
    inputs: dict[str, Any],
    output: dict[str, Any],
    boot: str,
) -> None:
    source = f"host.{probe}" if prefixed else probe
    ctx = ProbeContext(cell, run, spec)
    sequences = SequenceRegistry(boot, HOST)
    reading = ProbeReading(source, inputs, output)
    event = sequences.stream(ctx, source).event(
        "2026-11-30T06:00:00.123Z", inputs, "output", output, boot
    )
    assert event.to_json() == reference(event)
    expected = expected_envelope(
        ctx, probe, source, "2026-11-30T06:00:00.123Z", 1, boot, inputs, "output", output
    )
    same_envelope_but_id(event, expected)
    # the seed's builder is the same path: the next in the count, stamped as given
    reading.host_received_at = datetime(2026, 11, 30, 6, 0, 0, 123456, tzinfo=UTC)
    expected["cellosseq"] = 2
    same_envelope_but_id(build_host_probe_envelope(ctx, reading, sequences), expected)
    assert orjson.loads(event.to_json())["id"] == event.id


@pytest.mark.made_up_readings
@settings(max_examples=200, deadline=None)
@given(output=objects, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=4))
def test_an_output_given_as_pieces_of_its_json_is_joined_into_the_same_bytes(
    output: dict[str, Any], cuts: list[int]
) -> None:
    # a Firecracker reading's output comes as pieces (its totals are not copied twice)
    text = orjson.dumps(output)
    bounds = sorted({0, len(text), *(min(cut, len(text)) for cut in cuts)})
    pieces = tuple(text[a:b] for a, b in itertools.pairwise(bounds))
    sequences = SequenceRegistry("boot-1", HOST)
    stream = sequences.stream(ProbeContext("cell-1", "run-1", "spec"), "host.fc_metrics")
    event = stream.event("2026-11-30T06:00:00.123Z", {"vm": 1}, "output", output, "boot-1", pieces)
    assert event.to_json() == reference(event)
    assert orjson.loads(event.to_json())["data"]["output"] == output


@pytest.mark.made_up_readings
@settings(max_examples=200, deadline=None)
@given(
    cell=names,
    run=names,
    probe=st.sampled_from(PROBE_NAMES),
    inputs=objects,
    message=st.text(),
    kind=st.sampled_from([ProbeIoError, ProbeParseError, ProbeTimeoutError]),
)
def test_a_probe_error_joined_from_parts_is_the_envelope_serialised_whole(
    cell: str,
    run: str,
    probe: str,
    inputs: dict[str, Any],
    message: str,
    kind: type[ProbeIoError],
) -> None:
    ctx = ProbeContext(cell, run, "sha256:x")
    sequences = SequenceRegistry("boot-1", HOST)
    error = kind(message)
    stream = sequences.stream(ctx, f"host.{probe}")
    stream.event("2026-11-30T06:00:00.000Z", inputs, "output", {}, "boot-1")  # sequence 1
    event = stream.event(
        "2026-11-30T06:00:00.000Z",
        inputs,
        "error",
        {"kind": error.kind, "message": error.message or error.prefix},
        "boot-1",
    )
    assert event.to_json() == reference(event)
    error_data = {"kind": error.kind, "message": error.message or error.prefix}
    expected = expected_envelope(
        ctx,
        "probe_error",
        f"host.{probe}",
        "2026-11-30T06:00:00.000Z",
        2,
        "boot-1",
        inputs,
        "error",
        error_data,
    )
    same_envelope_but_id(event, expected)
    assert event.kind == "probe_error"
    # the seed's builder is the same path (stamped now)
    built = build_probe_error_envelope(ctx, f"host.{probe}", inputs, error, sequences)
    assert orjson.loads(built.to_json())["data"]["error"] == error_data
    assert built.cellosseq == 3


@pytest.mark.made_up_readings
@pytest.mark.trio
async def test_readings_and_errors_share_one_sequence_per_cell_and_probe() -> None:
    sink = CapturingSink()
    sequences = SequenceRegistry(host_id=HOST)
    a, b = ProbeContext("a", "run-a", "h"), ProbeContext("b", "run-b", "h")
    await emit_reading(sink, a, ProbeReading("host.cgroup", {}, {"n": 1}), sequences)
    await emit_probe_error(sink, a, "host.cgroup", {}, ProbeIoError("gone"), sequences)
    await emit_reading(sink, a, ProbeReading("host.tap_link", {}, {}), sequences)
    await emit_reading(sink, b, ProbeReading("cgroup", {}, {"n": 2}), sequences)
    await emit_reading(sink, a, ProbeReading("cgroup", {}, {"n": 3}), sequences)
    seen = [(e.data["cellId"], e.kind, e.cellosseq) for e in sink.events]
    assert seen == [
        ("a", "cgroup", 1),
        ("a", "probe_error", 2),
        ("a", "tap_link", 1),
        ("b", "cgroup", 1),
        ("a", "cgroup", 3),
    ]
    assert sequences.last_sequence("a", "cgroup") == 3
    # the short and the prefixed name are one probe, each named as given
    assert [e.data["probeSource"] for e in sink.events] == [
        "host.cgroup",
        "host.cgroup",
        "host.tap_link",
        "cgroup",
        "cgroup",
    ]
    for event in sink.events:
        assert event.to_json() == reference(event)
        assert orjson.loads(event.to_json())["data"]["hostReceivedAt"] == event.time


@pytest.mark.made_up_readings
@pytest.mark.trio
async def test_a_new_run_of_a_cell_is_attributed_at_once_and_its_sequence_goes_on() -> None:
    """A reload that gives the cell a new run: the parts made once are made again."""
    sink = CapturingSink()
    sequences = SequenceRegistry(host_id=HOST)
    await emit_reading(
        sink, ProbeContext("a", "run-1", "h1"), ProbeReading("cgroup", {}, {}), sequences
    )
    await emit_reading(
        sink, ProbeContext("a", "run-1", "h1"), ProbeReading("cgroup", {}, {}), sequences
    )
    await emit_reading(
        sink, ProbeContext("a", "run-2", "h2"), ProbeReading("cgroup", {}, {}), sequences
    )
    sent = [orjson.loads(e.to_json()) for e in sink.events]
    assert [(s["data"]["runId"], s["data"]["specSignatureHash"]) for s in sent] == [
        ("run-1", "h1"),
        ("run-1", "h1"),
        ("run-2", "h2"),
    ]
    assert [s["cellosseq"] for s in sent] == [1, 2, 3]
    assert [e.data["runId"] for e in sink.events] == ["run-1", "run-1", "run-2"]


@pytest.mark.trio
async def test_an_unknown_probe_is_refused_before_any_sequence_is_spent() -> None:
    sink = CapturingSink()
    sequences = SequenceRegistry(host_id=HOST)
    with pytest.raises(ProbeParseError, match="unknown host probe short name: disk"):
        await emit_reading(
            sink, ProbeContext("a", "r", "h"), ProbeReading("host.disk", {}, {}), sequences
        )
    assert sink.events == []


@pytest.mark.made_up_readings
@pytest.mark.trio
async def test_the_outbox_sends_the_joined_json_and_accounts_for_it() -> None:
    sequences = SequenceRegistry(host_id=HOST)
    outbox = Outbox("p.v1", sequences.boot_id, max_events=1, max_bytes=1 << 20)

    class Into:
        async def emit(self, event: CloudEvent) -> None:
            outbox.put(event)

    ctx = ProbeContext("cell-7", "run-7", "sha256:x")
    first = await emit_reading(Into(), ctx, ProbeReading("host.nftables", {"t": 1}, {}), sequences)
    (entry,) = outbox.batch(10)
    assert (entry.subject, entry.payload, entry.msg_id) == (
        f"p.v1.nftables.{HOST}.cell-7",
        first.to_json(),
        first.id,
    )
    await emit_reading(Into(), ctx, ProbeReading("host.nftables", {"t": 1}, {}), sequences)
    # the first reading was pushed out of its batch in flight, and the batch failed:
    # it is declared lost, with the cell's attribution
    (gap,) = outbox.batch_failed()
    assert (gap.attribution, gap.probe_source, gap.first, gap.last) == (
        {"cellId": "cell-7", "hostId": HOST, "runId": "run-7", "specSignatureHash": "sha256:x"},
        "host.nftables",
        1,
        1,
    )


@pytest.mark.made_up_readings
@pytest.mark.trio
async def test_an_output_serialised_by_its_probe_is_embedded_as_it_is() -> None:
    sink = CapturingSink()
    sequences = SequenceRegistry(host_id=HOST)
    ctx = ProbeContext("a", "r", "h")
    output = {"n": 1, "f": 0.5}
    made = orjson.dumps(output)
    await emit_reading(sink, ctx, ProbeReading("cgroup", {}, output, None, made), sequences)
    await emit_reading(sink, ctx, ProbeReading("cgroup", {}, output), sequences)
    first, second = sink.events
    assert made in first.to_json()
    assert first.to_json() == reference(first)
    assert first.to_json().replace(first.id.encode(), second.id.encode()).replace(
        b'"cellosseq":1,', b'"cellosseq":2,'
    ) == second.to_json().replace(second.time.encode(), first.time.encode())
    # the cell's attribution: one object for the stream's events, what a gap names
    assert first.attribution is second.attribution
    assert first.attribution == {
        "cellId": "a",
        "hostId": HOST,
        "runId": "r",
        "specSignatureHash": "h",
    }
