"""The emulator as a separate process, for the demo and the benchmark.

A process of its own so its CPU is measured apart from the daemon's, as a
real host's VMMs would be.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from testbed.fc_emulator.host import jail_paths


@contextmanager
def emulator_process(
    root: Path,
    vms: int,
    *,
    prefix: str = "vm-",
    interval: float = 60.0,
    activity: bool = True,
    processes: int = 1,
) -> Iterator[list[dict[str, str]]]:
    """``vms`` emulated VMs under ``root``; yields each one's config paths (relative to root).

    ``processes``: the VMs are shared out over this many emulator processes.
    A real host runs one VMM process per VM, answering in parallel; one
    Python process answering a thousand VMs in turn would make the
    emulator, not the probe, the slowest part of a tick.
    Each entry also carries ``"emulator_pids"`` (comma-separated), so a
    caller can measure the emulator's CPU.
    """
    root.mkdir(parents=True, exist_ok=True)
    share = -(-vms // max(1, processes))
    started: list[subprocess.Popen[str]] = []
    try:
        for first in range(0, vms, share):
            count = min(share, vms - first)
            command = [sys.executable, "-m", "testbed.fc_emulator", "--root", str(root),
                       "--vms", str(count), "--first", str(first), "--prefix", prefix,
                       "--interval", str(interval)]  # fmt: skip
            if activity:
                command.append("--activity")
            started.append(
                subprocess.Popen(
                    command,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=Path(__file__).resolve().parents[2],
                )
            )
        for process in started:
            assert process.stdout is not None
            ready = process.stdout.readline()
            if not ready or not json.loads(ready).get("ready"):
                raise RuntimeError("the Firecracker emulator did not start")
        pids = ",".join(str(process.pid) for process in started)
        paths = []
        for index in range(vms):
            api, metrics = jail_paths(root, f"{prefix}{index}")
            paths.append(
                {
                    "api_socket": str(api.relative_to(root)),
                    "metrics_path": str(metrics.relative_to(root)),
                    "emulator_pids": pids,
                }
            )
        yield paths
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
