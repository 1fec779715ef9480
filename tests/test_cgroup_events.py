"""Readings at the moment the kernel signals a change of ``cgroup.events`` or
``memory.events``: outside the tick, coalesced, in the same count and deltas.

The daemon runs whole here (``run_daemon``, its tick, its services); the
kernel's signals come from a real cgroup on this host's cgroup2 (the last
process killed) and from fixture files the test writes in place.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.config import load_config
from cellos_probed.daemon import DaemonHandle, run_daemon
from cellos_probed.probes import SequenceRegistry
from cellos_probed.tail import format_event
from testbed.cgroup_tree import FakeCgroup, flat_keyed
from tests.conftest import needs_root, poll_until
from tests.test_daemon import RunnableSink


class TimedSink(RunnableSink):
    """Every event with the moment it was handed over."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list[float] = []

    def emit_nowait(self, event: CloudEvent) -> None:
        self.arrived.append(trio.current_time())
        super().emit_nowait(event)

    def readings(self, cell: str = "cell-1") -> list[tuple[float, dict[str, Any]]]:
        """(arrival, output) of the cell's cgroup readings, in order of arrival."""
        return [
            (at, event.data["output"])
            for at, event in zip(self.arrived, self.events, strict=True)
            if event.data.get("cellId") == cell and event.type.endswith(".cgroup")
        ]

    def triggered(self, trigger: str, cell: str = "cell-1") -> list[tuple[float, dict[str, Any]]]:
        return [(at, out) for at, out in self.readings(cell) if out.get("trigger") == trigger]


def config_text(root: Path, cells: dict[str, str], tick: float) -> str:
    text = f'[daemon]\ntick_seconds = {tick}\nhost_id = "host-a"\n[paths]\ncgroup_root = "{root}"\n'
    for cell, path in cells.items():
        text += (
            f'[[cell]]\nid = "{cell}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
            f'[cell.cgroup]\npath = "{path}"\n'
        )
    return text


@asynccontextmanager
async def daemon(
    tmp_path: Path, root: Path, cells: dict[str, str], tick: float, sink: TimedSink
) -> AsyncIterator[DaemonHandle]:
    path = tmp_path / "cellos.toml"
    path.write_text(config_text(root, cells, tick))
    async with trio.open_nursery() as nursery:
        handle: DaemonHandle = await nursery.start(
            lambda task_status: run_daemon(
                load_config(path), sink, config_path=str(path), sequences=SequenceRegistry(),
                handle_signals=False, task_status=task_status,
            )
        )  # fmt: skip
        yield handle
        nursery.cancel_scope.cancel()


def write_in_place(path: Path, text: str) -> None:
    """One write at offset 0 of the same file: what kernfs does, one IN_MODIFY
    (a rename would be a new file, not a change of the watched one)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, text.encode(), 0)
    finally:
        os.close(fd)


def memory_events(oom_kill: int) -> str:
    # fixed width: a read beside a write sees digits of one value or the other,
    # never a line of another length
    return flat_keyed({"low": 0, "high": 0, "max": 0, "oom": 0}) + f"oom_kill {oom_kill:04d}\n"


def watched_inodes(fd: int) -> set[int]:
    """The inodes an inotify descriptor watches, as the kernel lists them."""
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    return {
        int(field.removeprefix("ino:"), 16)
        for line in text.splitlines()
        if line.startswith("inotify ")
        for field in line.split()
        if field.startswith("ino:")
    }


@needs_root
async def test_the_last_process_killed_gives_the_final_reading_within_200_ms(
    real_cgroup: Path, tmp_path: Path
) -> None:
    sink = TimedSink()
    sleeper = await trio.lowlevel.open_process(["sleep", "1000"], stdin=subprocess.DEVNULL)
    try:
        (real_cgroup / "cgroup.procs").write_text(str(sleeper.pid))
        with trio.fail_after(15):
            cells = {"cell-1": real_cgroup.name}
            async with daemon(tmp_path, real_cgroup.parent, cells, 5.0, sink):
                await sink.wait_until(lambda: bool(sink.triggered("tick")))
                killed_at = trio.current_time()
                sleeper.kill()
                await sink.wait_until(lambda: bool(sink.triggered("cgroup.events")))
                (arrived, output), *_ = sink.triggered("cgroup.events")
                assert arrived - killed_at < 0.2
                assert output["cgroup_events"]["populated"] == 0
                assert output["final"] is True
                assert "cgroup.events" not in output["missing"]
                assert len(sink.triggered("tick")) == 1  # it came between ticks
    finally:
        sleeper.kill()
        with trio.fail_after(5):
            await sleeper.wait()


@needs_root
async def test_a_cgroup_filled_again_and_emptied_again_has_a_final_reading_each_time(
    real_cgroup: Path, tmp_path: Path
) -> None:
    sink = TimedSink()
    with trio.fail_after(15):
        async with daemon(tmp_path, real_cgroup.parent, {"cell-1": real_cgroup.name}, 1.0, sink):
            await sink.wait_until(lambda: bool(sink.triggered("tick")))
            for round_ in (1, 2):
                sleeper = await trio.lowlevel.open_process(["sleep", "1000"])
                try:
                    (real_cgroup / "cgroup.procs").write_text(str(sleeper.pid))

                    def seen(populated: int, count: int = round_) -> bool:
                        return [
                            out["cgroup_events"]["populated"]
                            for _, out in sink.triggered("cgroup.events")
                        ].count(populated) >= count

                    await sink.wait_until(lambda: seen(1))
                finally:
                    sleeper.kill()
                    await sleeper.wait()
                await sink.wait_until(lambda: seen(0))
    signalled = [out for _, out in sink.triggered("cgroup.events")]
    assert [out["cgroup_events"]["populated"] for out in signalled] == [1, 0, 1, 0]
    assert [out.get("final", False) for out in signalled] == [False, True, False, True]
    # a tick reading does not read cgroup.events: only the kernel's signal does
    assert all("cgroup_events" not in out for _, out in sink.triggered("tick"))


async def test_a_fixture_memory_events_changed_gives_a_reading_at_once(tmp_path: Path) -> None:
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.write()
    (cgroup.path / "memory.events").write_text(memory_events(0))
    sink = TimedSink()
    with trio.fail_after(15):
        async with daemon(tmp_path, tmp_path, {"cell-1": "cell-1"}, 5.0, sink):
            await sink.wait_until(lambda: bool(sink.triggered("tick")))
            changed_at = trio.current_time()
            write_in_place(cgroup.path / "memory.events", memory_events(1))
            await sink.wait_until(lambda: bool(sink.triggered("memory.events")))
            (arrived, output), *_ = sink.triggered("memory.events")
            assert arrived - changed_at < 0.2
            assert output["memory_events"]["oom_kill"] == 1
            assert output["deltas"]["memory_events"]["oom_kill"] == 1
            # the fixture has no cgroup.events: read, and said to be missing
            assert "cgroup.events" in output["missing"]
            assert "final" not in output
            assert len(sink.triggered("tick")) == 1


async def test_a_storm_of_changes_is_coalesced_and_its_last_state_is_read(
    tmp_path: Path,
) -> None:
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.write()
    (cgroup.path / "memory.events").write_text(memory_events(0))
    sink = TimedSink()
    tick = 1.0
    with trio.fail_after(15):
        async with daemon(tmp_path, tmp_path, {"cell-1": "cell-1"}, tick, sink):
            await sink.wait_until(lambda: bool(sink.triggered("tick")))
            started = trio.current_time()
            for count in range(1, 501):  # 500 writes in about 50 ms
                write_in_place(cgroup.path / "memory.events", memory_events(count))
                if count % 10 == 0:
                    await trio.sleep(0.001)
            storm = trio.current_time() - started
            await sink.wait_until(
                lambda: any(
                    out["memory_events"]["oom_kill"] == 500
                    for _, out in sink.triggered("memory.events")
                )
            )
            # the state after the storm is what the last signalled reading read
            extra = sink.triggered("memory.events")
            assert extra[-1][1]["memory_events"]["oom_kill"] == 500
    # one reading at the start, then at most one each tick / 10
    assert len(extra) <= 1 + int(storm // (tick / 10)) + 1
    assert len(extra) < 10


async def test_signalled_readings_share_the_cellosseq_count_and_the_deltas_with_the_tick(
    tmp_path: Path,
) -> None:
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.write()
    (cgroup.path / "memory.events").write_text(memory_events(0))
    sink = TimedSink()
    with trio.fail_after(20):
        async with daemon(tmp_path, tmp_path, {"cell-1": "cell-1"}, 0.2, sink):
            await sink.wait_until(lambda: bool(sink.triggered("tick")))
            for count in range(1, 101):  # changes for about a second, ticks among them
                write_in_place(cgroup.path / "memory.events", memory_events(count))
                await trio.sleep(0.01)
            await sink.wait_until(
                lambda: sink.readings()[-1][1]["memory_events"]["oom_kill"] == 100
            )
    events = [e for e in sink.events if e.data.get("cellId") == "cell-1"]
    assert all(e.type.endswith(".cgroup") for e in events)
    triggers = {e.data["output"]["trigger"] for e in events}
    assert triggers == {"tick", "memory.events"}
    # in the order they were sent, one count without holes, each reading's
    # deltas taken from the one numbered before it
    assert [e.cellosseq for e in events] == list(range(1, len(events) + 1))
    previous = None
    for event in events:
        output = event.data["output"]
        oom_kill = output["memory_events"]["oom_kill"]
        if previous is None:
            assert output["deltas"] is None
        else:
            assert output["deltas"]["reset"] is False
            assert output["deltas"]["memory_events"]["oom_kill"] == oom_kill - previous
        previous = oom_kill


async def test_a_removed_cell_s_watch_goes_and_a_recreated_directory_is_watched_anew(
    tmp_path: Path,
) -> None:
    for cell in ("cell-1", "cell-2"):
        FakeCgroup(tmp_path / cell).write()
        (tmp_path / cell / "memory.events").write_text(memory_events(0))
    sink = TimedSink()
    path = tmp_path / "cellos.toml"
    with trio.fail_after(20):
        cells = {"cell-1": "cell-1", "cell-2": "cell-2"}
        async with daemon(tmp_path, tmp_path, cells, 0.2, sink) as handle:
            await sink.wait_until(lambda: bool(sink.triggered("tick", "cell-2")))
            fd = handle.prober.services.kernfs_watch.fileno()
            assert fd is not None
            inode = {cell: os.stat(tmp_path / cell / "memory.events").st_ino for cell in cells}
            assert watched_inodes(fd) == set(inode.values())

            # cell-2 removed: its watch goes with it
            path.write_text(config_text(tmp_path, {"cell-1": "cell-1"}, 0.2))
            handle.reload()
            await poll_until(lambda: watched_inodes(fd) == {inode["cell-1"]})
            seen = len(sink.readings("cell-2"))
            write_in_place(tmp_path / "cell-2" / "memory.events", memory_events(1))

            # cell-1's directory removed and made again: the new file is watched
            FakeCgroup(tmp_path / "new").write()
            (tmp_path / "new" / "memory.events").write_text(memory_events(0))
            new_inode = os.stat(tmp_path / "new" / "memory.events").st_ino
            for name in os.listdir(tmp_path / "cell-1"):
                os.unlink(tmp_path / "cell-1" / name)
            os.rmdir(tmp_path / "cell-1")
            os.rename(tmp_path / "new", tmp_path / "cell-1")
            await sink.wait_until(
                lambda: any((out["deltas"] or {}).get("reset") for _, out in sink.triggered("tick"))
            )
            assert watched_inodes(fd) == {new_inode}
            write_in_place(tmp_path / "cell-1" / "memory.events", memory_events(7))
            await sink.wait_until(lambda: bool(sink.triggered("memory.events")))
            (_, output), *_ = sink.triggered("memory.events")
            assert output["memory_events"]["oom_kill"] == 7
            assert len(sink.readings("cell-2")) == seen  # nothing more of the removed cell


@needs_root
async def test_a_real_cgroup_made_again_is_watched_anew(real_cgroup: Path, tmp_path: Path) -> None:
    """kernfs keeps a removed cgroup's watched inode while the watch holds it: the
    watch goes when the probe finds the directory gone, not by the kernel's hand."""
    sink = TimedSink()
    with trio.fail_after(15):
        async with daemon(
            tmp_path, real_cgroup.parent, {"cell-1": real_cgroup.name}, 0.2, sink
        ) as handle:
            await sink.wait_until(lambda: bool(sink.triggered("tick")))
            fd = handle.prober.services.kernfs_watch.fileno()
            assert fd is not None
            assert watched_inodes(fd) == {os.stat(real_cgroup / "cgroup.events").st_ino}
            await trio.Path(real_cgroup).rmdir()
            await trio.Path(real_cgroup).mkdir()
            await sink.wait_until(
                lambda: any((out["deltas"] or {}).get("reset") for _, out in sink.triggered("tick"))
            )
            assert watched_inodes(fd) == {os.stat(real_cgroup / "cgroup.events").st_ino}
            sleeper = await trio.lowlevel.open_process(["sleep", "1000"])
            try:
                (real_cgroup / "cgroup.procs").write_text(str(sleeper.pid))
                await sink.wait_until(lambda: bool(sink.triggered("cgroup.events")))
            finally:
                sleeper.kill()
                await sleeper.wait()
    (_, output), *_ = sink.triggered("cgroup.events")
    assert output["cgroup_events"]["populated"] == 1


def test_tail_shows_what_triggered_a_reading_and_that_it_is_final() -> None:
    event: dict[str, Any] = {
        "type": "dev.cellos.events.cell.observability.host.v1.cgroup",
        "time": "2026-11-25T10:15:02.123Z",
        "cellosseq": 9,
        "data": {
            "hostId": "host-a",
            "cellId": "cell-1",
            "probeSource": "host.cgroup",
            "output": {
                "cgroup_events": {"populated": 0, "frozen": 0},
                "missing": [],
                "deltas": None,
                "trigger": "cgroup.events",
                "final": True,
            },
        },
    }
    assert format_event(event).endswith("#9 on cgroup.events populated 0 FINAL")
    event["data"]["output"] = {"missing": [], "deltas": None, "trigger": "tick"}
    assert format_event(event).endswith("#9")
