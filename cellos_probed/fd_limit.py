"""Enough file descriptors for a host's cells.

Each cell holds descriptors from tick to tick (its VMM's API connection and
metrics FIFO, its cgroup's directory and files) and the daemon has its own
(epoll, netlink, NATS, logs).
systemd starts a service with a soft limit of 1024 (``DefaultLimitNOFILE``):
a host of ~500 Firecracker cells would exhaust it, every later open failing
with EMFILE and the cells behind it reporting probe errors. The hard limit
is the operator's ceiling (524288 under systemd; the unit sets it); the
daemon raises its soft limit to it at start.
"""

from __future__ import annotations

import resource
import threading
from dataclasses import dataclass
from typing import Final

#: held per cell at most: API socket, metrics FIFO, a cgroup directory and file being read
DESCRIPTORS_PER_CELL: Final = 4
#: kept per cell besides, when the limit leaves room: the cgroup's nine files and
#: ``cgroup.controllers`` (cheaper reads on cgroup2: see ``probes.cgroup``)
KEPT_PER_CELL: Final = 10
#: the daemon's own: epoll, netlink and namespace sockets, NATS, log and spool files
DESCRIPTORS_RESERVED: Final = 256


@dataclass(frozen=True, slots=True)
class DescriptorLimit:
    soft: int
    hard: int
    needed: int
    wanted: int

    @property
    def enough(self) -> bool:
        return self.soft >= self.needed

    @property
    def keeps_every_cgroup(self) -> bool:
        return self.soft >= self.wanted


def descriptors_needed(cells: int) -> int:
    """Fewer than this and probes fail (EMFILE)."""
    return DESCRIPTORS_RESERVED + DESCRIPTORS_PER_CELL * cells


def descriptors_wanted(cells: int) -> int:
    """Fewer than this and some cells' cgroup files are opened at every read instead of kept."""
    return descriptors_needed(cells) + KEPT_PER_CELL * cells


def spare_descriptors(cells: int) -> int:
    """What the soft limit leaves beyond what ``cells`` need: the room for kept files."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(0, soft - descriptors_needed(cells))


class DescriptorBudget:
    """Descriptors that may be kept open to make reads cheaper, never needed ones.

    Keeping a cell's cgroup files open is an optimisation: it must not take
    the descriptors another cell's API socket or FIFO will need. A directory
    that cannot have room reads its files by opening them each time.
    Taken from worker threads, given back from the trio thread: a lock.
    """

    def __init__(self, limit: int = 1 << 30) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> bool:
        with self._lock:
            if self.used + count > self.limit:
                return False
            self.used += count
            return True

    def over(self) -> bool:
        """More kept than the limit now allows (a reload added cells): let some go."""
        return self.used > self.limit

    def give_back(self, count: int) -> None:
        with self._lock:
            self.used -= count


def raise_to_hard_limit(cells: int) -> DescriptorLimit:
    """Raise the soft RLIMIT_NOFILE to the hard one; what it is now, and what ``cells`` need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # a kernel cap below the hard limit (fs.nr_open): keep what we have
    return DescriptorLimit(soft, hard, descriptors_needed(cells), descriptors_wanted(cells))
