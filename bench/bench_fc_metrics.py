"""The fc_metrics probe at scale: N emulated VMs (default 1,000) at a 1 s tick.

The emulator runs as its own process (``python -m testbed.fc_emulator``);
the probe runs here, in the daemon's own Prober, publishing to a sink that
only counts. Printed per tick: the probe's CPU (this process: the ticks and
the FIFO-draining background tasks between them) beside the emulator's CPU
(``/proc/<pid>/stat`` utime + stime), which serves every FlushMetrics and
GET / and writes every line; and the bytes the readings would put on the
wire (their CloudEvents JSON): per tick, and the median and p99 event size.
Everything it made is removed on the way out.

    .venv/bin/python bench/bench_fc_metrics.py [--vms 1000] [--ticks 20]
        [--totals-every N] [--sections vcpu,net_eth0,...]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cellos_probed.cloudevent import CloudEvent  # noqa: E402
from cellos_probed.config import parse_config  # noqa: E402
from cellos_probed.daemon import Prober  # noqa: E402
from cellos_probed.probes import SequenceRegistry  # noqa: E402
from cellos_probed.sinks import EventSink  # noqa: E402
from testbed.fc_emulator import jail_paths  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class CountingSink(EventSink):
    """Counts events, and the size of each reading's JSON (made already: no cost here)."""

    def __init__(self) -> None:
        self.readings = 0
        self.errors = 0
        self.messages: dict[str, int] = {}
        self.sizes: list[int] = []
        self.tick_bytes = 0

    def emit_nowait(self, event: CloudEvent) -> None:
        size = len(event.to_json())
        self.tick_bytes += size
        if event.type.endswith(".probe_error"):
            self.errors += 1
            message = event.data["error"]["message"]
            self.messages[message] = self.messages.get(message, 0) + 1
        else:
            self.readings += 1
            self.sizes.append(size)


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def percentile(values: list[int], fraction: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0


def config_text(
    root: Path, vms: int, tick: float, totals_every: int, sections: list[str] | None
) -> str:
    text = f'[daemon]\ntick_seconds = {tick}\n[paths]\njail_root = "{root}"\n'
    text += f"[probes.fc_metrics]\ntotals_every = {totals_every}\n"
    if sections is not None:
        text += f"sections = {sections!r}\n".replace("'", '"')
    for index in range(vms):
        api, metrics = jail_paths(root, f"vm-{index}")
        text += (
            f'[[cell]]\nid = "vm-{index}"\nrun_id = "r"\nspec_signature_hash = "sha256:0"\n'
            f'[cell.fc_metrics]\napi_socket = "{api}"\nmetrics_path = "{metrics}"\n'
        )
    return text


async def bench(
    root: Path,
    vms: int,
    ticks: int,
    tick: float,
    emulator_pid: int,
    totals_every: int,
    sections: list[str] | None,
) -> None:
    config = parse_config(config_text(root, vms, tick, totals_every, sections))
    sink = CountingSink()
    prober = Prober(config, sink, SequenceRegistry())
    async with trio.open_nursery() as nursery:
        await nursery.start(prober.run_services)
        await prober.tick(0)  # warm-up: connections, first lines
        sink.sizes.clear()
        print(
            f"{'tick':>4} {'probe CPU s':>12} {'tick wall s':>12} {'emulator CPU s':>15} "
            f"{'bytes':>12}"
        )
        probe_total = emulator_total = 0.0
        tick_bytes: list[int] = []
        probe_ticks: list[float] = []
        next_at = trio.current_time()
        for index in range(1, ticks + 1):
            next_at += tick
            cpu, emu, wall = (
                time.process_time(),
                process_cpu_seconds(emulator_pid),
                time.monotonic(),
            )
            sink.tick_bytes = 0
            await prober.tick(index)
            tick_bytes.append(sink.tick_bytes)
            tick_wall = time.monotonic() - wall
            await trio.sleep_until(next_at)  # the interval: background draining counts too
            probe_cpu = time.process_time() - cpu
            emulator_cpu = process_cpu_seconds(emulator_pid) - emu
            probe_total += probe_cpu
            probe_ticks.append(probe_cpu)
            emulator_total += emulator_cpu
            print(
                f"{index:>4} {probe_cpu:>12.3f} {tick_wall:>12.3f} {emulator_cpu:>15.3f} "
                f"{sink.tick_bytes:>12}"
            )
        nursery.cancel_scope.cancel()
    print(
        f"\n{vms} VMs, {ticks} ticks of {tick:g}s: probe {probe_total / ticks:.3f} CPU-s per tick "
        f"({probe_total / ticks / vms * 1e6:.0f} us per VM; median tick "
        f"{sorted(probe_ticks)[len(probe_ticks) // 2]:.3f}), emulator "
        f"{emulator_total / ticks:.3f} CPU-s per tick; readings {sink.readings}, "
        f"probe_errors {sink.errors}"
    )
    print(
        f"fc_metrics events: median {percentile(sink.sizes, 0.5)} B, "
        f"p99 {percentile(sink.sizes, 0.99)} B; "
        f"{sum(tick_bytes) / ticks:.0f} B per tick (totals_every {totals_every}, "
        f"sections {','.join(sections) if sections else 'all'})"
    )
    for message, count in sorted(sink.messages.items(), key=lambda item: -item[1])[:5]:
        print(f"  {count} x {message}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--tick", type=float, default=1.0)
    parser.add_argument("--totals-every", type=int, default=1)
    parser.add_argument(
        "--sections", type=lambda text: text.split(","), default=None, help="comma-separated"
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    root = Path(tempfile.mkdtemp(prefix="fcb", dir="/tmp"))
    emulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testbed.fc_emulator",
            "--root",
            str(root),
            "--vms",
            str(args.vms),
            "--activity",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert emulator.stdout is not None
        ready = emulator.stdout.readline()
        if '"ready": true' not in ready:
            raise RuntimeError("the emulator did not start")
        trio.run(
            bench,
            root,
            args.vms,
            args.ticks,
            args.tick,
            emulator.pid,
            args.totals_every,
            args.sections,
        )
    finally:
        emulator.send_signal(signal.SIGTERM)
        try:
            emulator.wait(30)
        except subprocess.TimeoutExpired:
            emulator.kill()
            emulator.wait()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
