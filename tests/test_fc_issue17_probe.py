"""The fc_metrics probe against what a metrics stream holds besides one line per flush.

An oversize line, two objects on one line, lines carrying Firecracker
main's ``id``/``properties``: written by the test into the VM's FIFO, made
from the emulated VMM's own metrics (so its accounts stay the truth), in
Firecracker's compact form; and a new Firecracker process writing the same
regular file from its start.
"""

from __future__ import annotations

import fcntl
import os
import random
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from cellos_probed.probes import fc_metrics
from cellos_probed.probes.fc_metrics import MetricsFollower
from cellos_probed.probes.fc_metrics_parse import MAX_LINE_BYTES, MetricsAccumulator
from testbed.fc_emulator import open_emulator
from testbed.fc_emulator.vm import EmulatedVm
from tests.conftest import poll_until
from tests.fc_helpers import events_of, fc_config, last_output, minus, published, short_root
from tests.probing import running


@pytest.fixture
def fc_root() -> Iterator[Path]:
    yield from short_root()


def own_line(vm: EmulatedVm, labels: dict[str, Any] | None = None) -> bytes:
    """The line the VMM's flush would write now (no newline), counted as delivered;
    ``labels`` where Firecracker main puts ``id`` and ``properties``: right after
    ``utc_timestamp_ms``."""
    obj, deltas = vm.metrics.build_line(time.time_ns() // 1_000_000)
    vm.metrics.commit(deltas, None, True)
    if labels:
        obj = {"utc_timestamp_ms": obj.pop("utc_timestamp_ms"), **labels, **obj}
    return orjson.dumps(obj)


def fifo_of(vm: EmulatedVm) -> tuple[Path, int]:
    """The VM's FIFO, and a write end of it opened as Firecracker opens it (never blocks)."""
    path = vm.spec.metrics_path
    assert path is not None
    return path, os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def pipe_bytes(fd: int) -> int:
    held = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, held)
    return int.from_bytes(held, "little")


#: no newline in it, nor a line start
JUNK = b"x" * (10 * 1024 * 1024)


async def write_junk(path: Path, written: trio.Event) -> None:
    """JUNK into a FIFO by a writer that blocks while the pipe is full."""
    blocking = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        await trio.to_thread.run_sync(os.write, blocking, JUNK)
    finally:
        os.close(blocking)
    written.set()


async def test_an_oversize_line_is_a_parse_error_while_it_is_drained(fc_root: Path) -> None:
    # metrics not configured: its flushes write nothing, so nothing lands inside the junk
    with trio.fail_after(60):
        async with open_emulator(fc_root) as emulator:
            await emulator.add(emulator.spec("cell-1", metrics_path=None))
            path = emulator.spec("cell-1").metrics_path  # where the probe looks
            assert path is not None
            os.mkfifo(path)
            fifo = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            async with (
                running(fc_config(fc_root, ["cell-1"])) as prober,
                trio.open_nursery() as nursery,
            ):
                written = trio.Event()
                nursery.start_soon(write_junk, path, written)
                await poll_until(lambda: pipe_bytes(fifo) > 0)
                errors = []
                tick = 0
                while not written.is_set() or pipe_bytes(fifo):
                    await prober.tick(tick)
                    tick += 1
                    errors.append(events_of(prober, "cell-1")[-1])
                await prober.tick(tick)  # all of it drained, and still no end to the line
                errors.append(events_of(prober, "cell-1")[-1])
            os.close(fifo)
    assert {event["type"] for event in errors} == {"probe_error"}
    # until the probe has read more of it than a line may hold, it is only a line
    # without its end yet, and nothing arrived; from then on, and to its end, parse
    kinds = [event["error"]["kind"] for event in errors]
    cut = kinds.index("parse")
    assert set(kinds[:cut]) <= {"io"}
    assert set(kinds[cut:]) == {"parse"}
    assert len(kinds) - cut >= 2
    assert errors[cut]["error"]["message"] == (
        f"a metrics line longer than {MAX_LINE_BYTES} bytes was cut; "
        "no whole line has followed it yet"
    )


async def test_the_line_after_an_oversize_one_is_read(
    fc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ticks far apart: the junk is drained between them, so no flush writes inside it
    monkeypatch.setattr(fc_metrics, "BACKGROUND_DRAIN_SECONDS", 0.01)
    with trio.fail_after(60):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            path, fifo = fifo_of(vm)
            async with (
                running(fc_config(fc_root, ["cell-1"], tick=3600)) as prober,
                trio.open_nursery() as nursery,
            ):
                await prober.tick(0)
                written = trio.Event()
                nursery.start_soon(write_junk, path, written)
                await written.wait()
                await poll_until(lambda: pipe_bytes(fifo) == 0)
                vm.metrics.bump_everything(random.Random(1))
                await prober.tick(1)  # its flush's line follows the junk, no newline between
                output = last_output(prober, "cell-1")
                assert output["totals"] == published(vm.emitted_totals())
            os.close(fifo)
    assert output["lines"] == 1
    assert output["unparsed_lines"] == 1  # the cut line


async def test_a_flush_refused_while_an_oversize_line_is_drained_is_a_parse_error(
    fc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the pipe full of the runaway line: the VMM's write fails, the flush is refused
    monkeypatch.setattr(fc_metrics, "BACKGROUND_DRAIN_SECONDS", 0.01)
    with trio.fail_after(60):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            path, fifo = fifo_of(vm)
            async with (
                running(fc_config(fc_root, ["cell-1"], tick=3600)) as prober,
                trio.open_nursery() as nursery,
            ):
                await prober.tick(0)
                written = trio.Event()
                nursery.start_soon(write_junk, path, written)
                await written.wait()
                await poll_until(lambda: pipe_bytes(fifo) == 0)
                vm.inject_full_pipe()
                await prober.tick(1)
                refused = events_of(prober, "cell-1")[-1]
                await prober.tick(2)
                output = last_output(prober, "cell-1")
                assert output["totals"] == published(vm.emitted_totals())
            os.close(fifo)
    assert refused["type"] == "probe_error"
    assert refused["error"]["kind"] == "parse"


async def test_two_objects_on_one_line_are_both_summed(fc_root: Path) -> None:
    # a full pipe can swallow the newline alone: the next object follows the first's brace
    rng = random.Random(2)
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            _, fifo = fifo_of(vm)
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                await prober.tick(0)
                vm.metrics.bump_everything(rng)
                first = own_line(vm)
                vm.metrics.bump_everything(rng)
                os.write(fifo, first + own_line(vm) + b"\n")
                vm.metrics.bump_everything(rng)
                await prober.tick(1)
                output = last_output(prober, "cell-1")
                assert output["totals"] == published(vm.emitted_totals())
            os.close(fifo)
    assert output["lines"] == 3  # the two, then the flush's own line
    assert output["torn_lines"] == 0  # nothing of either was lost


LABELS = {
    "id": "cell-1",
    "properties": {"bundle_id": 'fn-"abc"', "customer_id": "1234", "note": "Zoë\n\\"},
}


async def test_id_and_properties_are_named_never_summed(fc_root: Path) -> None:
    rng = random.Random(3)
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            _, fifo = fifo_of(vm)
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                await prober.tick(0)
                outputs = []
                for tick in range(1, 4):
                    vm.metrics.bump_everything(rng)
                    os.write(fifo, b"".join(own_line(vm, LABELS) + b"\n" for _ in range(tick)))
                    await prober.tick(tick)
                    outputs.append(last_output(prober, "cell-1"))
                await prober.tick(4)  # no line with them
                plain = last_output(prober, "cell-1")
                assert plain["totals"] == published(vm.emitted_totals())
            os.close(fifo)
    for output in outputs:
        assert output["metrics_id"] == "cell-1"
        assert output["metrics_properties"] == LABELS["properties"]
        for sums in (output["delta"], output["totals"]):
            assert "id" not in sums
            assert "properties" not in sums
    assert [output["lines"] for output in outputs] == [2, 3, 4]  # and the flush's line
    assert "metrics_id" not in plain
    assert "metrics_properties" not in plain


async def test_a_new_firecracker_on_the_same_regular_file_is_read_from_its_start(
    fc_root: Path,
) -> None:
    """Firecracker opens the file without O_TRUNC or O_APPEND: a new process for the
    same VM writes from offset 0 over the old lines, which the probe had read to
    their end; the new lines are read from the file's start, the old ones not again."""
    rng = random.Random(7)
    with trio.fail_after(30):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1", transport="file"))
            history = vm.emitted_totals()  # the boot line, written before the probe looked
            config = fc_config(fc_root, ["cell-1"], transport="file")
            async with running(config) as prober:
                for tick in range(8):  # old lines: more than the new process writes at first
                    vm.metrics.bump_everything(rng)
                    await prober.tick(tick)
                for restart in (1, 2):
                    vm.metrics.bump_everything(rng)
                    await emulator.restart(vm, new_id=f"cell-1-{restart}")
                    first = 10 * restart
                    for tick in range(first, first + 9):  # over the old lines, then past them
                        vm.metrics.bump_everything(rng)
                        if tick % 4 == 3:  # Firecracker's own timer, between ticks
                            vm.periodic_flush()
                        await prober.tick(tick)
                        output = last_output(prober, "cell-1")
                        if tick == first:  # the old exit line, the new boot and flush lines
                            assert output["lines"] == 3
                        assert output["totals"] == published(minus(vm.emitted_totals(), history))
                        assert output["torn_lines"] == 0
                    assert output["instance"]["id"] == f"cell-1-{restart}"


def small_line(timestamp: int, x: int, y: int) -> bytes:
    return b'{"utc_timestamp_ms":%d,"a":{"x":%d,"y":%d}}\n' % (timestamp, x, y)


def test_a_line_read_while_it_is_written_over_an_old_one_costs_no_more_than_itself(
    tmp_path: Path,
) -> None:
    """A new writer's line caught half written over an old line of other lengths can
    splice with the old one's end into a valid line: the reader's offset then falls
    inside the writer's next line, which is lost, not every line after it."""
    path = tmp_path / "metrics.ndjson"
    path.touch()
    accumulator = MetricsAccumulator()
    follower = MetricsFollower(str(path), accumulator)
    follower.ensure_open()
    flags = os.O_RDWR | os.O_CLOEXEC  # Firecracker's: no O_TRUNC, no O_APPEND
    old = os.open(path, flags)
    for timestamp, y in ((100, 1), (101, 1), (102, 100000), (103, 1), (104, 1)):
        os.write(old, small_line(timestamp, 1, y))
    os.close(old)
    follower.drain()
    assert accumulator.records == 5
    new = os.open(path, flags)  # a new process: from offset 0
    os.write(new, small_line(200, 2, 1) + small_line(201, 2, 1))  # the old lines' lengths
    follower.drain()
    assert accumulator.records == 7  # the old line after them is not read again
    third = small_line(202, 2, 1)  # 5 bytes shorter than the old line under it
    cut = third.index(b',"y"')
    os.write(new, third[:cut])
    follower.drain()  # that and the old line's end: a valid line
    assert accumulator.records == 8
    os.write(new, third[cut:] + small_line(203, 2, 1))
    follower.drain()  # the offset is inside the fourth: refused, and nothing after it
    assert accumulator.records == 8
    os.write(new, small_line(204, 2, 1))
    follower.drain()
    assert accumulator.records == 9
    os.write(new, small_line(205, 2, 1) + small_line(206, 2, 1))
    follower.drain()
    os.close(new)
    assert accumulator.records == 11
    reading = accumulator.take_reading()
    assert reading.utc_timestamp_ms == 206
    assert reading.torn_lines == 0
    follower.close()
