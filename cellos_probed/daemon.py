"""The daemon: cells, their probes, the tick, signals, and a bounded stop.

One nursery tree::

    run_daemon
    ├── sink.run                 (the NATS flusher)
    ├── exporter.run             ([metrics] listen: /metrics, metrics.py)
    ├── signals                  (TERM/INT: stop; HUP: reload)
    └── probing
        ├── run_services          (shared services; the kernel's cgroup file
        │                          signals, a changed cell read at once: read_now)
        └── run_fixed_tick
            └── each tick: one task per probe group (a probe type and what its
                cells share), each under probe_timeout

On stop, probing is cancelled first, then the sink drains what was read
(bounded by ``drain_timeout_seconds``); a second signal stops at once.
"""

from __future__ import annotations

import operator
import signal
import time
import zlib
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from cellos_probed import allocator
from cellos_probed.batching import ThreadBatcher
from cellos_probed.cloudevent import CloudEvent
from cellos_probed.config import CellConfig, Config, ConfigError, load_config
from cellos_probed.events import (
    SequenceRegistry,
    agent_event,
    build_probe_error_envelope,
    reading_event,
)
from cellos_probed.fd_limit import DescriptorBudget, spare_descriptors
from cellos_probed.figures import ProbeStats, ProbeTiming
from cellos_probed.kernfs_watch import KernfsWatcher
from cellos_probed.log import RepeatedErrorFilter, log_subject
from cellos_probed.metrics import DaemonMetrics, MetricsExporter, ReloadRecord
from cellos_probed.netns import NamespaceThreads, NetnsPath
from cellos_probed.probes.base import HostProbe
from cellos_probed.probes.cgroup import CgroupProbe, CgroupShared
from cellos_probed.probes.fc_metrics import FcMetricsProbe
from cellos_probed.probes.nftables import NftablesProbe, NftTableQueries
from cellos_probed.probes.tap_link import LinkWatchers, TapLinkProbe
from cellos_probed.readings import (
    ProbeContext,
    ProbeError,
    ProbeIoError,
    ProbeParseError,
    ProbeReading,
    ProbeResult,
    ProbeTimeoutError,
)
from cellos_probed.scheduler import TickStats, run_fixed_tick
from cellos_probed.shard import Shard
from cellos_probed.sinks import EventSink
from cellos_probed.systemd import Notifier

log = structlog.get_logger("cellos_probed.daemon")

#: how long opening what probes keep may take before the first tick (see Prober.prepare)
PREPARE_SECONDS = 10.0
#: ticks between looking whether a burst left freed heap pages to hand back
TRIM_EVERY_TICKS = 60
#: at most this many readings of a cell a tick that the kernel's signals ask for
SIGNALLED_PER_TICK = 10


@dataclass(slots=True)
class TickCount:
    """Where the tick loop is, for services that key their results on the tick."""

    #: the index of the tick being run: every cell reading one nftables table in
    #: one tick shares one query keyed on it
    index: int = 0
    #: ticks begun, whatever index the caller gives (``once``, tests)
    begun: int = 0


class ProbeServices:
    """What probes of many cells share: worker-thread limits and per-namespace services.

    ``nursery`` is the services nursery of the running :class:`Prober`; a
    shared service (one netlink watcher per namespace, say) starts there
    lazily, the first time a probe asks for it. ``ticks`` is the tick loop's
    count (the :class:`Prober` advances it), which services key results on.
    """

    def __init__(self, ticks: TickCount) -> None:
        self.ticks = ticks
        #: Firecracker API rounds (one epoll loop per thread, up to ROUND_SIZE VMs each)
        self.fc_rounds = trio.CapacityLimiter(2)
        #: room under the open-file limit for descriptors kept only to make reads cheaper
        self.kept_descriptors = DescriptorBudget()
        #: every cell's cgroup reads of a tick in a few thread hops of 256 cells (a
        #: timeout still keeps the chunks read by then), on one thread: kernfs answers
        #: from memory, so more threads only fight over the interpreter lock
        #: (docs/performance.md, "cgroup reads")
        self.cgroups = CgroupShared(
            ThreadBatcher(trio.CapacityLimiter(1), chunk_size=256), self.kept_descriptors
        )
        #: one inotify descriptor: every cell's cgroup.events and memory.events
        #: (run by the Prober, which reads a changed cell at once)
        self.kernfs_watch = KernfsWatcher()
        self.nursery: trio.Nursery | None = None
        #: one rtnetlink link watcher per network namespace, shared by its cells
        self.link_watchers = LinkWatchers(lambda: self.nursery, tick=lambda: ticks.begun)
        #: one libnftables query per (namespace, family, table) per tick, on a
        #: thread (and context) of its own per namespace
        self.nft_tables = NftTableQueries(
            NamespaceThreads(), lambda: self.nursery, lambda: ticks.index
        )


def _room_for_kept_files(config: Config) -> int:
    """Descriptors the cgroup probe may keep: none if the operator said so, else what
    the open-file limit leaves beyond what the cells need (``fd_limit``)."""
    if not config.daemon.keep_cgroup_files:
        return 0
    return spare_descriptors(len(config.cells))


def build_probes(cell: CellConfig, shared: ProbeServices, netns_root: Path) -> list[HostProbe]:
    """A cell runs exactly the probes whose table it has; ``netns_root`` is [paths]
    netns_root, which every open of the cell's namespace stays under."""
    probes: list[HostProbe] = []
    netns = None if cell.netns_resolved is None else NetnsPath(netns_root, cell.netns_resolved)
    if cell.cgroup is not None:
        probes.append(CgroupProbe(cell.cgroup, shared.cgroups, shared.kernfs_watch.cell(cell.id)))
    if cell.tap_link is not None:
        probes.append(TapLinkProbe(cell.tap_link, cell.netns, netns, shared.link_watchers))
    if cell.nftables is not None:
        probes.append(NftablesProbe(cell.nftables, cell.netns, netns, shared.nft_tables))
    if cell.fc_metrics is not None:
        probes.append(FcMetricsProbe(cell.fc_metrics, shared.fc_rounds))
    return probes


def _cadences(cell: CellConfig) -> dict[str, int]:
    """How often each of the cell's probes is read, in base ticks, by probe name."""
    tables = {
        "cgroup": cell.cgroup,
        "tap_link": cell.tap_link,
        "nftables": cell.nftables,
        "fc_metrics": cell.fc_metrics,
    }
    return {name: table.every_ticks for name, table in tables.items() if table is not None}


@dataclass
class Cell:
    """One configured cell: its attribution, its probes (with their baselines), and
    the scope its probes' background work runs under (a reload that removes or
    changes the cell cancels it)."""

    config: CellConfig
    context: ProbeContext
    probes: list[HostProbe]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def make_cell(cell: CellConfig, shared: ProbeServices, netns_root: Path) -> Cell:
    context = ProbeContext(cell.id, cell.run_id, cell.spec_signature_hash)
    return Cell(cell, context, build_probes(cell, shared, netns_root))


#: a group of a tick: the probe type and its batch key
_GroupKey = tuple[type[HostProbe], Hashable]
#: one cell's probe in a group
_Job = tuple[Cell, HostProbe]
#: a tick's groups, each read by one task
_Groups = dict[_GroupKey, list[_Job]]
#: the groups of the probes read every N ticks (N = every_ticks), by phase (0 to N - 1)
_Phases = dict[int, dict[int, _Groups]]


def _as_probe_error(exc: Exception) -> ProbeError:
    """An exception a probe should not have let out, as a typed error (bug or not)."""
    if isinstance(exc, OSError):
        return ProbeIoError(exc.strerror or type(exc).__name__)
    if isinstance(exc, (ValueError, KeyError, TypeError)):
        return ProbeParseError(f"unexpected {type(exc).__name__}")
    return ProbeIoError(f"unexpected {type(exc).__name__}")


class Prober:
    """Runs every cell's probes once per tick and hands the results to the sink."""

    def __init__(
        self,
        config: Config,
        sink: EventSink,
        sequences: SequenceRegistry,
        services: ProbeServices | None = None,
    ) -> None:
        self.config = config
        self.sink = sink
        self.sequences = sequences
        self.services = services or ProbeServices(TickCount())
        self.ticks = self.services.ticks
        self.services.kernfs_watch.serve(
            self.read_now, lambda: self.config.daemon.tick_seconds / SIGNALLED_PER_TICK
        )
        self.services.kept_descriptors.limit = _room_for_kept_files(config)
        self.cells = {
            cell.id: make_cell(cell, self.services, config.paths.netns_root)
            for cell in config.cells
        }
        self.tick_stats = TickStats()
        self.probe_stats = ProbeStats()
        #: by probe name (the metrics' per-probe success and duration)
        self.probe_timings: dict[str, ProbeTiming] = {}
        self._errors = RepeatedErrorFilter()
        self._services: trio.Nursery | None = None
        #: the probe lists the groups were made from, and the groups (see _phases)
        self._groups: tuple[list[list[HostProbe]], _Phases] | None = None
        #: the index of the tick before (None: no tick yet), to read what a skip missed
        self._previous_index: int | None = None
        #: cells were replaced since the heap was last settled (allocator.settle_long_lived)
        self.reloaded_since_settle = False
        #: the share of the host's cells this process runs (None: all of them)
        self.shard: Shard | None = None

    async def run_services(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Shared services and every cell's background tasks; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self.services.nursery = nursery
            self._services = nursery
            await nursery.start(self.services.kernfs_watch.run)
            for cell in self.cells.values():
                await nursery.start(self._run_cell_background, cell)
            task_status.started()
            await trio.sleep_forever()

    async def _run_cell_background(
        self, cell: Cell, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        log_subject.set((cell.context.cell_id, None))
        started = False
        try:
            with cell.scope:
                async with trio.open_nursery() as nursery:
                    for probe in cell.probes:
                        await nursery.start(probe.background)
                    task_status.started()
                    started = True
                    await trio.sleep_forever()
        finally:
            # the cell was removed or changed, or the daemon is stopping:
            # what its probes keep open between ticks goes now
            for probe in cell.probes:
                probe.close()
        if not started:  # cancelled by a reload before it was up: nothing to wait for
            task_status.started()

    async def prepare(
        self, cells: Iterable[Cell] | None = None, *, while_ticking: bool = False
    ) -> None:
        """What probes open once and keep (``HostProbe.prepare_batch``), opened in
        batches before the first tick rather than all inside it; what is not open
        by PREPARE_SECONDS, or failed, is opened (and reported) by its tick.

        ``while_ticking`` (cells a reload added): only probes whose preparing
        may overlap a tick (``prepare_while_ticking``).
        """
        chosen = list(self.cells.values() if cells is None else cells)
        groups: dict[type[HostProbe], list[HostProbe]] = {}
        for cell in chosen:
            for probe in cell.probes:
                if not while_ticking or probe.prepare_while_ticking:
                    groups.setdefault(type(probe), []).append(probe)
        with trio.move_on_after(PREPARE_SECONDS):
            async with trio.open_nursery() as nursery:
                for probe_type, probes in groups.items():
                    nursery.start_soon(probe_type.prepare_batch, probes)

    async def tick(self, index: int = 0) -> None:
        """The probes due on tick ``index`` (every probe, with ``every_ticks`` 1), once:
        one task per group of probes that share a resource (a probe type and a batch
        key), each under the probe timeout, so a resource that hangs only times out
        the cells that use it."""
        timeout = self.config.daemon.probe_timeout_seconds
        # the deadlines this tick stands for: its own and those an overrun skipped
        # since the tick before (``index`` counts them), so that a probe due on a
        # skipped one is read now rather than a whole cadence later; the first tick
        # (``once``'s only one) reads every probe
        previous = self._previous_index
        span = None if previous is None else max(1, index - previous)
        self._previous_index = index
        self.ticks.index = index
        self.ticks.begun += 1
        groups = self._probe_groups(index, span)
        self._errors.start_tick()
        async with trio.open_nursery() as nursery:
            for (probe_type, _), members in groups.items():
                nursery.start_soon(self._run_group, probe_type, members, timeout)
        held = self._errors.end_tick()
        if held is not None:
            log_subject.set(None)
            log.warning(
                "more probes failed or recovered this tick than are logged one by one", **held
            )

    def _probe_groups(self, index: int, span: int | None) -> _Groups:
        """The groups of tick ``index``: the probes whose phase falls on one of the
        ``span`` deadlines up to and including it (None: every probe)."""
        due: list[_Groups] = []
        for every, phases in self._phases().items():
            if span == 1:  # the usual tick: one phase of each cadence
                groups = phases.get(index % every)
                if groups is not None:
                    due.append(groups)
            else:
                due.extend(
                    groups
                    for phase, groups in phases.items()
                    if span is None or (index - phase) % every < span
                )
        if len(due) == 1:
            return due[0]
        # probes of one batch key read at different cadences are still one batch
        # on the ticks where they meet
        merged: _Groups = {}
        for groups in due:
            for key, members in groups.items():
                held = merged.get(key)
                merged[key] = members if held is None else held + members
        return merged

    def _phases(self) -> _Phases:
        """Every tick's groups, worked out again only when the cells or their probes change.

        A probe read every N ticks is read on the ticks whose index modulo N is its
        cell's phase, a stable hash of the cell's id (as the fc probe's instance
        refresh phase): N = 10 for a thousand VMs reads a hundred a tick rather
        than all of them every tenth tick, which would make that tick's CPU, its
        burst on the wire and its probe timeout those of every-tick reading. The
        cost: what the cells of one batch share (an nftables table's listing, a
        namespace's link dump) is read on each tick one of them is due, not once
        every N.
        """
        probe_lists = [cell.probes for cell in self.cells.values()]
        cached = self._groups
        if (
            cached is not None
            and len(cached[0]) == len(probe_lists)
            and all(map(operator.is_, cached[0], probe_lists))
        ):
            return cached[1]
        phases: _Phases = {}
        for cell in self.cells.values():
            every_ticks = _cadences(cell.config)
            spread = zlib.crc32(cell.context.cell_id.encode())
            for probe in cell.probes:
                every = every_ticks.get(probe.probe_name(), 1)
                groups = phases.setdefault(every, {}).setdefault(spread % every, {})
                groups.setdefault((type(probe), probe.batch_key()), []).append((cell, probe))
        self._groups = (probe_lists, phases)
        return phases

    async def _run_group(
        self,
        probe_type: type[HostProbe],
        members: list[_Job],
        timeout: float,
        read: Callable[..., Awaitable[None]] | None = None,
    ) -> None:
        """One group's read, timed and accounted here and only here: a slot the
        probe left empty by the timeout is a timeout, an exception that escaped
        fails the slots not yet filled. ``read``: a read outside the tick (the
        type's ``read_batch`` with arguments of its own, see ``read_now``)."""
        results: list[ProbeResult | None] = [None] * len(members)
        started = trio.current_time()
        with trio.move_on_after(timeout):
            try:
                await (read or probe_type.read_batch)(
                    [(cell.context, probe) for cell, probe in members], results
                )
            except Exception as exc:
                log_subject.set((None, members[0][1].probe_name()))
                log.exception("batch read raised an unexpected exception")
                failure = _as_probe_error(exc)
                results = [failure if r is None else r for r in results]
        elapsed = trio.current_time() - started
        errors = self.probe_stats.errors
        emit = self.sink.emit_nowait
        for (cell, probe), result in zip(members, results, strict=True):
            emit(self._event_for(cell, probe, result, timeout))
        # nothing awaited since `errors`: the errors counted meanwhile are this group's
        if read is None:  # the tick's figures: a read outside it is not one of them
            success = self.probe_stats.errors == errors
            self._time_probe(members[0][1].probe_name(), elapsed, success)

    def _time_probe(self, name: str, seconds: float, success: bool) -> None:
        """One group's read into its probe type's record of this tick."""
        timing = self.probe_timings.get(name)
        if timing is None or timing.tick != self.ticks.begun:
            self.probe_timings[name] = ProbeTiming(self.ticks.begun, seconds, success)
        else:  # another group of the type, this tick
            timing.seconds = max(timing.seconds, seconds)
            timing.success = timing.success and success

    async def read_now(self, trigger: str, cell_ids: list[str]) -> None:
        """These cells' cgroups read now, outside the tick: the kernel signalled a
        change of ``trigger`` (``cgroup.events`` or ``memory.events``; the watcher
        coalesces, see ``kernfs_watch``). Read, timed and turned into events as a
        tick's group is, in the same ``cellosseq`` count and deltas. The cgroup
        probe reads one batch at a time: a tick reading the cgroups is waited for
        rather than taken as the answer (it may have read this cell before the
        change), and waits for this read."""
        members: list[_Job] = [
            (cell, probe)
            for cell in filter(None, map(self.cells.get, cell_ids))  # a cell gone since
            for probe in cell.probes
            if isinstance(probe, CgroupProbe)
        ]
        if members:
            timeout = self.config.daemon.probe_timeout_seconds
            read = partial(CgroupProbe.read_batch, trigger=trigger)
            await self._run_group(CgroupProbe, members, timeout, read)

    def _event_for(
        self, cell: Cell, probe: HostProbe, result: ProbeResult | None, timeout: float
    ) -> CloudEvent:
        """The event a probe's result becomes, counted and (when it changes) logged."""
        name = probe.probe_name()
        cell_id = cell.context.cell_id
        if result is None:
            result = ProbeTimeoutError(f"{name} probe did not finish within {timeout:g}s")
        if isinstance(result, ProbeReading):
            self.probe_stats.readings += 1
            if self._errors.recovered(cell_id, name):
                log_subject.set((cell_id, name))
                log.info("probe recovered")
            return reading_event(cell.context, result, self.sequences)
        self.probe_stats.count_error(result.kind, name)
        if self._errors.failed(cell_id, name, str(result)):
            log_subject.set((cell_id, name))
            log.warning("probe failed", kind=result.kind, error=result.message)
        return build_probe_error_envelope(
            cell.context, f"host.{name}", probe.inputs(), result, self.sequences
        )

    def apply(self, config: Config) -> dict[str, list[str]]:
        """Swap in a new config between ticks; unchanged cells keep their state."""
        new_cells: dict[str, Cell] = {}
        changes: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "kept": []}
        for cell_config in config.cells:
            old = self.cells.get(cell_config.id)
            if old is not None and old.config == cell_config:
                new_cells[cell_config.id] = old
                changes["kept"].append(cell_config.id)
            else:
                new_cells[cell_config.id] = make_cell(
                    cell_config, self.services, config.paths.netns_root
                )
                changes["changed" if old is not None else "added"].append(cell_config.id)
        changes["removed"] = [cell for cell in self.cells if cell not in new_cells]
        for cell_id in changes["removed"]:
            self._errors.forget_cell(cell_id)
        for cell_id, old in self.cells.items():
            if new_cells.get(cell_id) is not old:
                old.scope.cancel()
        if self._services is not None:
            for cell_id in changes["added"] + changes["changed"]:
                self._services.start_soon(self._run_cell_background, new_cells[cell_id])
            fresh = [new_cells[cell_id] for cell_id in changes["added"] + changes["changed"]]
            if fresh:
                self._services.start_soon(partial(self.prepare, fresh, while_ticking=True))
        self.cells = new_cells
        self.config = config
        self.services.kept_descriptors.limit = _room_for_kept_files(config)
        self.reloaded_since_settle = True
        return changes


async def run_once(
    config: Config, sink: EventSink, sequences: SequenceRegistry | None = None
) -> Prober:
    """One tick, every event to ``sink``: the ``once`` command."""
    prober = Prober(config, sink, sequences or SequenceRegistry(host_id=config.daemon.host_id))
    async with trio.open_nursery() as nursery:
        await nursery.start(prober.run_services)
        await prober.tick()
        nursery.cancel_scope.cancel()
    return prober


@dataclass
class DaemonHandle:
    """What a running daemon exposes to its caller (tests, the CLI)."""

    prober: Prober
    sink: EventSink
    stop: Callable[[], None]
    reload: Callable[[], None]
    exporter: MetricsExporter
    reloads: ReloadRecord
    status: StatusReport


async def run_daemon(
    config: Config,
    sink: EventSink,
    *,
    config_path: str | None = None,
    sequences: SequenceRegistry | None = None,
    handle_signals: bool = True,
    notifier: Notifier | None = None,
    shard: Shard | None = None,
    settle_heap: bool = False,
    task_status: trio.TaskStatus[DaemonHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until stopped: the sink delivers, the cells are probed on the tick.

    ``settle_heap``: the daemon owns its process, so it may freeze its
    long-lived objects out of the collector's sight (``allocator.py``).

    With ``shard``, ``config`` holds the shard's cells already; reloads are
    narrowed to them the same way.
    """
    sequences = sequences or SequenceRegistry(host_id=config.daemon.host_id)
    notifier = notifier or Notifier()
    prober = Prober(config, sink, sequences)
    prober.shard = shard
    reloads = ReloadRecord(loaded_at=time.time())
    # every shard's textfile lands in one node_exporter: its series need the shard's name
    labels = {} if shard is None or shard.count == 1 else {"shard": shard.label}
    exporter = MetricsExporter(
        DaemonMetrics(prober, sink, reloads, labels), config.daemon.tick_seconds
    )
    status = StatusReport(prober, sink, exporter)
    stop_requested = trio.Event()
    # capacity 1: reload requests that arrive during a reload fold into one
    reload_send, reload_receive = trio.open_memory_channel[None](1)
    log.info(
        "starting",
        shard=None if shard is None else shard.label,
        cells=len(config.cells),
        tick_seconds=config.daemon.tick_seconds,
        boot=sequences.boot_id,
    )
    watchdog = notifier.watchdog_seconds
    if watchdog is not None and config.daemon.tick_seconds > watchdog / 2:
        log.warning(
            "WatchdogSec is too short for the tick: pings come once per tick",
            watchdog_seconds=watchdog,
            tick_seconds=config.daemon.tick_seconds,
        )

    async def after_tick() -> None:
        exporter.metrics.observe_tick(prober.tick_stats.last_duration)
        if settle_heap and (prober.tick_stats.ticks == 1 or prober.reloaded_since_settle):
            # the cells' state is built now: keep it out of the collector's walks
            prober.reloaded_since_settle = False
            allocator.settle_long_lived()
            allocator.collect_by_ticks()
        elif settle_heap:  # the tick's objects are gone: what is young now is little
            allocator.collect_after_tick(prober.tick_stats.ticks)
        if prober.tick_stats.ticks % TRIM_EVERY_TICKS == 0:
            allocator.trim_if_holding()  # what a burst left goes back (allocator.py)
        every = prober.config.daemon.agent_event_every_ticks
        if every and prober.tick_stats.ticks % every == 0:
            sink.emit_nowait(
                agent_event(
                    sequences.host_id, sequences.boot_id, collect_figures(prober, sink)
                )
            )
        exporter.after_tick(prober.tick_stats.ticks)
        # the watchdog is fed only here: a wedged tick loop stops feeding it
        if not notifier.tick_completed(status.line()) and status.due():
            notifier.status(status.line())

    async with trio.open_nursery() as root:
        await root.start(sink.run)
        await root.start(exporter.run)
        await exporter.apply(config.metrics)

        def stop() -> None:
            if stop_requested.is_set():
                held = sink.statistics().buffered
                log.warning("second stop request: stopping now", unpublished=held)
                root.cancel_scope.cancel()
            stop_requested.set()

        def reload() -> None:
            try:
                reload_send.send_nowait(None)
            except trio.WouldBlock:
                pass

        if handle_signals:
            await root.start(_watch_signals, stop, reload)

        async with trio.open_nursery() as probing:
            await probing.start(prober.run_services)
            await prober.prepare()
            await probing.start(
                partial(run_fixed_tick, after_tick=after_tick),
                config.daemon.tick_seconds,
                prober.tick,
                prober.tick_stats,
            )
            probing.start_soon(
                partial(_reloader, prober, config_path, reload_receive, notifier, status),
                reloads,
                exporter,
            )
            notifier.ready(status.line())
            task_status.started(
                DaemonHandle(prober, sink, stop, reload, exporter, reloads, status)
            )
            await stop_requested.wait()
            log.info("stopping: probing ends, publishing what was read")
            notifier.stopping()
            probing.cancel_scope.cancel()

        drained = await sink.drain(prober.config.daemon.drain_timeout_seconds)
        log.info(
            "stopped",
            drained=drained,
            ticks=prober.tick_stats.ticks,
            readings=prober.probe_stats.readings,
            probe_errors=prober.probe_stats.errors,
        )
        exporter.write()  # the final figures, what was drained included
        root.cancel_scope.cancel()
    notifier.close()


def collect_figures(prober: Prober, sink: EventSink) -> dict[str, Any]:
    """The daemon's own figures: the ``agent`` event's data and the ``STATUS=`` line."""
    stats = prober.probe_stats
    ticks = prober.tick_stats
    figures: dict[str, Any] = {
        "cells": len(prober.cells),
        **({} if prober.shard is None else {"shard": prober.shard.label}),
        "readingsProduced": stats.readings,
        "probeErrors": stats.errors,
        "probeErrorsByKind": dict(stats.errors_by_kind or {}),
        "ticks": ticks.ticks,
        "tickOverruns": ticks.overruns,
        "skippedTicks": ticks.skipped_ticks,
        "tickDurationMs": {
            "p50": round(ticks.percentile(0.5) * 1000, 3),
            "p99": round(ticks.percentile(0.99) * 1000, 3),
            "max": round(max(ticks.durations, default=0.0) * 1000, 3),
        },
        # the tick just run: with an agent event every tick, a consumer sees each one
        "lastTickDurationMs": round(ticks.last_duration * 1000, 3),
    }
    delivery = sink.statistics()
    if delivery.connected is not None:  # a sink that delivers over a connection
        figures.update(
            published=delivery.published,
            acknowledged=delivery.acknowledged,
            buffered=delivery.buffered,
            dropped=delivery.dropped,
            gapsDeclared=delivery.gaps_declared,
            reconnects=delivery.reconnects,
            connected=delivery.connected,
            spooled=delivery.spooled,
            spoolBytes=delivery.spool_bytes,
            permissionViolations=delivery.permission_violations,
        )
    return figures


class StatusReport:
    """The one-line ``STATUS=`` an operator reads in ``systemctl status``."""

    EVERY_SECONDS = 5.0

    def __init__(
        self, prober: Prober, sink: EventSink, exporter: MetricsExporter | None = None
    ) -> None:
        self.prober = prober
        self.sink = sink
        self.exporter = exporter
        self.problem: str | None = None
        self._last_at = time.monotonic()
        self._last_events = 0
        self._last_status_at = float("-inf")
        self._rate = 0.0

    def due(self) -> bool:
        return time.monotonic() - self._last_status_at >= self.EVERY_SECONDS

    def line(self) -> str:
        now = time.monotonic()
        stats = self.prober.probe_stats
        events = stats.readings + stats.errors
        if now - self._last_at >= 1.0:
            self._rate = (events - self._last_events) / (now - self._last_at)
            self._last_at, self._last_events = now, events
        self._last_status_at = now
        figures = collect_figures(self.prober, self.sink)
        shard = figures.get("shard")
        parts = [
            f"{figures['cells']} cells" + (f" (shard {shard})" if shard else ""),
            f"{self._rate:.0f} events/s",
            f"{figures['probeErrors']} probe errors",
            f"{figures['tickOverruns']} overruns",
            f"tick p99 {figures['tickDurationMs']['p99']:.0f}ms",
        ]
        if "connected" in figures:
            parts.append("nats connected" if figures["connected"] else "nats DISCONNECTED")
            parts.append(
                f"{figures['published']} published, {figures['buffered']} held, "
                f"{figures['spooled']} spooled, {figures['dropped']} dropped, "
                f"{figures['reconnects']} reconnects"
            )
        refusing = self.sink.statistics().refusing
        if refusing is not None:
            parts.append(
                f"NATS REFUSES {refusing}: {figures['permissionViolations']} permission "
                f"violations; check [daemon] host_id {self.prober.sequences.host_id!r} "
                "and the NATS user"
            )
        if self.problem:
            parts.append(self.problem)
        if self.exporter is not None and self.exporter.problem:
            parts.append(self.exporter.problem)
        return "; ".join(parts)


async def _watch_signals(
    stop: Callable[[], None],
    reload: Callable[[], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                reload()
            else:
                log.info("signal received", signal=signal.Signals(signum).name)
                stop()


async def _reloader(
    prober: Prober,
    config_path: str | None,
    requests: trio.MemoryReceiveChannel[None],
    notifier: Notifier,
    status: StatusReport,
    reloads: ReloadRecord,
    exporter: MetricsExporter,
) -> None:
    async for _ in requests:
        if config_path is None:
            log.warning("reload requested but the daemon was not started from a file")
            continue
        notifier.reloading()
        try:
            new = await trio.to_thread.run_sync(load_config, config_path)
            if prober.shard is not None:
                new = prober.shard.select(new)
        except ConfigError as exc:
            log.error(
                "reload refused: the new config is invalid; keeping the running one",
                error=str(exc),
            )
            status.problem = f"RELOAD FAILED (running the previous config): {exc}"
            reloads.last_successful = False
            notifier.ready(status.line())
            continue
        status.problem = None
        if new.daemon.host_id != prober.sequences.host_id:
            # the host id is the boot's identity (subjects, NATS user): a restart changes it
            log.warning(
                "reload: [daemon] host_id changes at the next restart",
                running=prober.sequences.host_id,
                configured=new.daemon.host_id,
            )
        if new.nats != prober.config.nats:
            prober.sink.apply_settings(new.nats)
            log.info("reload: the sink takes the new [nats] settings")
        changes = prober.apply(new)
        # a probe type no cell has now: its last tick's figures are no longer news
        configured = {name for cell in new.cells for name in cell.probe_names()}
        for name in set(prober.probe_timings) - configured:
            del prober.probe_timings[name]
        await exporter.apply(new.metrics)
        reloads.generation += 1
        reloads.last_successful = True
        reloads.loaded_at = time.time()
        log.info("reloaded", **{k: v for k, v in changes.items() if k != "kept"})
        notifier.ready(status.line())
