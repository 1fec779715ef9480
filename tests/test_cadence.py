"""A cadence per probe: ``every_ticks`` reads a probe every N base ticks, on the base grid.

A cell's probe with ``every_ticks = N`` is read on the ticks whose index is
``crc32(cell id) % N`` modulo N (its phase), and on the daemon's first tick;
a probe due on a tick an overrun skipped is read on the next tick that runs.
"""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path

import pytest
import trio
import trio.testing

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.config import Config, load_config
from cellos_probed.daemon import DaemonHandle, Prober, run_daemon
from cellos_probed.probes import ProbeReading, SequenceRegistry
from cellos_probed.scheduler import run_fixed_tick
from testbed.cgroup_tree import FakeCgroup
from tests.test_daemon import RunnableSink
from tests.test_scheduler import FakeProbe, TimedSink


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def phase(cell: str, every: int) -> int:
    return zlib.crc32(cell.encode()) % every


def write_config(
    path: Path,
    root: Path,
    cells: dict[str, int | None],
    *,
    tick: float = 1.0,
    agent_every: int = 10,
    tap_link: bool = True,
) -> Config:
    """Cells with a cgroup probe (``[probes.cgroup] every_ticks = 3``, or the cell's own
    ``every_ticks`` where given) and, with ``tap_link``, a TAP probe read every tick."""
    text = (
        f'[daemon]\ntick_seconds = {tick}\nhost_id = "h"\n'
        f"agent_event_every_ticks = {agent_every}\n"
        f'[paths]\ncgroup_root = "{root}"\n[probes.cgroup]\nevery_ticks = 3\n'
    )
    for cell, every in cells.items():
        text += f'[[cell]]\nid = "{cell}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
        text += f'[cell.cgroup]\npath = "{cell}"\n'
        if every is not None:
            text += f"every_ticks = {every}\n"
        if tap_link:
            text += f'[cell.tap_link]\ninterface = "tap-{cell}"\n'
    path.write_text(text)
    return load_config(path)


class WedgedProbe(FakeProbe):
    """A TAP probe whose nth read cannot be cancelled for a while (a read in a thread
    the probe timeout cannot abandon): the tick overruns."""

    def __init__(self, wedges: dict[int, float]) -> None:
        super().__init__("tap_link", delay=0.0)
        self.wedges = wedges
        self.reads = 0

    async def read(self) -> ProbeReading:
        seconds = self.wedges.get(self.reads, 0.0)
        self.reads += 1
        with trio.CancelScope(shield=True):
            await trio.sleep(seconds)
        return await super().read()


async def run_ticks(prober: Prober, count: int) -> float:
    """``count`` ticks of ``prober`` on the fixed tick; the schedule's origin."""
    done = trio.Event()
    ran = 0

    async def tick(index: int) -> None:
        nonlocal ran
        await prober.tick(index)
        ran += 1
        if ran == count:
            done.set()

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            origin = trio.current_time()
            await nursery.start(run_fixed_tick, prober.config.daemon.tick_seconds, tick,
                                prober.tick_stats)  # fmt: skip
            await done.wait()
            nursery.cancel_scope.cancel()
    return origin


def read_at(sink: TimedSink, origin: float, cell: str, probe: str) -> list[float]:
    return [
        round(at - origin, 6)
        for at, event in sink.events
        if event.data["cellId"] == cell and event.kind == probe
    ]


def fake_probes(prober: Prober, wedged: dict[str, WedgedProbe] | None = None) -> None:
    for cell_id, cell in prober.cells.items():
        tap = (wedged or {}).get(cell_id) or FakeProbe("tap_link", delay=0.0)
        cell.probes = [FakeProbe("cgroup", delay=0.0), tap]


@pytest.mark.made_up_readings
async def test_a_probe_is_read_every_n_ticks_on_its_phase_and_a_cell_may_override_n(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    assert (phase("a", 3), phase("g", 3), phase("b", 2)) == (0, 1, 1)
    # a and g take [probes.cgroup] every_ticks = 3; b's own table says 2
    config = write_config(tmp_path / "c.toml", tmp_path, {"a": None, "g": None, "b": 2})
    sink = TimedSink()
    prober = Prober(config, sink, SequenceRegistry())
    fake_probes(prober)
    origin = await run_ticks(prober, 10)
    every_tick = [float(t) for t in range(10)]
    for cell in ("a", "g", "b"):
        assert read_at(sink, origin, cell, "tap_link") == every_tick
    # the first tick reads every probe; then each on its phase
    assert read_at(sink, origin, "a", "cgroup") == [0, 3, 6, 9]
    assert read_at(sink, origin, "g", "cgroup") == [0, 1, 4, 7]
    assert read_at(sink, origin, "b", "cgroup") == [0, 1, 3, 5, 7, 9]
    # a reading's sequence counts that probe's readings: no hole for the ticks between
    slow = [e.cellosseq for _, e in sink.events if e.data["cellId"] == "a" and e.kind == "cgroup"]
    assert slow == [1, 2, 3, 4]
    assert prober.tick_stats.ticks == 10


@pytest.mark.made_up_readings
async def test_a_probe_due_on_a_tick_an_overrun_skipped_is_read_on_the_next_tick(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    assert (phase("a", 3), phase("g", 3), phase("b", 3)) == (0, 1, 2)
    config = write_config(tmp_path / "c.toml", tmp_path, {"a": None, "g": None, "b": None})
    sink = TimedSink()
    prober = Prober(config, sink, SequenceRegistry())
    # a's 4th TAP read (t = 3) runs to 4.5: the tick at 4 is skipped; its 9th
    # (t = 9) runs to 12.5: 10, 11 and 12 are skipped
    fake_probes(prober, {"a": WedgedProbe({3: 1.5, 8: 3.5})})
    origin = await run_ticks(prober, 13)
    assert read_at(sink, origin, "g", "tap_link") == [0, 1, 2, 3, 5, 6, 7, 8, 9, 13, 14, 15, 16]
    assert prober.tick_stats.skipped_ticks == 4
    # the grid holds: g's tick 4 is read at 5; after the long overrun every phase
    # was skipped, so every cell is read at 13, then on its phase again
    assert read_at(sink, origin, "a", "cgroup") == [0, 3, 6, 9, 13, 15]
    assert read_at(sink, origin, "g", "cgroup") == [0, 1, 5, 7, 13, 16]
    assert read_at(sink, origin, "b", "cgroup") == [0, 2, 5, 8, 13, 14]


@pytest.mark.made_up_readings
async def test_a_reload_that_changes_a_cells_every_ticks_changes_the_cell(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "c.toml", tmp_path, {"a": None, "b": None})
    prober = Prober(config, TimedSink(), SequenceRegistry())
    changes = prober.apply(write_config(tmp_path / "c.toml", tmp_path, {"a": None, "b": 5}))
    assert changes["changed"] == ["b"]  # new probes: b's next reading is a first one
    assert changes["kept"] == ["a"]


def ticks_of(events: list[CloudEvent]) -> list[tuple[int, list[CloudEvent]]]:
    """The daemon's ticks in its events, with an agent event after every tick: each
    tick's index (``skippedTicks`` of the agent event before it tells how many deadlines
    were skipped by then) and the readings it made."""
    ticks: list[tuple[int, list[CloudEvent]]] = []
    readings: list[CloudEvent] = []
    skipped = 0
    for event in events:
        if event.kind != "agent":
            readings.append(event)
            continue
        assert event.data["ticks"] == len(ticks) + 1
        ticks.append((len(ticks) + skipped, readings))
        skipped, readings = event.data["skippedTicks"], []
    return ticks


async def run_real_daemon(config: Config, sink: RunnableSink, ticks: int) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            handle: DaemonHandle = await nursery.start(
                lambda task_status: run_daemon(
                    config, sink, handle_signals=False, task_status=task_status
                )
            )
            await sink.wait_until(
                lambda: any(e.kind == "agent" and e.data["ticks"] >= ticks for e in sink.events)
            )
            handle.stop()


async def test_the_daemon_reads_cgroup_fixture_trees_on_their_cadence(tmp_path: Path) -> None:
    cells = {"a": None, "g": None, "b": 2, "fast": 1}
    for cell in cells:
        FakeCgroup(tmp_path / cell).write()
    config = write_config(
        tmp_path / "c.toml", tmp_path, cells, tick=0.1, agent_every=1, tap_link=False
    )
    sink = RunnableSink()
    await run_real_daemon(config, sink, 12)
    ticks = ticks_of(sink.events)
    assert len(ticks) >= 12
    for cell, own in cells.items():
        every = own or 3
        read = [index for index, readings in ticks
                if any(e.data["cellId"] == cell for e in readings)]  # fmt: skip
        # due: the first tick, and every tick that is, or follows one skipped that was,
        # on the cell's phase
        due = [ticks[0][0]] + [
            index
            for (before, _), (index, _) in itertools.pairwise(ticks)
            if any(t % every == phase(cell, every) for t in range(before + 1, index + 1))
        ]
        assert read == due, cell
        sequence = [e.cellosseq for e in sink.of(cell)]
        assert sequence == list(range(1, len(sequence) + 1))
        assert all(e.kind == "cgroup" for e in sink.of(cell))
    assert len(sink.of("a")) < len(sink.of("fast"))


async def test_agent_events_come_every_agent_event_every_ticks_base_ticks(
    tmp_path: Path,
) -> None:
    for cell in ("a", "g"):
        FakeCgroup(tmp_path / cell).write()
    config = write_config(
        tmp_path / "c.toml", tmp_path, {"a": None, "g": None}, tick=0.05, agent_every=2,
        tap_link=False,
    )  # fmt: skip
    sink = RunnableSink()
    await run_real_daemon(config, sink, 12)
    agent = [e.data["ticks"] for e in sink.events if e.kind == "agent"]
    assert agent[:6] == [2, 4, 6, 8, 10, 12]
    # probes read every third tick do not slow the daemon's own figures
    assert len(sink.of("a")) < agent[5] // 2
