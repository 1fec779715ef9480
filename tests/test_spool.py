"""The disk spool: accepted records survive restarts, confirmed ones go, overflow is declared."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from cellos_probed.probes import SequenceRegistry
from cellos_probed.spool import SpoolOutbox
from tests.test_outbox import reading

#: readings with made-up inputs and output: what is checked here is the outbox and its gaps
pytestmark = pytest.mark.made_up_readings

PREFIX = "p.v1"


def sequence_of(entries: list) -> list[tuple[str, int | str]]:  # type: ignore[type-arg]
    out = []
    for entry in entries:
        event = orjson.loads(entry.payload)
        out.append((event["data"]["cellId"], event.get("cellosseq", "gap")))
    return out


def test_confirmed_records_go_and_the_rest_survive_a_restart(tmp_path: Path) -> None:
    sequences = SequenceRegistry()
    spool = SpoolOutbox(tmp_path, PREFIX, sequences.boot_id, max_bytes=1 << 24)
    events = [reading(sequences, "a") for _ in range(10)]
    for event in events:
        assert spool.put(event) == []
    assert len(spool) == 10
    first = spool.batch(4)
    assert [e.payload for e in first] == [e.to_json() for e in events[:4]]
    spool.confirm(first)
    second = spool.batch(3)  # read but never confirmed: the daemon is killed here
    assert sequence_of(second) == [("a", 5), ("a", 6), ("a", 7)]
    del spool  # no close(): as after kill -9

    restarted = SpoolOutbox(tmp_path, PREFIX, SequenceRegistry().boot_id, max_bytes=1 << 24)
    assert restarted.recovered == 6
    replay = restarted.batch(100)
    # the same bytes, hence the same event ids (Nats-Msg-Id) as before the crash
    assert [e.payload for e in replay] == [e.to_json() for e in events[4:]]
    assert [e.msg_id for e in replay] == [e.id for e in events[4:]]
    restarted.confirm(replay)
    assert len(restarted) == 0
    restarted.close()
    again = SpoolOutbox(tmp_path, PREFIX, SequenceRegistry().boot_id, max_bytes=1 << 24)
    assert again.recovered == 0
    assert again.batch(10) == []


def test_a_torn_record_from_a_crash_mid_write_is_cut(tmp_path: Path) -> None:
    sequences = SequenceRegistry()
    spool = SpoolOutbox(tmp_path, PREFIX, sequences.boot_id, max_bytes=1 << 24)
    for _ in range(3):
        spool.put(reading(sequences, "a"))
    spool.close()
    segment = sorted(tmp_path.glob("seg-*.spool"))[-1]
    size = segment.stat().st_size
    with segment.open("ab") as handle:
        handle.write(b"\x00\x00\x00\x07\x00\x00\x10\x00half a rec")  # header says 4096 bytes
    restarted = SpoolOutbox(tmp_path, PREFIX, sequences.boot_id, max_bytes=1 << 24)
    assert restarted.recovered == 3
    assert segment.stat().st_size == size
    assert sequence_of(restarted.batch(10)) == [("a", 1), ("a", 2), ("a", 3)]


def test_confirmed_segments_are_deleted_so_the_spool_does_not_grow(tmp_path: Path) -> None:
    sequences = SequenceRegistry()
    spool = SpoolOutbox(tmp_path, PREFIX, sequences.boot_id, max_bytes=1 << 24, segment_bytes=4096)
    for _ in range(20):
        for _ in range(25):
            spool.put(reading(sequences, "a"))
        while batch := spool.batch(10):
            spool.confirm(batch)
    files = list(tmp_path.glob("seg-*.spool"))
    assert len(files) <= 2
    assert sum(f.stat().st_size for f in files) < 2 * 4096 + 2048
    assert len(spool) == 0


def test_overflow_drops_the_oldest_segment_and_declares_it(tmp_path: Path) -> None:
    sequences = SequenceRegistry()
    size = len(reading(SequenceRegistry(), "a").to_json())
    spool = SpoolOutbox(
        tmp_path, PREFIX, sequences.boot_id, max_bytes=size * 40, segment_bytes=size * 10
    )
    gaps = []
    for _ in range(60):
        gaps += spool.put(reading(sequences, "a"))
        gaps += spool.put(reading(sequences, "b", "tap_link"))
    assert spool.dropped > 0
    assert spool.bytes <= size * 40 + size * 12
    spool.seal_gaps()
    entries = spool.batch(1000)
    events = [orjson.loads(e.payload) for e in entries]
    declared: set[tuple[str, int]] = set()
    for gap in (e for e in events if e["type"].endswith(".gap")):
        assert gap["data"]["reason"] == "spool_full"
        assert gap["cellosagentboot"] == sequences.boot_id
        first, last = gap["data"]["firstSequence"], gap["data"]["lastSequence"]
        assert gap["data"]["dropped"] == last - first + 1
        declared |= {(gap["data"]["cellId"], n) for n in range(first, last + 1)}
    kept = {(e["data"]["cellId"], e["cellosseq"]) for e in events if "cellosseq" in e}
    assert kept.isdisjoint(declared)
    assert kept | declared == {(c, n) for c in ("a", "b") for n in range(1, 61)}
    assert len(declared) == spool.dropped


def test_gap_events_are_carried_forward_not_dropped(tmp_path: Path) -> None:
    sequences = SequenceRegistry()
    size = len(reading(SequenceRegistry(), "a").to_json())
    spool = SpoolOutbox(
        tmp_path, PREFIX, sequences.boot_id, max_bytes=size * 20, segment_bytes=size * 5
    )
    for _ in range(30):
        spool.put(reading(sequences, "a"))
    spool.seal_gaps()  # a gap event is now in the newest segment
    for _ in range(60):  # ... which in turn becomes the oldest and is dropped
        spool.put(reading(sequences, "a"))
    spool.seal_gaps()
    events = [orjson.loads(e.payload) for e in spool.batch(1000)]
    declared = set()
    for gap in (e for e in events if e["type"].endswith(".gap")):
        first, last = gap["data"]["firstSequence"], gap["data"]["lastSequence"]
        declared |= set(range(first, last + 1))
    kept = {e["cellosseq"] for e in events if "cellosseq" in e}
    assert kept | declared == set(range(1, 91))
    assert os.listdir(tmp_path)


def _overflow_while_in_flight(tmp_path: Path) -> tuple[SpoolOutbox, list, SequenceRegistry]:  # type: ignore[type-arg]
    """A batch taken from the oldest segment, then enough put to drop that segment."""
    sequences = SequenceRegistry()
    size = len(reading(SequenceRegistry(), "a").to_json())
    spool = SpoolOutbox(
        tmp_path, PREFIX, sequences.boot_id, max_bytes=size * 20, segment_bytes=size * 5
    )
    for _ in range(5):
        spool.put(reading(sequences, "a"))
    in_flight = spool.batch(3)  # being published ...
    for _ in range(40):  # ... while the spool fills and drops its oldest segment
        spool.put(reading(sequences, "a"))
    assert spool.dropped > 0
    return spool, in_flight, sequences


def _declared(entries: list) -> set[int]:  # type: ignore[type-arg]
    out: set[int] = set()
    for event in (orjson.loads(e.payload) for e in entries):
        if event["type"].endswith(".gap"):
            out |= set(range(event["data"]["firstSequence"], event["data"]["lastSequence"] + 1))
    return out


def test_records_in_flight_when_their_segment_is_dropped_are_not_declared_if_they_arrive(
    tmp_path: Path,
) -> None:
    spool, in_flight, _ = _overflow_while_in_flight(tmp_path)
    assert sequence_of(in_flight) == [("a", 1), ("a", 2), ("a", 3)]
    spool.confirm(in_flight)  # they arrived
    spool.seal_gaps()
    rest = spool.batch(1000)
    declared = _declared(rest)
    kept = {int(s) for _, s in sequence_of(rest) if s != "gap"}
    assert {1, 2, 3}.isdisjoint(declared)  # delivered, so never declared lost
    assert kept.isdisjoint(declared)
    assert kept | declared | {1, 2, 3} == set(range(1, 46))
    assert len(declared) == spool.dropped


def test_records_in_flight_when_their_segment_is_dropped_are_declared_if_the_batch_fails(
    tmp_path: Path,
) -> None:
    spool, _, _ = _overflow_while_in_flight(tmp_path)
    # not delivered, and their segment is gone: lost now, declared
    assert all(gap.reason == "spool_full" for gap in spool.batch_failed())
    spool.seal_gaps()
    rest = spool.batch(1000)
    declared = _declared(rest)
    kept = {int(s) for _, s in sequence_of(rest) if s != "gap"}
    assert {1, 2, 3} <= declared
    assert kept.isdisjoint(declared)
    assert kept | declared == set(range(1, 46))
    assert len(declared) == spool.dropped
