"""The probe interface: what the daemon may ask of a probe, and nothing else.

Modelled on node_exporter's collectors (one method that reads, batching
inside it; the framework owns timing and success) and trio's ``Instrument``
(optional hooks with documented do-nothing defaults). The daemon groups a
tick's probes by ``(type, batch_key())`` and calls :meth:`HostProbe.read_batch`
once per group, under the probe timeout; that is the only read path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar, Self

import trio

from cellos_probed.readings import ProbeContext, ProbeResult


class HostProbe(ABC):
    """One host-side probe bound to one cell.

    A probe may keep state between reads (delta baselines); the daemon never
    runs two reads of one probe at once.
    """

    #: whether :meth:`prepare_batch` may run while a tick reads the same probes
    #: (a reload's new cells); only if the probe keeps the two apart itself
    prepare_while_ticking: ClassVar[bool] = False

    @abstractmethod
    def probe_name(self) -> str:
        """The short name: ``cgroup``, ``tap_link``, ``nftables`` or ``fc_metrics``."""

    @abstractmethod
    def inputs(self) -> dict[str, Any]:
        """What the probe is configured to read, as written in the config; named in
        every event of the probe, ``probe_error`` included."""

    def batch_key(self) -> Hashable:
        """Probes of one type with equal keys are read by one :meth:`read_batch`
        (they share a table listing, a namespace's watcher, a thread hop).
        Default: this probe alone."""
        return id(self)

    @classmethod
    @abstractmethod
    async def read_batch(
        cls, jobs: Sequence[tuple[ProbeContext, Self]], results: list[ProbeResult | None]
    ) -> None:
        """Read every job's cell: ``results[i]`` becomes job ``i``'s reading or error.

        A slot still ``None`` when the call ends (or is cancelled by the probe
        timeout) is reported by the daemon as a timeout; an exception that
        escapes fails the slots not yet filled, so fill each as it is known.
        """

    @classmethod  # noqa: B027
    async def prepare_batch(cls, probes: Sequence[Self]) -> None:
        """Open what later reads keep (directories, connections) before the first
        tick, so that it is not all opened inside one. Failures are left for the
        tick to report. Default: nothing to open."""

    async def background(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Work between ticks (draining a FIFO, say), run under the cell's scope,
        which a reload that removes or changes the cell cancels. Default: none."""
        task_status.started()

    def close(self) -> None:  # noqa: B027
        """Let go what the probe keeps open (the cell went, or the daemon stops).
        Default: nothing is kept."""
