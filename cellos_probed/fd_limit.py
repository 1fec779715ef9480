"""Enough file descriptors for a host's cells.

Each cell holds descriptors from tick to tick (its VMM's API connection and
metrics FIFO) and the daemon has its own (epoll, netlink, NATS, logs).
systemd starts a service with a soft limit of 1024 (``DefaultLimitNOFILE``):
a host of ~500 Firecracker cells would exhaust it, every later open failing
with EMFILE and the cells behind it reporting probe errors. The hard limit
is the operator's ceiling (524288 under systemd; the unit sets it); the
daemon raises its soft limit to it at start.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Final

#: held per cell at most: API socket, metrics FIFO, a cgroup directory and file being read
DESCRIPTORS_PER_CELL: Final = 4
#: the daemon's own: epoll, netlink and namespace sockets, NATS, log and spool files
DESCRIPTORS_RESERVED: Final = 256


@dataclass(frozen=True, slots=True)
class DescriptorLimit:
    soft: int
    hard: int
    needed: int

    @property
    def enough(self) -> bool:
        return self.soft >= self.needed


def descriptors_needed(cells: int) -> int:
    return DESCRIPTORS_RESERVED + DESCRIPTORS_PER_CELL * cells


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
    return DescriptorLimit(soft, hard, descriptors_needed(cells))
