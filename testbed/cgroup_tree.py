"""Cgroup v2 directories in the kernel's exact file formats.

This host's cgroup v2 has no memory or pids controller, so tests and the
demo write those files themselves, byte for byte as kernel 6.x prints them
(mm/memcontrol.c ``memory_events_show``, kernel/cgroup/pids.c,
kernel/sched/psi.c ``psi_show``). Real cgroups are used where the kernel
has the file (see ``make_real_cgroup``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MEMORY_EVENT_KEYS = ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")
CPU_STAT_KEYS = (
    "usage_usec",
    "user_usec",
    "system_usec",
    "nice_usec",
    "core_sched.force_idle_usec",
    "nr_periods",
    "nr_throttled",
    "throttled_usec",
    "nr_bursts",
    "burst_usec",
)


def flat_keyed(values: dict[str, int]) -> str:
    return "".join(f"{key} {value}\n" for key, value in values.items())


def pressure(some_total: int = 0, full_total: int = 0, avg10: float = 0.0) -> str:
    return (
        f"some avg10={avg10:.2f} avg60=0.00 avg300=0.00 total={some_total}\n"
        f"full avg10=0.00 avg60=0.00 avg300=0.00 total={full_total}\n"
    )


@dataclass
class FakeCgroup:
    """The counters of one fixture cgroup; ``write`` puts them on disk."""

    path: Path
    memory_events: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(MEMORY_EVENT_KEYS, 0)
    )
    cpu_stat: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CPU_STAT_KEYS, 0))
    pids_events: dict[str, int] = field(default_factory=lambda: {"max": 0})
    memory_current: int = 8_388_608
    memory_peak: int = 12_582_912
    pids_current: int = 3
    cpu_some_total: int = 0

    def write(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        files = {
            "memory.events": flat_keyed(self.memory_events),
            "cpu.stat": flat_keyed(self.cpu_stat),
            "pids.events": flat_keyed(self.pids_events),
            "memory.current": f"{self.memory_current}\n",
            "memory.peak": f"{self.memory_peak}\n",
            "pids.current": f"{self.pids_current}\n",
            "cpu.pressure": pressure(self.cpu_some_total),
            "memory.pressure": pressure(),
            "io.pressure": pressure(),
        }
        for name, text in files.items():
            # write-then-rename: a concurrent reader sees the old or new file, never half
            tmp = self.path / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.path / name)


@contextmanager
def make_real_cgroup(parent: Path, name: str) -> Iterator[Path]:
    """A real cgroup directory under ``parent``; its processes are moved out and it is removed."""
    path = parent / name
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(100):
            try:
                for pid in (path / "cgroup.procs").read_text().split():
                    try:
                        (parent / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass  # the process exited meanwhile
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)  # processes leaving the cgroup; retry briefly
