"""The outbox: bounded, ordered, and every drop declared by a gap event."""

from __future__ import annotations

import orjson
import pytest

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.outbox import Outbox
from cellos_probed.probes import (
    ProbeContext,
    ProbeReading,
    SequenceRegistry,
    build_host_probe_envelope,
)

#: readings with made-up inputs and output: what is checked here is the outbox and its gaps
pytestmark = pytest.mark.made_up_readings

PREFIX = "p.v1"


def reading(sequences: SequenceRegistry, cell: str, probe: str = "cgroup") -> CloudEvent:
    ctx = ProbeContext(cell, f"run-{cell}", "sha256:x")
    return build_host_probe_envelope(ctx, ProbeReading(f"host.{probe}", {}, {"n": 1}), sequences)


def test_in_order_and_confirmed_batches_leave() -> None:
    sequences = SequenceRegistry(host_id="host-a")
    outbox = Outbox(PREFIX, sequences.boot_id, max_events=10, max_bytes=1 << 20)
    events = [reading(sequences, "a") for _ in range(5)]
    for event in events:
        assert outbox.put(event) == []
    batch = outbox.batch(3)
    assert [orjson.loads(e.payload)["cellosseq"] for e in batch] == [1, 2, 3]
    assert batch[0].subject == "p.v1.cgroup.host-a.a"
    assert batch[0].payload == events[0].to_json()  # serialised once, re-sent as is
    outbox.confirm(batch)
    assert len(outbox) == 2
    assert [orjson.loads(e.payload)["cellosseq"] for e in outbox.batch(10)] == [4, 5]


def test_a_full_buffer_drops_the_oldest_and_declares_exactly_them() -> None:
    sequences = SequenceRegistry(host_id="host-a")
    outbox = Outbox(PREFIX, sequences.boot_id, max_events=4, max_bytes=1 << 20)
    for _ in range(3):
        outbox.put(reading(sequences, "a"))
        outbox.put(reading(sequences, "b", "tap_link"))
    # six events into four places: a#1 and b#1 went
    assert outbox.dropped == 2
    sealed = outbox.seal_gaps()
    assert [(g.attribution["cellId"], g.probe_source, g.first, g.last) for g in sealed] == [
        ("a", "host.cgroup", 1, 1),
        ("b", "host.tap_link", 1, 1),
    ]
    for _ in range(3):
        outbox.put(reading(sequences, "a"))  # pushes out a#2, b#2, a#3
    sealed = outbox.seal_gaps()
    assert sorted((g.attribution["cellId"], g.first, g.last) for g in sealed) == [
        ("a", 2, 3),
        ("b", 2, 2),
    ]
    batch = [orjson.loads(e.payload) for e in outbox.batch(100)]
    gaps = [e for e in batch if e["type"].endswith(".gap")]
    readings = [e for e in batch if not e["type"].endswith(".gap")]
    # gap events go first, never dropped; each names its range and reason
    assert batch[: len(gaps)] == gaps
    assert [
        (g["data"]["cellId"], g["data"]["firstSequence"], g["data"]["lastSequence"]) for g in gaps
    ] == [("a", 1, 1), ("b", 1, 1), ("a", 2, 3), ("b", 2, 2)]
    gap = gaps[2]
    assert gap["type"] == "dev.cellos.events.cell.observability.host.v1.gap"
    assert gap["cellosagentboot"] == sequences.boot_id
    assert "cellosseq" not in gap
    assert gap["data"]["dropped"] == 2
    assert gap["data"]["reason"] == "buffer_full"
    assert gap["data"]["runId"] == "run-a"
    assert gap["data"]["probeSource"] == "host.cgroup"
    # what is left plus what was declared is every sequence, once
    kept = {(e["data"]["cellId"], e["cellosseq"]) for e in readings}
    declared = {
        (g["data"]["cellId"], seq)
        for g in gaps
        for seq in range(g["data"]["firstSequence"], g["data"]["lastSequence"] + 1)
    }
    assert kept.isdisjoint(declared)
    assert kept | declared == {("a", n) for n in range(1, 7)} | {("b", n) for n in range(1, 4)}


def test_the_byte_bound_holds() -> None:
    sequences = SequenceRegistry(host_id="host-a")
    size = len(reading(SequenceRegistry(host_id="host-a"), "a").to_json())
    outbox = Outbox(PREFIX, sequences.boot_id, max_events=1000, max_bytes=size * 3 + 2)
    for _ in range(10):
        outbox.put(reading(sequences, "a"))
    assert outbox.bytes <= size * 3 + 2  # cellosseq 10 is a byte longer than 1
    assert len(outbox) == 3
    assert outbox.dropped == 7


def test_entries_dropped_while_a_batch_was_in_flight_are_not_confirmed_twice() -> None:
    sequences = SequenceRegistry(host_id="host-a")
    outbox = Outbox(PREFIX, sequences.boot_id, max_events=3, max_bytes=1 << 20)
    for _ in range(3):
        outbox.put(reading(sequences, "a"))
    in_flight = outbox.batch(2)  # a#1, a#2 on their way
    for _ in range(2):
        outbox.put(reading(sequences, "a"))  # a#1, a#2 pushed out meanwhile
    outbox.confirm(in_flight)
    left = [orjson.loads(e.payload)["cellosseq"] for e in outbox.batch(10)]
    assert left == [3, 4, 5]


def test_an_entry_pushed_out_while_its_batch_is_in_flight_is_lost_only_if_the_batch_fails() -> None:
    """The batch being published may still arrive: declaring its pushed-out entries
    at once named readings that did arrive (a gap over delivered sequences)."""
    for outcome in ("confirmed", "failed"):
        sequences = SequenceRegistry(host_id="host-a")
        outbox = Outbox(PREFIX, sequences.boot_id, max_events=3, max_bytes=1 << 20)
        for _ in range(3):
            outbox.put(reading(sequences, "a"))
        in_flight = outbox.batch(2)  # sequences 1 and 2 on their way
        assert outbox.put(reading(sequences, "a")) == []  # pushes 1 out: held, not declared
        assert outbox.put(reading(sequences, "a")) == []  # and 2
        assert outbox.dropped == 0
        assert not outbox.has_open_gaps()
        if outcome == "confirmed":
            outbox.confirm(in_flight)  # they arrived: nothing is missing
            assert outbox.dropped == 0
            assert outbox.seal_gaps() == []
        else:
            (gap,) = outbox.batch_failed()  # they did not: now they are lost, and declared
            assert (gap.first, gap.last, gap.reason) == (1, 2, "buffer_full")
            assert outbox.dropped == 2
            assert [g.last for g in outbox.seal_gaps()] == [2]
        # an entry not in flight is declared at once, as before
        before = outbox.dropped
        outbox.put(reading(sequences, "a"))  # pushes 3 out
        assert outbox.dropped == before + 1
        assert outbox.has_open_gaps()
        held = [e.sequence for e in outbox.batch(10) if e.sequence is not None]
        assert held == [4, 5, 6]
