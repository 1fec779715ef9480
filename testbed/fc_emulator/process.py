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
    root: Path, vms: int, *, prefix: str = "vm-", interval: float = 60.0, activity: bool = True
) -> Iterator[list[dict[str, str]]]:
    """``vms`` emulated VMs under ``root``; yields each one's config paths (relative to root).

    The list also carries ``"pid"`` (the emulator's) in its first entry's
    ``"emulator_pid"`` key, so a caller can measure the emulator's CPU.
    """
    root.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "testbed.fc_emulator", "--root", str(root),
               "--vms", str(vms), "--prefix", prefix, "--interval", str(interval)]  # fmt: skip
    if activity:
        command.append("--activity")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2]
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        if not ready or not json.loads(ready).get("ready"):
            raise RuntimeError("the Firecracker emulator did not start")
        paths = []
        for index in range(vms):
            api, metrics = jail_paths(root, f"{prefix}{index}")
            paths.append(
                {
                    "api_socket": str(api.relative_to(root)),
                    "metrics_path": str(metrics.relative_to(root)),
                    "emulator_pid": str(process.pid),
                }
            )
        yield paths
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
