"""The fc_metrics probe against the Firecracker emulator.

Lines written between ticks wait in the FIFO for the next tick (or for the
cell's background drain, which the tests await by its record count, never
by a sleep).
"""

from __future__ import annotations

import fcntl
import os
import random
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import patch

import pytest
import trio

from cellos_probed.probes import fc_metrics
from cellos_probed.probes.fc_exchange import MAX_OWED_ROUNDS
from cellos_probed.probes.fc_metrics import READ_BYTES, MetricsFollower
from cellos_probed.probes.fc_metrics_parse import MetricsAccumulator
from testbed.fc_emulator import open_emulator
from tests.conftest import poll_until
from tests.fc_helpers import (
    counters_only,
    events_of,
    fc_config,
    fc_probe,
    last_output,
    minus,
    published,
    short_root,
)
from tests.probing import running


@pytest.fixture
def fc_root() -> Iterator[Path]:
    yield from short_root()


async def test_totals_equal_the_vmms_true_counts_after_many_ticks(fc_root: Path) -> None:
    rng = random.Random(5)
    with trio.fail_after(30):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1", nets=("eth0", "eth1")))
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                previous: dict[tuple[str, ...], int] = {}
                for tick in range(25):
                    vm.metrics.bump_everything(rng)
                    if tick % 3 == 0:  # Firecracker's own timer fires between ticks
                        vm.periodic_flush()
                        vm.metrics.bump_everything(rng)
                    await prober.tick(tick)
                    output = last_output(prober, "cell-1")
                    assert output["lines"] == (3 if tick == 0 else 2 if tick % 3 == 0 else 1)
                    counters = counters_only(output["totals"])
                    assert all(counters[leaf] >= value for leaf, value in previous.items())
                    previous = counters
                # exactly what the lines carried, field by field, gauges included
                assert output["totals"] == published(vm.emitted_totals())
                true = vm.true_counts()
                # ... and what happened: the probe's GET / (the first reading's, then
                # one every INSTANCE_REFRESH_READS) each show in the line of a later
                # flush; one asked this very tick is in the next line, not yet read
                if fc_probe(prober, "cell-1")._asked_instance:
                    true["get_api_requests"]["instance_info_count"] -= 1
                assert output["totals"] == published(true)
    assert output["instance"] == {"id": "cell-1", "state": "Running", "vmm_version": "1.16.1"}
    assert output["torn_lines"] == 0
    assert output["lost_lines"] == 0
    assert output["totals"]["net"]["rx_bytes_count"] == (
        output["totals"]["net_eth0"]["rx_bytes_count"]
        + output["totals"]["net_eth1"]["rx_bytes_count"]
    )


async def test_vms_started_together_refresh_their_instance_on_different_ticks(
    fc_root: Path,
) -> None:
    # GET / every INSTANCE_REFRESH_READS readings: all on one tick, that tick
    # would take two round trips per VM; each VM starts at its own phase
    cells = [f"cell-{i}" for i in range(30)]
    asked_per_tick: list[int] = []
    with trio.fail_after(30):
        async with open_emulator(fc_root) as emulator:
            for cell in cells:
                await emulator.add(emulator.spec(cell))
            async with running(fc_config(fc_root, cells)) as prober:
                for tick in range(1 + fc_metrics.INSTANCE_REFRESH_READS):
                    await prober.tick(tick)
                    asked_per_tick.append(
                        sum(fc_probe(prober, cell)._asked_instance for cell in cells)
                    )
                    assert prober.probe_stats.errors == 0
    assert asked_per_tick[0] == len(cells)  # the first reading names the instance
    # then each VM asks once in the next INSTANCE_REFRESH_READS readings...
    assert sum(asked_per_tick[1:]) == len(cells)
    # ...spread out, not all at once (30 VMs over 10 ticks: ~3 a tick)
    assert max(asked_per_tick[1:]) <= len(cells) // 3


async def test_delta_is_the_sum_since_the_previous_reading(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                await prober.tick(0)
                vm.metrics.add("net_eth0", "rx_bytes_count", 1000)
                vm.metrics.observe_latency("net_eth0", "tap_write_agg", 70)
                vm.metrics.set_gauge("seccomp", "num_faults", 4)
                vm.periodic_flush()
                vm.metrics.add("net_eth0", "rx_bytes_count", 24)
                vm.metrics.observe_latency("net_eth0", "tap_write_agg", 30)
                await prober.tick(1)
                output = last_output(prober, "cell-1")
                assert output["utc_timestamp_ms"] == vm.last_timestamp_ms
    delta = output["delta"]
    assert output["lines"] == 2
    assert delta["net_eth0"]["rx_bytes_count"] == 1024
    assert delta["net"]["rx_bytes_count"] == 1024
    assert delta["net_eth0"]["tap_write_agg"] == {"min_us": 30, "max_us": 70, "sum_us": 100}
    assert delta["net"]["tap_write_agg"] == {"sum_us": 100}  # min_us, max_us: 0 there
    assert delta["seccomp"]["num_faults"] == 4  # a gauge: the latest, not 8
    assert delta["put_api_requests"]["actions_count"] == 1
    assert delta["get_api_requests"]["instance_info_count"] == 1  # the previous tick's GET /
    assert output["totals"]["put_api_requests"]["actions_count"] == 2
    assert "utc_timestamp_ms" not in delta


async def test_between_far_apart_ticks_the_background_drain_loses_no_line(
    fc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fc_metrics, "BACKGROUND_DRAIN_SECONDS", 0.05)
    rng = random.Random(4)
    with trio.fail_after(20):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            async with running(fc_config(fc_root, ["cell-1"], tick=3600)) as prober:
                probe = fc_probe(prober, "cell-1")
                await prober.tick(0)
                for _ in range(30):  # three times what the FIFO holds, no tick in between
                    records = probe.accumulator.records
                    vm.metrics.bump_everything(rng)
                    written = vm.periodic_flush()
                    assert written is not None
                    assert written.written
                    await poll_until(lambda: probe.accumulator.records > records)  # noqa: B023
                await prober.tick(1)
                output = last_output(prober, "cell-1")
                assert output["totals"] == published(vm.emitted_totals())
    assert output["lines"] == 31
    assert output["lost_lines"] == 0


async def test_full_fifo_before_the_probe_shows_as_loss(fc_root: Path) -> None:
    rng = random.Random(9)
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            missed = 0
            while missed < 3:  # nobody reads: the pipe fills, lines are dropped and counted
                vm.metrics.bump_everything(rng)
                outcome = vm.periodic_flush()
                assert outcome is not None
                missed += not outcome.written
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                await prober.tick(0)
                output = last_output(prober, "cell-1")
                assert output["totals"] == published(vm.emitted_totals())
                # the lines that fit, then the flush's own line
                assert output["lines"] == vm.metrics.lines_written
    assert output["torn_lines"] == 1  # the flush's line, behind a lost line's prefix
    assert output["unparsed_lines"] == 0
    assert output["lost_lines"] == 3
    assert output["totals"]["logger"]["missed_metrics_count"] == 3
    lost = counters_only(vm.lost_totals())
    assert any(value > 0 for value in lost.values())


async def test_flush_refused_for_a_full_pipe_then_the_torn_line_is_recovered(
    fc_root: Path,
) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                await prober.tick(0)
                vm.metrics.bump_everything(random.Random(2))
                vm.inject_full_pipe(after_writes=3)
                await prober.tick(1)
                error = events_of(prober, "cell-1")[-1]
                await prober.tick(2)
                output = last_output(prober, "cell-1")
                assert output["totals"] == published(vm.emitted_totals())
    assert error["type"] == "probe_error"
    assert error["error"] == {
        "kind": "io",
        "message": "FlushMetrics refused: 400 Internal VMM error: Metrics error: "
        "Resource temporarily unavailable (os error 11)",
    }
    assert output["torn_lines"] == 1
    assert output["lines"] == 1
    assert output["lost_lines"] == 0  # the API path does not count a missed line


async def test_hung_api_times_out_alone_within_the_probe_timeout(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            await emulator.add(emulator.spec("cell-1"))
            hung = await emulator.add(emulator.spec("cell-2"))
            config = fc_config(fc_root, ["cell-1", "cell-2"], tick=1.0, timeout=0.3)
            async with running(config) as prober:
                await prober.tick(0)
                hung.hang_api()
                for tick in (1, 2):
                    started = trio.current_time()
                    await prober.tick(tick)
                    assert trio.current_time() - started < 0.3 + 0.15
                    assert events_of(prober, "cell-1")[-1]["type"] == "fc_metrics"
                    error = events_of(prober, "cell-2")[-1]
                    assert error["type"] == "probe_error"
                    assert error["error"]["kind"] == "timeout"
                hung.release_api()
                await prober.tick(3)
                output = last_output(prober, "cell-2")
                assert output["totals"] == published(hung.emitted_totals())
                # a slow VMM is not a broken one: its connection was kept, the
                # late answer read first, no new connection and no new GET /
                assert fc_probe(prober, "cell-2").connection.connections == 1
    # tick 2 asked nothing more of a VMM that still owed tick 1's answer; that
    # flush, answered late, was a line too: nothing was lost
    assert output["lines"] == 2
    assert output["instance"]["id"] == "cell-2"


async def test_a_wedged_api_is_given_up_after_max_owed_rounds(fc_root: Path) -> None:
    with trio.fail_after(15):
        async with open_emulator(fc_root) as emulator:
            hung = await emulator.add(emulator.spec("cell-1"))
            config = fc_config(fc_root, ["cell-1"], tick=1.0, timeout=0.2)
            async with running(config) as prober:
                probe = fc_probe(prober, "cell-1")
                await prober.tick(0)
                hung.hang_api()
                for tick in range(1, MAX_OWED_ROUNDS + 1):
                    await prober.tick(tick)
                    assert probe.connection.sock is not None  # kept: the answer is owed
                    assert probe.connection.owed == tick
                await prober.tick(MAX_OWED_ROUNDS + 1)
                assert probe.connection.sock is None  # given up
                assert events_of(prober, "cell-1")[-1]["error"]["kind"] == "timeout"
                hung.release_api()
                await prober.tick(MAX_OWED_ROUNDS + 2)
                output = last_output(prober, "cell-1")
                assert probe.connection.connections == 2
                assert output["totals"] == published(hung.emitted_totals())


async def test_restart_keeps_totals_monotonic_and_shows_the_new_instance(fc_root: Path) -> None:
    rng = random.Random(3)
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                vm.metrics.bump_everything(rng)
                await prober.tick(0)
                before = last_output(prober, "cell-1")
                vm.metrics.bump_everything(rng)
                await emulator.restart(vm, new_id="cell-1-b", recreate_fifo=True)
                vm.metrics.bump_everything(rng)
                await prober.tick(1)
                after = last_output(prober, "cell-1")
                assert after["totals"] == published(vm.emitted_totals())
    assert before["instance"]["id"] == "cell-1"
    assert after["instance"] == {"id": "cell-1-b", "state": "Running", "vmm_version": "1.16.1"}
    assert after["lines"] == 3  # the old process's exit line, the new one's boot and flush lines
    old, new = counters_only(before["totals"]), counters_only(after["totals"])
    assert all(new[leaf] >= value for leaf, value in old.items())
    assert new[("vcpu", "exit_io_in")] > old[("vcpu", "exit_io_in")]


async def test_an_open_fifo_is_looked_at_again_only_every_trusted_rounds(
    fc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked: list[str] = []
    real_stat = os.stat

    def counting_stat(path: str, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).endswith("metrics.fifo"):
            looked.append(str(path))
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    rng = random.Random(5)
    with trio.fail_after(20):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                for index in range(3):  # the first rounds look: nothing is known yet
                    await prober.tick(index)
                monkeypatch.setattr(os, "stat", counting_stat)
                assert fc_metrics.TRUSTED_ROUNDS == 10
                for index in range(3, 14):
                    vm.metrics.bump_everything(rng)
                    await prober.tick(index)
                monkeypatch.undo()
                assert len(looked) == 1  # ten rounds kept the FIFO as it was, the 11th looked
                assert last_output(prober, "cell-1")["totals"] == published(vm.emitted_totals())


async def test_a_new_vmm_with_a_new_fifo_is_followed_while_the_old_one_was_trusted(
    fc_root: Path,
) -> None:
    with trio.fail_after(20):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                for index in range(4):  # long enough for the open FIFO to be trusted
                    await prober.tick(index)
                await emulator.restart(vm, new_id="cell-1-b", recreate_fifo=True)
                await prober.tick(4)
                after = last_output(prober, "cell-1")
                assert after["instance"]["id"] == "cell-1-b"
                assert after["lines"] == 3  # the old exit line, the new boot and flush lines
                assert after["totals"] == published(vm.emitted_totals())


async def test_vm_errors_are_clear_and_cost_only_that_cell(fc_root: Path) -> None:
    cells = ["ok", "preboot", "gone", "stale", "noline", "nometrics"]
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            await emulator.add(emulator.spec("ok"))
            await emulator.add(emulator.spec("preboot", boot=False))
            gone = await emulator.add(emulator.spec("gone"))
            stale = await emulator.add(emulator.spec("stale"))
            await emulator.add(emulator.spec("noline", metrics_path=None))
            noline = emulator.spec("noline")
            assert noline.metrics_path is not None
            os.mkfifo(noline.metrics_path)  # there, but Firecracker was never told of it
            async with running(fc_config(fc_root, cells)) as prober:
                await gone.stop(clean=False)
                gone.spec.api_socket.unlink()
                await stale.stop(clean=False)  # its socket file stays: connection refused
                await prober.tick(0)
                errors = {cell: events_of(prober, cell)[-1] for cell in cells}
    assert errors.pop("ok")["type"] == "fc_metrics"
    kinds = {cell: event["error"]["kind"] for cell, event in errors.items()}
    assert kinds == dict.fromkeys(errors, "io")
    messages = {cell: event["error"]["message"] for cell, event in errors.items()}
    assert messages == {
        "preboot": "FlushMetrics refused: 400 The requested operation is not supported "
        "before starting the microVM.",
        "gone": "API socket does not exist: the VM is gone (or not started yet)",
        "stale": "API socket refused the connection: the VM is gone (stale socket)",
        "noline": "FlushMetrics answered 204 but no line arrived at metrics_path "
        "(metrics not configured, or configured elsewhere)",
        "nometrics": "metrics path does not exist: "
        f"{fc_root}/firecracker/nometrics/root/metrics.fifo",
    }
    assert errors["gone"]["inputs"] == {
        "api_socket": f"{fc_root}/firecracker/gone/root/run/firecracker.socket",
        "metrics_path": f"{fc_root}/firecracker/gone/root/metrics.fifo",
    }


async def test_regular_file_is_followed_from_its_end_through_truncation(fc_root: Path) -> None:
    rng = random.Random(4)
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1", transport="file"))
            vm.metrics.bump_everything(rng)
            vm.periodic_flush()  # history: written before the probe looked
            history = vm.emitted_totals()
            config = fc_config(fc_root, ["cell-1"], transport="file")
            async with running(config) as prober:
                for tick in range(4):
                    vm.metrics.bump_everything(rng)
                    if tick == 2:  # someone truncates the file; Firecracker writes on at its offset
                        assert vm.spec.metrics_path is not None
                        os.truncate(vm.spec.metrics_path, 0)
                        vm.periodic_flush()
                    await prober.tick(tick)
                    output = last_output(prober, "cell-1")
                assert output["totals"] == published(minus(vm.emitted_totals(), history))
    assert output["torn_lines"] == 0


def test_a_fifo_is_drained_by_reads_until_one_comes_back_short(tmp_path: Path) -> None:
    """A pipe's read takes everything it holds, so a short read ends the drain;
    a full read is followed by another (more may be waiting)."""
    path = tmp_path / "metrics.fifo"
    os.mkfifo(path)
    writer = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 4 * READ_BYTES)  # room for more than one read
    try:
        accumulator = MetricsAccumulator()
        follower = MetricsFollower(str(path), accumulator)
        follower.ensure_open()
        reads: list[int] = []
        real_read = os.read

        def counting_read(fd: int, size: int) -> bytes:
            reads.append(-1)  # a read asked for (EAGAIN raises out of it)
            data = real_read(fd, size)
            reads[-1] = len(data)
            return data

        line = b'{"utc_timestamp_ms":1,"vmm":{"panic_count":0}}\n'
        os.write(writer, line)
        with patch.object(os, "read", counting_read):
            assert follower.drain() == len(line)
        assert reads == [len(line)]  # no second read to learn the pipe is empty
        assert follower.writer_present
        big = line * (READ_BYTES // len(line) + 5)  # more than one read's worth
        assert os.write(writer, big) == len(big)
        reads.clear()
        with patch.object(os, "read", counting_read):
            assert follower.drain() == len(big)
        assert reads == [READ_BYTES, len(big) - READ_BYTES]
        assert accumulator.records == 1 + big.count(b"\n")
        follower.close()
    finally:
        os.close(writer)


async def test_instances_are_asked_before_the_first_tick_which_then_only_flushes(
    fc_root: Path,
) -> None:
    """Prober.prepare asks every VMM's GET /; the first tick's readings name the
    instance without asking it; a VMM not answering then is its tick's to report."""
    cells = [f"cell-{i}" for i in range(20)]
    with trio.fail_after(30):
        async with open_emulator(fc_root) as emulator:
            for cell in cells[:-1]:
                await emulator.add(emulator.spec(cell))
            async with running(fc_config(fc_root, cells)) as prober:
                await prober.prepare()
                assert all(events_of(prober, cell) == [] for cell in cells)  # nothing read
                for cell in cells[:-1]:
                    assert fc_probe(prober, cell)._instance_cache == {
                        "id": cell, "state": "Running", "vmm_version": "1.16.1",
                    }  # fmt: skip
                assert fc_probe(prober, cells[-1])._instance_cache is None  # no VMM there
                await prober.tick(0)
                assert not any(fc_probe(prober, cell)._asked_instance for cell in cells)
                for cell in cells[:-1]:
                    output = last_output(prober, cell)
                    assert output["instance"]["id"] == cell
                    # the line of the first flush counts the GET / asked before it
                    assert output["delta"]["get_api_requests"]["instance_info_count"] == 1
                (missing,) = events_of(prober, cells[-1])
                assert missing["type"] == "probe_error"
                assert missing["error"]["kind"] == "io"
                asked: list[int] = []
                for tick in range(1, 1 + fc_metrics.INSTANCE_REFRESH_READS):
                    await prober.tick(tick)
                    asked.append(sum(fc_probe(prober, cell)._asked_instance for cell in cells))
    # each VM asks again once in the next INSTANCE_REFRESH_READS readings, spread out
    assert sum(asked) == len(cells) - 1
    assert max(asked) <= len(cells) // 3


async def test_vmms_are_not_asked_by_a_prepare_that_may_overlap_a_tick(fc_root: Path) -> None:
    """Cells a reload adds are prepared while ticks run: a VMM's connection must never be
    in two rounds at once, so its first tick asks GET / as it would without preparing."""
    with trio.fail_after(30):
        async with open_emulator(fc_root) as emulator:
            await emulator.add(emulator.spec("cell-1"))
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                await prober.prepare(while_ticking=True)
                assert fc_probe(prober, "cell-1")._instance_cache is None
                assert fc_probe(prober, "cell-1").connection.sock is None  # not even opened
                await prober.tick(0)
                assert fc_probe(prober, "cell-1")._asked_instance
                assert last_output(prober, "cell-1")["instance"]["id"] == "cell-1"
