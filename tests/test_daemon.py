"""The daemon in-process: repeated errors logged once, reload that keeps state."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from cellos_probed.batching import ThreadBatcher
from cellos_probed.cloudevent import CloudEvent
from cellos_probed.config import load_config
from cellos_probed.daemon import DaemonHandle, Prober, ProbeServices, TickCount, run_daemon
from cellos_probed.probes import CapturingSink, SequenceRegistry
from cellos_probed.probes import cgroup as cgroup_probe
from testbed.cgroup_tree import FakeCgroup


class RunnableSink(CapturingSink):
    """A capturing sink with the lifecycle the daemon expects of a network sink."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = trio.Event()

    def emit_nowait(self, event: CloudEvent) -> None:
        super().emit_nowait(event)
        self.changed.set()
        self.changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def drain(self, timeout: float) -> bool:
        return True

    def of(self, cell: str) -> list[CloudEvent]:
        return [e for e in self.events if e.data.get("cellId") == cell]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()

    async def wait_for(self, count: int, cell: str) -> None:
        while sum(e.data.get("cellId") == cell for e in self.events) < count:
            await self.changed.wait()


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def write_config(path: Path, root: Path, cells: list[str], tick: float = 0.05) -> Path:
    text = f'[daemon]\ntick_seconds = {tick}\nhost_id = "host-a"\n[paths]\ncgroup_root = "{root}"\n'
    for cell in cells:
        text += (
            f'[[cell]]\nid = "{cell}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
            f'[cell.cgroup]\npath = "{cell}"\n'
        )
    path.write_text(text)
    return path


async def test_a_failure_repeated_every_tick_is_logged_once(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.toml", tmp_path, ["late"]))
    prober = Prober(config, CapturingSink(), SequenceRegistry())
    with capture_logs() as logs, trio.fail_after(10):
        for _ in range(3):
            await prober.tick()
        FakeCgroup(tmp_path / "late").write()  # the cell's cgroup appears
        for _ in range(2):
            await prober.tick()
    failed = [entry for entry in logs if entry["event"] == "probe failed"]
    recovered = [entry for entry in logs if entry["event"] == "probe recovered"]
    assert len(failed) == 1
    assert failed[0]["kind"] == "io"
    assert len(recovered) == 1
    assert prober.probe_stats.errors == 3
    assert prober.probe_stats.readings == 2


async def test_a_thousand_cells_failing_at_once_log_a_bounded_number_of_lines(
    tmp_path: Path,
) -> None:
    cells = [f"c{i}" for i in range(300)]
    # a tick long enough that a loaded test machine reads 300 cells inside the timeout
    config = load_config(write_config(tmp_path / "c.toml", tmp_path, cells, tick=10.0))
    prober = Prober(config, CapturingSink(), SequenceRegistry())
    with capture_logs() as logs, trio.fail_after(20):
        await prober.tick()  # every cgroup missing: 300 failures
        for cell in cells:
            FakeCgroup(tmp_path / cell).write()
        await prober.tick()  # every one recovered
    failed = [entry for entry in logs if entry["event"] == "probe failed"]
    recovered = [entry for entry in logs if entry["event"] == "probe recovered"]
    summaries = [entry for entry in logs if entry["event"].startswith("more probes failed")]
    assert len(failed) == 20
    assert len(recovered) == 20
    assert [s["failed"] for s in summaries] == [{"cgroup": 280}, {}]
    assert [s["recovered"] for s in summaries] == [{}, {"cgroup": 280}]
    # every event is still there: only the log is bounded
    assert prober.probe_stats.errors == 300
    assert prober.probe_stats.readings == 300


async def test_cgroup_files_read_after_the_timeout_are_published_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # more chunks (of 128) than worker threads (4): the last chunks wait for a thread
    cells = [f"c{i}" for i in range(700)]
    for cell in cells:
        FakeCgroup(tmp_path / cell).write()
    text = write_config(tmp_path / "c.toml", tmp_path, cells, tick=1.0).read_text()
    config = load_config(
        write_text(
            tmp_path / "c.toml", text.replace("[paths]", "probe_timeout_seconds = 0.1\n[paths]")
        )
    )
    real = cgroup_probe.fetch_and_parse

    def slow(*args: Any) -> Any:  # a busy host: every chunk's thread is late
        time.sleep(0.002)
        return real(*args)

    monkeypatch.setattr(cgroup_probe, "fetch_and_parse", slow)
    shared = ProbeServices(TickCount())
    shared.cgroups.batcher = ThreadBatcher(trio.CapacityLimiter(4), chunk_size=128)
    prober = Prober(config, CapturingSink(), SequenceRegistry(), shared)
    with trio.fail_after(20):
        started = trio.current_time()
        await prober.tick()
        elapsed = trio.current_time() - started
    assert elapsed > 0.1  # the reads outlasted the timeout...
    # ...and every chunk that was read is a reading; the chunks still waiting
    # for a thread when the timeout came were never read: those are timeouts.
    # Four chunks got the four threads: which four is the scheduler's choice
    # (trio shuffles its run queue), the last chunk holding the odd 60 cells
    read = prober.probe_stats.readings
    assert read in (4 * 128, 3 * 128 + 700 % 128)
    assert prober.probe_stats.errors == 700 - read
    assert prober.probe_stats.errors_by_kind == {"timeout": 700 - read}


async def test_reload_keeps_unchanged_cells_and_their_state(tmp_path: Path) -> None:
    for cell in ("a", "b", "c"):
        FakeCgroup(tmp_path / cell).write()
    path = write_config(tmp_path / "c.toml", tmp_path, ["a", "b"])
    sink = RunnableSink()
    sequences = SequenceRegistry()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            handle: DaemonHandle = await nursery.start(
                lambda task_status: run_daemon(
                    load_config(path), sink, config_path=str(path), sequences=sequences,
                    handle_signals=False, task_status=task_status,
                )
            )  # fmt: skip
            await sink.wait_for(3, "a")
            runner_a = handle.prober.cells["a"]
            # a: unchanged; b: removed; c: added
            write_config(path, tmp_path, ["a", "c"])
            handle.reload()
            await sink.wait_for(2, "c")
            assert handle.prober.cells["a"] is runner_a
            count_b = sum(e.data.get("cellId") == "b" for e in sink.events)
            await sink.wait_for(sum(e.data.get("cellId") == "a" for e in sink.events) + 2, "a")
            # a broken config changes nothing
            path.write_text("[daemon]\ntick_seconds = 'soon'\n")
            handle.reload()
            await sink.wait_for(sum(e.data.get("cellId") == "a" for e in sink.events) + 3, "a")
            assert set(handle.prober.cells) == {"a", "c"}
            handle.stop()
    seq_a = [(e.cellosseq or 0) for e in sink.events if e.data.get("cellId") == "a"]
    assert seq_a == list(range(1, len(seq_a) + 1))  # no restart, no hole
    assert sum(e.data.get("cellId") == "b" for e in sink.events) == count_b  # b stopped
    deltas_a = [e.data["output"]["deltas"] for e in sink.events if e.data.get("cellId") == "a"]
    assert deltas_a[0] is None
    assert all(d is not None for d in deltas_a[1:])  # the baseline survived the reload
    assert {e.cellosagentboot for e in sink.events} == {sequences.boot_id}
