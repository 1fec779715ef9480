"""Property test: whatever the bounds and the order of puts and confirmations, every
sequence is either delivered or declared by a gap event, never both, never neither."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellos_probed.outbox import Outbox
from cellos_probed.probes import SequenceRegistry
from cellos_probed.spool import SpoolOutbox
from tests.test_outbox import reading

#: readings with made-up inputs and output: what is checked here is the outbox and its gaps
pytestmark = pytest.mark.made_up_readings

actions = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(["a", "b", "c"])),
        st.tuples(st.just("send"), st.integers(1, 7)),
    ),
    max_size=120,
)


def drive(outbox: Any, sequences: SequenceRegistry, steps: list[tuple[str, object]]) -> None:
    """Play ``steps`` against ``outbox``, drain it, and check the promise."""
    delivered: list[dict[str, Any]] = []
    produced: dict[str, int] = {}
    for action, arg in steps:
        if action == "put":
            cell = str(arg)
            outbox.put(reading(sequences, cell))
            produced[cell] = produced.get(cell, 0) + 1
        else:
            outbox.seal_gaps()
            batch = outbox.batch(int(str(arg)))
            delivered += [orjson.loads(entry.payload) for entry in batch]
            outbox.confirm(batch)
    outbox.seal_gaps()
    while batch := outbox.batch(50):
        delivered += [orjson.loads(entry.payload) for entry in batch]
        outbox.confirm(batch)
    got = [(e["data"]["cellId"], e["cellosseq"]) for e in delivered if "cellosseq" in e]
    declared = [
        (e["data"]["cellId"], n)
        for e in delivered
        if str(e["type"]).endswith(".gap")
        for n in range(e["data"]["firstSequence"], e["data"]["lastSequence"] + 1)
    ]
    assert len(got) == len(set(got))  # nothing twice
    assert not set(got) & set(declared)  # nothing both delivered and declared lost
    everything = {(cell, n) for cell, count in produced.items() for n in range(1, count + 1)}
    assert set(got) | set(declared) == everything
    assert len(declared) == outbox.dropped
    for cell in produced:  # per cell, delivered readings keep their order
        order = [n for c, n in got if c == cell]
        assert order == sorted(order)


@settings(max_examples=300, deadline=None)
@given(actions, st.integers(10, 30))
def test_every_sequence_is_delivered_or_declared(
    steps: list[tuple[str, object]], bound: int
) -> None:
    sequences = SequenceRegistry()
    drive(Outbox("p", sequences.boot_id, max_events=bound, max_bytes=1 << 30), sequences, steps)


@settings(max_examples=150, deadline=None)
@given(actions, st.integers(10, 30))
def test_the_spool_keeps_the_same_promise(steps: list[tuple[str, object]], bound: int) -> None:
    sequences = SequenceRegistry()
    size = len(reading(SequenceRegistry(), "a").to_json()) + 200
    with tempfile.TemporaryDirectory() as directory:
        spool = SpoolOutbox(
            Path(directory), "p", sequences.boot_id, max_bytes=size * bound, segment_bytes=size * 4
        )
        try:
            drive(spool, sequences, steps)
        finally:
            spool.close()
