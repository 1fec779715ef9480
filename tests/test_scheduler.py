"""The tick on trio's mock clock: no drift, skipped overruns, timeouts that isolate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.config import CellConfig, Config, DaemonSettings, NatsSettings, PathRoots
from cellos_probed.daemon import Prober
from cellos_probed.probes import ProbeContext, ProbeParseError, ProbeReading, SequenceRegistry
from cellos_probed.probes.base import HostProbe
from cellos_probed.readings import ProbeError, ProbeResult
from cellos_probed.scheduler import TickStats, run_fixed_tick
from cellos_probed.sinks import EventSink


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_no_drift_over_a_thousand_ticks(autojump_clock: trio.testing.MockClock) -> None:
    starts: list[float] = []
    stats = TickStats()
    done = trio.Event()

    async def tick(index: int) -> None:
        starts.append(trio.current_time())
        await trio.sleep(0.37)  # work that takes a good part of the tick
        if len(starts) == 1000:
            done.set()

    with trio.fail_after(2000):
        async with trio.open_nursery() as nursery:
            origin = trio.current_time()
            await nursery.start(run_fixed_tick, 1.0, tick, stats)
            await done.wait()
            nursery.cancel_scope.cancel()
    offsets = [start - origin - k for k, start in enumerate(starts[:1000])]
    assert max(abs(offset) for offset in offsets) < 1e-6
    assert stats.overruns == 0
    assert stats.skipped_ticks == 0


async def test_an_overrun_skips_the_missed_ticks_and_counts_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[tuple[int, float]] = []
    stats = TickStats()
    done = trio.Event()

    async def tick(index: int) -> None:
        seen.append((index, trio.current_time()))
        if index == 3:
            await trio.sleep(2.5)  # runs through the deadlines at 4 and 5
        if len(seen) == 6:
            done.set()

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            origin = trio.current_time()
            await nursery.start(run_fixed_tick, 1.0, tick, stats)
            await done.wait()
            nursery.cancel_scope.cancel()
    assert [(index, round(at - origin, 6)) for index, at in seen[:6]] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (6, 6.0), (7, 7.0),
    ]  # fmt: skip
    assert stats.overruns == 1
    assert stats.skipped_ticks == 2


class FakeProbe(HostProbe):
    """Each its own batch (the default key), read after ``delay`` (None: never)."""

    def __init__(self, name: str, delay: float | None, fail: bool = False) -> None:
        self.name = name
        self.delay = delay
        self.fail = fail
        self.cancelled = False

    def probe_name(self) -> str:
        return self.name

    def inputs(self) -> dict[str, Any]:
        return {"fake": self.name}

    @classmethod
    async def read_batch(
        cls,
        jobs: Sequence[tuple[ProbeContext, FakeProbe]],
        results: list[ProbeResult | None],
    ) -> None:
        for i, (_, probe) in enumerate(jobs):
            try:
                results[i] = await probe.read()
            except ProbeError as error:
                results[i] = error

    async def read(self) -> ProbeReading:
        try:
            if self.delay is None:
                await trio.sleep_forever()
            await trio.sleep(self.delay)
        except trio.Cancelled:
            self.cancelled = True
            raise
        if self.fail:
            raise ProbeParseError("bad cpu.stat")
        return ProbeReading(f"host.{self.name}", self.inputs(), {"at": trio.current_time()})


class TimedSink(EventSink):
    def __init__(self) -> None:
        self.events: list[tuple[float, CloudEvent]] = []

    def emit_nowait(self, event: CloudEvent) -> None:
        self.events.append((trio.current_time(), event))


def config_with(cells: list[str]) -> Config:
    return Config(
        "<test>",
        DaemonSettings(tick_seconds=1.0, probe_timeout_seconds=0.5, host_id="h"),
        PathRoots(cgroup_root=None),
        NatsSettings(),
        tuple(CellConfig(cell, "run", "sha256:x") for cell in cells),
    )


@pytest.mark.made_up_readings
async def test_a_hung_probe_times_out_and_delays_nobody(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = TimedSink()
    prober = Prober(config_with(["hung", "fast", "slow"]), sink, SequenceRegistry())
    hung = FakeProbe("cgroup", delay=None)
    prober.cells["hung"].probes = [hung, FakeProbe("tap_link", delay=0.0)]
    prober.cells["fast"].probes = [FakeProbe("cgroup", delay=0.0)]
    prober.cells["slow"].probes = [FakeProbe("cgroup", delay=0.3, fail=True)]

    two_ticks = trio.Event()

    async def tick(index: int) -> None:
        await prober.tick(index)
        if index == 1:
            two_ticks.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            origin = trio.current_time()
            await nursery.start(run_fixed_tick, 1.0, tick, prober.tick_stats)
            await two_ticks.wait()
            nursery.cancel_scope.cancel()

    first_tick = [(round(at - origin, 6), e) for at, e in sink.events if at - origin < 1.0]
    by_cell = {(e.data["cellId"], e.data["probeSource"]): (at, e) for at, e in first_tick}
    at, event = by_cell[("hung", "host.cgroup")]
    assert at == 0.5
    assert event.kind == "probe_error"
    assert event.data["error"] == {
        "kind": "timeout",
        "message": "cgroup probe did not finish within 0.5s",
    }
    assert event.data["inputs"] == {"fake": "cgroup"}
    assert hung.cancelled
    # the other probes were not held back by the hung one
    assert by_cell[("hung", "host.tap_link")][0] == 0.0
    assert by_cell[("fast", "host.cgroup")][0] == 0.0
    slow_at, slow = by_cell[("slow", "host.cgroup")]
    assert slow_at == 0.3
    assert slow.data["error"] == {"kind": "parse", "message": "bad cpu.stat"}
    # the second tick started on its deadline
    second = sorted(round(at - origin, 6) for at, _ in sink.events if at - origin >= 1.0)
    assert second[0] == 1.0
    assert prober.tick_stats.overruns == 0
    assert [e.cellosseq for _, e in sink.events if e.data["cellId"] == "hung"].count(2) == 2


@pytest.mark.made_up_readings
async def test_a_sink_that_takes_events_without_waiting_gets_every_probe_event_so() -> None:
    class NoWaitSink(EventSink):
        def __init__(self) -> None:
            self.taken: list[CloudEvent] = []

        async def emit(self, event: CloudEvent) -> None:
            raise AssertionError("the tick's probe events go through emit_nowait")

        def emit_nowait(self, event: CloudEvent) -> None:
            self.taken.append(event)

    sink = NoWaitSink()
    prober = Prober(config_with(["ok", "bad"]), sink, SequenceRegistry())
    prober.cells["ok"].probes = [FakeProbe("cgroup", delay=0.0)]
    prober.cells["bad"].probes = [FakeProbe("cgroup", delay=0.0, fail=True)]
    with trio.fail_after(5):
        await prober.tick(0)
    assert sorted((e.data["cellId"], e.kind) for e in sink.taken) == [
        ("bad", "probe_error"),
        ("ok", "cgroup"),
    ]
