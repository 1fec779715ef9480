"""Issue 17, emulator: the last line of a VMM that panics or gets a fatal signal.

Firecracker's panic hook (``src/firecracker/src/main.rs``) stores
``vmm.panic_count = 1`` and writes the metrics before aborting; its fatal
signal handlers (``src/vmm/src/signal_handler.rs``) store the signal's flag
(``seccomp.num_faults`` for SIGSYS) and write the metrics before ``_exit``.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from testbed.fc_emulator import open_emulator
from tests.fc_helpers import events_of, fc_config, short_root
from tests.probing import running


@pytest.fixture
def fc_root() -> Iterator[Path]:
    yield from short_root()


def open_reader(path: Path | None) -> int:
    """A FIFO's reading end, held open: a pipe's data dies with its last fd."""
    assert path is not None
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def read_lines(fd: int) -> list[dict[str, dict[str, int]]]:
    try:
        data = os.read(fd, 1 << 20)
    except BlockingIOError:
        return []
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


async def test_a_panic_writes_one_last_line_with_panic_count_and_the_vmm_is_gone(
    fc_root: Path,
) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm")
            vm = await emulator.add(spec)
            fd = open_reader(spec.metrics_path)
            try:
                vm.metrics.add("vcpu", "exit_io_in", 3)
                await vm.crash("panic")
                lines = read_lines(fd)
                with pytest.raises(ConnectionRefusedError):  # a stale socket
                    await trio.open_unix_socket(str(spec.api_socket))
                await vm.stop(clean=True)  # already gone: no exit line
                assert read_lines(fd) == []
            finally:
                os.close(fd)
    assert [why for why, _ in vm.flushes] == ["boot", "panic"]
    last = lines[-1]
    assert last["vmm"]["panic_count"] == 1
    assert last["vcpu"]["exit_io_in"] == 3
    assert set(last["signals"].values()) == {0}


@pytest.mark.parametrize(
    ("signum", "section", "field"),
    [
        (signal.SIGBUS, "signals", "sigbus"),
        (signal.SIGSEGV, "signals", "sigsegv"),
        (signal.SIGXFSZ, "signals", "sigxfsz"),
        (signal.SIGXCPU, "signals", "sigxcpu"),
        (signal.SIGHUP, "signals", "sighup"),
        (signal.SIGILL, "signals", "sigill"),
        (signal.SIGSYS, "seccomp", "num_faults"),
    ],
)
async def test_a_fatal_signal_writes_one_last_line_with_its_flag(
    fc_root: Path, signum: signal.Signals, section: str, field: str
) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm")
            vm = await emulator.add(spec)
            fd = open_reader(spec.metrics_path)
            try:
                await vm.crash(signum)
                boot, last = read_lines(fd)
            finally:
                os.close(fd)
    assert boot[section][field] == 0
    assert last[section][field] == 1
    flags = {name: value for name, value in last["signals"].items() if name != field}
    assert set(flags.values()) == {0}
    assert last["vmm"]["panic_count"] == 0


async def test_a_crash_before_boot_still_writes_a_line_when_metrics_are_configured(
    fc_root: Path,
) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm", boot=False)
            vm = await emulator.add(spec)
            fd = open_reader(spec.metrics_path)
            try:
                await vm.crash(signal.SIGSEGV)
                lines = read_lines(fd)
            finally:
                os.close(fd)
    assert [line["signals"]["sigsegv"] for line in lines] == [1]


async def test_signals_without_a_handler_are_not_a_crash_with_a_line(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("vm"))
            with pytest.raises(ValueError, match="SIGTERM has no handler"):
                await vm.crash(signal.SIGTERM)


async def test_the_probes_last_reading_of_a_vm_that_panicked_carries_its_last_line(
    fc_root: Path,
) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                await prober.tick(0)
                vm.metrics.add("vcpu", "exit_io_in", 4)
                await vm.crash("panic")
                await prober.tick(1)
                await prober.tick(2)
                events = events_of(prober, "cell-1")
    kinds = [event["type"] for event in events]
    # the reading after the crash carries the last line; the tick after, with no
    # line left, says the VMM is gone
    assert kinds == ["fc_metrics", "fc_metrics", "probe_error"], kinds
    last = events[1]["output"]
    assert last["totals"]["vmm"]["panic_count"] == 1
    assert last["totals"]["vcpu"]["exit_io_in"] == 4
    assert events[2]["error"]["kind"] == "io"
