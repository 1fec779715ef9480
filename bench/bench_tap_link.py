"""Benchmark (not a test): the tap_link probe's CPU per tick next to `ip -s -j link show`.

1,000 TAPs in one scratch namespace (every other one administratively up),
one cell per TAP. Each round measures, in the same run:

* the probe: one tick's batch read of the 1,000 cells, as the daemon reads
  them: the namespace's dump (the counters), then each cell from the cache
  (process CPU time, all threads, the kernel's part of the dump included);
* that dump alone (``LinkWatcher.refresh``);
* the daemon's whole tick for the same cells (reads plus envelopes, into a
  capturing sink), for context;
* iproute2: ``ip -s -j -n NS link show`` (the child's user + system CPU).

It prints the medians and the ratio, and the cost of the watcher's first
dump (every link new to it, so parsed whole).
Run as root: ``.venv/bin/python bench/bench_tap_link.py [--taps N] [--rounds N]``.
Everything it makes is removed on the way out.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellos_probed.config import parse_config
from cellos_probed.daemon import Prober
from cellos_probed.netns import NetnsPath
from cellos_probed.probes import (
    CapturingSink,
    ProbeContext,
    ProbeReading,
    ProbeResult,
    SequenceRegistry,
)
from cellos_probed.probes.tap_link import LinkWatchers, TapLinkProbe
from testbed.taps import many_taps, network_namespace, unique_name


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def iproute2_once(ns: str) -> tuple[float, float]:
    """(CPU seconds of the `ip` child, wall seconds) for one `ip -s -j link show`."""
    cpu, wall = children_cpu(), time.perf_counter()
    command = ["ip", "-s", "-j", "-n", ns, "link", "show"]
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
    return children_cpu() - cpu, time.perf_counter() - wall


def config_for(path: Path, names: list[str]) -> str:
    text = "[daemon]\ntick_seconds = 1.0\n"
    for index, name in enumerate(names):
        text += (
            f'[[cell]]\nid = "c{index}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
            f'netns = "{path}"\n[cell.tap_link]\ninterface = "{name}"\n'
        )
    return text


async def measure(path: Path, ns: str, names: list[str], rounds: int) -> None:
    config = parse_config(config_for(path, names))
    async with trio.open_nursery() as nursery:
        # the probes alone, sharing one watcher as the daemon's cells do
        watchers = LinkWatchers(lambda: nursery)
        cpu = time.process_time()
        netns = NetnsPath(config.paths.netns_root, path)
        watcher = await watchers.watcher(netns)
        first_dump = time.process_time() - cpu
        assert len(watcher.by_name) == len(names) + 1, "the dump missed links"
        probes = [
            TapLinkProbe(cell.tap_link, cell.netns, netns, watchers)
            for cell in config.cells
            if cell.tap_link is not None
        ]
        context = ProbeContext("bench", "r", "h")

        async def read_all() -> None:
            # the probe's own batch read (one namespace: one batch), no events
            results: list[ProbeResult | None] = [None] * len(probes)
            await TapLinkProbe.read_batch([(context, probe) for probe in probes], results)
            assert all(isinstance(result, ProbeReading) for result in results), results[0]

        prober = Prober(config, CapturingSink(), SequenceRegistry())
        await nursery.start(prober.run_services)
        await prober.tick()  # its watcher's first dump, outside the measurement
        await read_all()

        probe_cpu, dump_cpu, tick_cpu, ip_cpu, ip_wall = [], [], [], [], []
        for _ in range(rounds):
            cpu = time.process_time()
            await read_all()
            probe_cpu.append(time.process_time() - cpu)
            cpu = time.process_time()
            await watcher.refresh()
            dump_cpu.append(time.process_time() - cpu)
            sink = prober.sink
            assert isinstance(sink, CapturingSink)
            sink.events.clear()
            cpu = time.process_time()
            await prober.tick()
            tick_cpu.append(time.process_time() - cpu)
            assert len(sink.events) == len(names)
            assert all(e.type.endswith(".tap_link") for e in sink.events)
            child_cpu, wall = iproute2_once(ns)
            ip_cpu.append(child_cpu)
            ip_wall.append(wall)
        nursery.cancel_scope.cancel()

    probe_ms = statistics.median(probe_cpu) * 1000
    ip_ms = statistics.median(ip_cpu) * 1000
    print(f"links in the namespace:                 {len(names) + 1}")
    print(f"cells (one TAP each):                   {len(names)}")
    print(f"rounds:                                 {rounds}")
    print(f"probe, a tick's reads incl. dump (CPU): {probe_ms:8.2f} ms")
    print(f"of which the dump (CPU):                {statistics.median(dump_cpu) * 1000:8.2f} ms")
    print(f"daemon tick incl. envelopes (CPU):      {statistics.median(tick_cpu) * 1000:8.2f} ms")
    print(f"ip -s -j link show (child CPU):         {ip_ms:8.2f} ms")
    print(f"ip -s -j link show (wall, incl. spawn): {statistics.median(ip_wall) * 1000:8.2f} ms")
    print(f"ratio probe / ip (CPU):                 {probe_ms / ip_ms:8.2f}")
    print(f"watcher start: socket + dump (CPU):     {first_dump * 1000:8.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--taps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_tap_link: needs root (it makes a namespace and TAP devices)")
    ns = unique_name("bench")
    names = [f"tap{index}" for index in range(args.taps)]
    started = time.perf_counter()
    with network_namespace(ns) as path, many_taps(ns, names, up_every=2):
        print(f"made {args.taps} TAPs in {ns} in {time.perf_counter() - started:.1f} s")
        trio.run(measure, path, ns, names, args.rounds)


if __name__ == "__main__":
    main()
