"""Benchmark (not a test): the nftables probe's cost per tick next to one `nft -j list counters`.

One scratch namespace holds ``table inet cellosbench`` with 2,000 named
counters; 1,000 cells each read two of them (``<cell>-rx``, ``<cell>-tx``).
Each round measures, in the same run:

* the probe: one tick's 1,000 ``NftablesProbe.read`` calls, each in its own
  task as the daemon runs them, sharing one libnftables query (process CPU
  time, all threads, and wall time);
* the daemon's task floor: the same number of tasks doing nothing but one
  checkpoint, which every probe's tick pays whatever it reads;
* the daemon's whole tick for the same cells (reads plus envelopes into a
  capturing sink), for context;
* ``nft -j list counters table inet cellosbench`` run inside the namespace
  (the child's user + system CPU, and wall time), the same data the probe's
  one query fetches.

It prints the medians and the ratio (aim: within 2x).
Run as root: ``.venv/bin/python bench/bench_nftables.py [--cells N] [--rounds N]``.
Everything it makes is removed on the way out.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellos_probed.config import parse_config
from cellos_probed.daemon import Prober, ProbeServices, TickCount, build_probes
from cellos_probed.probes import (
    CapturingSink,
    ProbeContext,
    ProbeReading,
    ProbeResult,
    SequenceRegistry,
)
from cellos_probed.probes.nftables import NftablesProbe
from testbed.nft import TableSpec, namespace_with_loopback, nft_table
from testbed.taps import unique_name

TABLE = "cellosbench"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def nft_once(netns_path: str) -> tuple[float, float]:
    """(CPU seconds of the `nft` child, wall seconds) for one `nft -j list counters table`."""
    cpu, wall = children_cpu(), time.perf_counter()
    # nsenter setns()es and execs nft in place: the child's CPU is nft's. (A preexec_fn
    # would make Python fork instead of vfork, and the parent would then pay
    # copy-on-write faults on its next tick.)
    subprocess.run(
        ["nsenter", f"--net={netns_path}", "nft", "-j", "list", "counters", "table", "inet", TABLE],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return children_cpu() - cpu, time.perf_counter() - wall


def config_for(netns_path: str, cells: int) -> str:
    text = "[daemon]\ntick_seconds = 1.0\n"
    for index in range(cells):
        text += (
            f'[[cell]]\nid = "c{index:04d}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
            f'netns = "{netns_path}"\n[cell.nftables]\nfamily = "inet"\ntable = "{TABLE}"\n'
            f'counters = ["c{index:04d}-rx", "c{index:04d}-tx"]\n'
        )
    return text


async def probe_tick(shared: ProbeServices, probes: list[NftablesProbe], index: int) -> None:
    """The probe's own batch read of every cell (one table: one batch), no events."""
    shared.ticks.index = index
    context = ProbeContext("bench", "r", "h")
    results: list[ProbeResult | None] = [None] * len(probes)
    await NftablesProbe.read_batch([(context, probe) for probe in probes], results)
    assert all(isinstance(result, ProbeReading) for result in results), results[0]


async def floor_tick(cells: int) -> None:
    """The daemon's own share of any probe's tick: one task per cell that just checkpoints."""
    async with trio.open_nursery() as nursery:
        for _ in range(cells):
            nursery.start_soon(trio.lowlevel.checkpoint)


async def measure(netns_path: str, cells: int, rounds: int) -> None:
    config = parse_config(config_for(netns_path, cells))
    probe_cpu, probe_wall, tick_cpu, nft_cpu, nft_wall, floor_cpu = [], [], [], [], [], []
    shared = ProbeServices(TickCount())
    probes = [
        probe
        for cell in config.cells
        for probe in build_probes(cell, shared, config.paths.netns_root)
        if isinstance(probe, NftablesProbe)
    ]
    sink = CapturingSink()
    prober = Prober(config, sink, SequenceRegistry())
    async with trio.open_nursery() as nursery:
        shared.nursery = nursery
        await nursery.start(prober.run_services)
        await probe_tick(shared, probes, 0)  # namespace thread, context, first baseline
        await prober.tick(0)
        queries_before = shared.nft_tables.queries
        for index in range(1, rounds + 1):
            cpu, wall = time.process_time(), time.perf_counter()
            await probe_tick(shared, probes, index)
            probe_cpu.append(time.process_time() - cpu)
            probe_wall.append(time.perf_counter() - wall)

            cpu = time.process_time()
            await floor_tick(cells)
            floor_cpu.append(time.process_time() - cpu)

            sink.events.clear()
            cpu = time.process_time()
            await prober.tick(index)
            tick_cpu.append(time.process_time() - cpu)
            assert len(sink.events) == cells, "a tick lost readings"
            assert all(e.type.endswith(".nftables") for e in sink.events), sink.events[0].data

            child_cpu, child_wall = nft_once(netns_path)
            nft_cpu.append(child_cpu)
            nft_wall.append(child_wall)
        queries = shared.nft_tables.queries - queries_before
        shared.nft_tables.stop()
        prober.services.nft_tables.stop()
        nursery.cancel_scope.cancel()

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.2f} ms"

    print(f"{cells} cells, {2 * cells} named counters in one table, {rounds} rounds (medians)")
    print(f"  libnftables queries by the probe: {queries} in {rounds} ticks")
    print(f"  probe, one tick of {cells} reads   CPU {ms(probe_cpu)}   wall {ms(probe_wall)}")
    print(f"  daemon tick (reads + envelopes)   CPU {ms(tick_cpu)}")
    print(f"  of the probe's tick: {cells} tasks  CPU {ms(floor_cpu)}   (the daemon's task floor)")
    print(f"  nft -j list counters table        CPU {ms(nft_cpu)}   wall {ms(nft_wall)}")
    ratio = statistics.median(probe_cpu) / statistics.median(nft_cpu)
    wall_ratio = statistics.median(probe_wall) / statistics.median(nft_wall)
    print(f"  ratio probe / nft: CPU {ratio:.2f}x, wall {wall_ratio:.2f}x (aim: within 2x)")
    net = statistics.median(probe_cpu) - statistics.median(floor_cpu)
    print(f"  ratio without the task floor: CPU {net / statistics.median(nft_cpu):.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    names = [f"c{index:04d}-{side}" for index in range(args.cells) for side in ("rx", "tx")]
    spec = TableSpec("inet", TABLE, extra_counters=names)
    ns = unique_name("nfbench")
    with namespace_with_loopback(ns) as path, nft_table(spec, ns):
        trio.run(measure, path, args.cells, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
