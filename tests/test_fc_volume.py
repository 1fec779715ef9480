"""How much an fc_metrics reading says: zero leaves left out, totals every Nth
reading, only the sections asked for; and a consumer rebuilding exact totals
from what is published, against the emulator's own counts."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cellos_probed.daemon import Prober
from cellos_probed.probes.fc_exchange import MAX_OWED_ROUNDS
from cellos_probed.tail import format_event
from testbed.fc_emulator import open_emulator
from testbed.fc_emulator.schema import is_gauge, kind_of_key
from tests.event_contract import ContractError, check_data
from tests.fc_helpers import (
    events_of,
    fc_config,
    fc_probe,
    last_output,
    minus,
    published,
    short_root,
)
from tests.probing import running

Leaf = tuple[str, ...]


@pytest.fixture
def fc_root() -> Iterator[Path]:
    yield from short_root()


def leaves(tree: dict[str, Any], path: Leaf = ()) -> dict[Leaf, Any]:
    """Every leaf of nested sums, by path."""
    out: dict[Leaf, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, (*path, key)))
        else:
            out[(*path, key)] = value
    return out


def empty_or_zero(tree: dict[str, Any], path: Leaf = ()) -> list[Leaf]:
    """Where nested sums have a leaf of 0 or an empty object."""
    found: list[Leaf] = []
    for key, value in tree.items():
        if value == 0 or value == {}:
            found.append((*path, key))
        elif isinstance(value, dict):
            found += empty_or_zero(value, (*path, key))
    return found


async def test_delta_leaves_out_zero_leaves_and_has_every_other(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            async with running(fc_config(fc_root, ["cell-1"])) as prober:
                await prober.tick(0)
                outputs, sums = [], [vm.emitted_totals()]
                for tick, faults in ((1, 4), (2, 4), (3, 0)):
                    vm.metrics.add("net_eth0", "rx_bytes_count", 1000 * tick)
                    vm.metrics.observe_latency("net_eth0", "tap_write_agg", 70)
                    vm.metrics.set_gauge("seccomp", "num_faults", faults)
                    await prober.tick(tick)
                    outputs.append(last_output(prober, "cell-1"))
                    sums.append(vm.emitted_totals())
    for output, before, after in zip(outputs, sums[:-1], sums[1:], strict=True):
        # exactly the lines' non-zero leaves (a gauge: its value, not its change)
        assert output["delta"] == published(minus(after, before))
        assert empty_or_zero(output["delta"]) == []
        assert output["totals"] == published(after)
        assert empty_or_zero(output["totals"]) == []
    first, second, third = (output["delta"] for output in outputs)
    assert first["net_eth0"] == {
        "rx_bytes_count": 1000,
        "tap_write_agg": {"min_us": 70, "max_us": 70, "sum_us": 70},
    }
    # the aggregate's min_us and max_us, gauges always 0 there, are left out
    assert first["net"] == {"rx_bytes_count": 1000, "tap_write_agg": {"sum_us": 70}}
    assert first["put_api_requests"] == {"actions_count": 1}
    assert first["seccomp"] == {"num_faults": 4}
    assert second["seccomp"] == {"num_faults": 4}  # the gauge's value again, not its change
    assert "seccomp" not in third  # a gauge whose value is 0 is left out like a counter
    for section in ("balloon", "signals", "latencies_us", "vmm", "mmds", "block_rootfs"):
        assert section not in first  # nothing but zeros in them


def totals_pattern(prober: Prober) -> list[bool]:
    """Which of cell-1's readings had totals."""
    return [
        "totals" in event["output"]
        for event in events_of(prober, "cell-1")
        if event["type"] == "fc_metrics"
    ]


async def test_totals_every_nth_reading_and_at_once_for_a_new_instance(fc_root: Path) -> None:
    rng = random.Random(8)
    config = fc_config(fc_root, ["cell-1"], cell_table="totals_every = 3\n")
    with trio.fail_after(20):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            async with running(config) as prober:
                for tick in range(7):
                    vm.metrics.bump_everything(rng)
                    await prober.tick(tick)
                    output = last_output(prober, "cell-1")
                    if "totals" in output:
                        assert output["totals"] == published(vm.emitted_totals())
                assert totals_pattern(prober) == [True, False, False] * 2 + [True]
                await emulator.restart(vm, new_id="cell-1-b", recreate_fifo=True)
                for tick in range(7, 12):
                    vm.metrics.bump_everything(rng)
                    await prober.tick(tick)
                    output = last_output(prober, "cell-1")
                    if tick == 7:
                        assert output["instance"]["id"] == "cell-1-b"
                        assert output["totals"] == published(vm.emitted_totals())
    # the first reading of the new instance has them, and the count starts again
    assert totals_pattern(prober)[7:] == [True, False, False, True, False]


async def test_totals_at_once_after_a_reconnect_to_the_same_vmm(fc_root: Path) -> None:
    config = fc_config(fc_root, ["cell-1"], tick=1.0, timeout=0.2, defaults="totals_every = 1000\n")
    with trio.fail_after(20):
        async with open_emulator(fc_root) as emulator:
            hung = await emulator.add(emulator.spec("cell-1"))
            async with running(config) as prober:
                probe = fc_probe(prober, "cell-1")
                await prober.tick(0)
                await prober.tick(1)
                hung.hang_api()
                for tick in range(2, MAX_OWED_ROUNDS + 3):
                    await prober.tick(tick)
                assert probe.connection.sock is None  # given up: a fresh connection next
                hung.release_api()
                await prober.tick(MAX_OWED_ROUNDS + 3)
                assert probe.connection.connections == 2
                output = last_output(prober, "cell-1")
                assert output["totals"] == published(hung.emitted_totals())
                await prober.tick(MAX_OWED_ROUNDS + 4)
    assert totals_pattern(prober) == [True, False, True, False]
    assert output["instance"]["id"] == "cell-1"  # the same VMM, reached anew


async def test_sections_narrow_delta_and_totals(fc_root: Path) -> None:
    rng = random.Random(6)
    sections = ["net_eth0", "vcpu", "vmm", "balloon"]
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1"))
            missed = 0
            while missed < 2:  # nobody reads: lines are dropped, and the logger counts them
                vm.metrics.bump_everything(rng)
                outcome = vm.periodic_flush()
                assert outcome is not None
                missed += not outcome.written
            config = fc_config(fc_root, ["cell-1"], cell_table=f"sections = {sections!r}\n")
            async with running(config) as prober:
                await prober.tick(0)
                first = last_output(prober, "cell-1")
                before = vm.emitted_totals()
                vm.metrics.add("net_eth0", "rx_bytes_count", 5)
                vm.metrics.add("block_rootfs", "read_count", 5)
                await prober.tick(1)
                second = last_output(prober, "cell-1")
                after = vm.emitted_totals()
    assert first["totals"] == published(before, sections)
    assert set(first["totals"]) == set(first["delta"]) == set(sections)
    assert first["lost_lines"] == 2  # the logger section read, though not published
    # block_rootfs moved too, and the API counters (the flush): not asked for
    assert second["delta"] == published(minus(after, before), sections)
    assert second["delta"]["net_eth0"]["rx_bytes_count"] == 5
    assert ("exit_io_in",) not in leaves(second["delta"]["vcpu"])  # a counter that stood still
    assert set(second["delta"]) <= set(sections)
    assert second["totals"] == published(after, sections)


async def test_a_consumer_rebuilds_exact_totals_from_deltas_and_periodic_totals(
    fc_root: Path,
) -> None:
    """What a consumer does: each delta added (an absent leaf is 0; a gauge takes the
    delta's value when the reading has lines), the totals taken when they come. Its
    sums equal the emulator's, reading by reading, through a VMM restart."""
    rng = random.Random(11)
    config = fc_config(fc_root, ["cell-1"], defaults="totals_every = 3\n")
    known: dict[Leaf, int] = {}
    had_totals: list[bool] = []
    with trio.fail_after(30):
        async with open_emulator(fc_root) as emulator:
            vm = await emulator.add(emulator.spec("cell-1", nets=("eth0", "eth1")))
            async with running(config) as prober:
                for tick in range(20):
                    vm.metrics.bump_everything(rng)
                    if tick % 4 == 1:  # Firecracker's own timer fires between ticks
                        vm.periodic_flush()
                        vm.metrics.bump_everything(rng)
                    if tick == 10:
                        await emulator.restart(vm, new_id="cell-1-b", recreate_fifo=True)
                        vm.metrics.bump_everything(rng)
                    await prober.tick(tick)
                    output = last_output(prober, "cell-1")
                    if output["lines"]:
                        known = {leaf: value for leaf, value in known.items() if not gauge(leaf)}
                    for leaf, value in leaves(output["delta"]).items():
                        known[leaf] = value if gauge(leaf) else known.get(leaf, 0) + value
                    had_totals.append("totals" in output)
                    if "totals" in output:
                        assert known == leaves(output["totals"])
                        known = leaves(output["totals"])
                    assert known == leaves(published(vm.emitted_totals()))
                true = vm.true_counts()
                if fc_probe(prober, "cell-1")._asked_instance:  # in the next line, not read yet
                    true["get_api_requests"]["instance_info_count"] -= 1
    assert known == leaves(published(true))
    # every third reading, and the first of the new instance (tick 10) at once
    assert [tick for tick, has in enumerate(had_totals) if has] == [0, 3, 6, 9, 10, 13, 16, 19]


def gauge(leaf: Leaf) -> bool:
    return is_gauge(kind_of_key(leaf[0]), leaf[1], *leaf[2:])


async def test_readings_with_and_without_totals_and_narrowed_ones_fit_the_schema(
    fc_root: Path,
) -> None:
    config = fc_config(fc_root, ["cell-1"], cell_table='totals_every = 2\nsections = ["vcpu"]\n')
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            await emulator.add(emulator.spec("cell-1"))
            async with running(config) as prober:
                await prober.tick(0)
                await prober.tick(1)
                events = events_of(prober, "cell-1")
    assert ["totals" in event["output"] for event in events] == [True, False]
    assert events[1]["output"]["delta"] == {}  # nothing in vcpu moved
    data = {key: value for key, value in events[0].items() if key != "type"}
    check_data("urn:cellos:schema:host.v1.fc_metrics:1", data)
    # what the probe never publishes, the schema refuses: a zero leaf, an empty object
    refused: list[dict[str, Any]] = [
        {"exit_io_in": 0},
        {},
        {"exit_io_in_agg": {}},
        {"exit_io_in_agg": {"sum_us": 0}},
    ]
    for section in refused:
        data["output"]["delta"] = {"vcpu": section}
        with pytest.raises(ContractError):
            check_data("urn:cellos:schema:host.v1.fc_metrics:1", data)


def test_tail_shows_a_reading_without_totals_and_with_leaves_left_out() -> None:
    data = {
        "hostId": "host-a",
        "cellId": "cell-1",
        "probeSource": "host.fc_metrics",
        "output": {
            "instance": {"id": "cell-1", "state": "Running", "vmm_version": "1.16.1"},
            "lines": 1,
            "torn_lines": 0,
            "delta": {"net_eth0": {"rx_bytes_count": 5}, "vcpu": {"exit_mmio_write": 2}},
        },
    }
    event = {"type": "x.fc_metrics", "time": "t", "cellosseq": 3, "data": data}
    assert format_event(event).endswith(" #3 Running lines 1 net_eth0 rx+5B tx+0B")
