"""The daemon: cells, their probes, the tick, signals, and a bounded stop.

One nursery tree::

    run_daemon
    ├── sink.run                 (the NATS flusher)
    ├── signals                  (TERM/INT: stop; HUP: reload)
    └── probing
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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog
import trio

from cellos_probed import allocator
from cellos_probed.batching import ThreadBatcher
from cellos_probed.cloudevent import CloudEvent
from cellos_probed.config import CellConfig, Config, ConfigError, load_config
from cellos_probed.fd_limit import DescriptorBudget, spare_descriptors
from cellos_probed.log import RepeatedErrorFilter, probe_context
from cellos_probed.netns import NamespaceThreads
from cellos_probed.probes import (
    EMIT_NOWAIT,
    EventSink,
    EventStamper,
    HostProbe,
    ProbeContext,
    ProbeError,
    ProbeIoError,
    ProbeParseError,
    ProbeReading,
    ProbeTimeoutError,
    build_agent_envelope,
    probe_error_event,
    reading_event,
)
from cellos_probed.probes.cgroup import CgroupProbe
from cellos_probed.probes.fc_metrics import FcMetricsProbe
from cellos_probed.probes.nftables import NftablesProbe, NftTableQueries
from cellos_probed.probes.tap_link import LinkWatchers, TapLinkProbe
from cellos_probed.scheduler import TickStats, run_fixed_tick
from cellos_probed.shard import Shard
from cellos_probed.spool import spool_stats
from cellos_probed.systemd import Notifier

log = structlog.get_logger("cellos_probed.daemon")

#: how long opening what probes keep may take before the first tick (see Prober.prepare)
PREPARE_SECONDS = 10.0
#: ticks between looking whether a burst left freed heap pages to hand back
TRIM_EVERY_TICKS = 60


class SharedResources:
    """What probes of many cells share: worker-thread limits, per-namespace services.

    ``nursery`` is the services nursery of the running :class:`Prober`; a
    shared service (one netlink watcher per namespace, say) starts there
    lazily, the first time a probe asks for it.
    """

    def __init__(self) -> None:
        # One thread: cgroupfs reads never block (kernfs answers from memory),
        # so more threads only fight over the interpreter lock. With four,
        # the handing over of that lock (futex waits, context switches) was a
        # fifth of the daemon's CPU at a thousand cells (perf); with one, the
        # tick was shorter too.
        self.file_reads = trio.CapacityLimiter(1)
        #: gathers every cell's cgroup reads of a tick into a few thread hops
        # chunks of 256: a timeout still keeps the chunks read by then
        self.file_batcher = ThreadBatcher(self.file_reads, chunk_size=256)
        #: Firecracker API rounds (one epoll loop per thread, up to ROUND_SIZE VMs each)
        self.fc_rounds = trio.CapacityLimiter(2)
        #: room under the open-file limit for descriptors kept only to make reads cheaper
        self.kept_descriptors = DescriptorBudget()
        self.nursery: trio.Nursery | None = None
        #: the index of the tick being run; shared queries key their results on it
        #: so that every cell reading one table in one tick shares one query
        self.tick_index = 0
        #: ticks begun, counted here whatever index the caller gives (run once, tests)
        self.ticks_begun = 0
        #: one rtnetlink link watcher per network namespace, shared by its cells
        self.link_watchers = LinkWatchers(lambda: self.nursery, tick=lambda: self.ticks_begun)
        #: one libnftables query per (namespace, family, table) per tick, on a
        #: thread (and context) of its own per namespace
        self.nft_tables = NftTableQueries(
            NamespaceThreads(), lambda: self.nursery, lambda: self.tick_index
        )


def _room_for_kept_files(config: Config) -> int:
    """Descriptors the cgroup probe may keep: none if the operator said so, else what
    the open-file limit leaves beyond what the cells need (``fd_limit``)."""
    if not config.daemon.keep_cgroup_files:
        return 0
    return spare_descriptors(len(config.cells))


def build_probes(cell: CellConfig, shared: SharedResources) -> list[HostProbe]:
    """A cell runs exactly the probes whose table it has."""
    probes: list[HostProbe] = []
    if cell.cgroup is not None:
        probes.append(CgroupProbe(cell.cgroup, shared.file_batcher, shared.kept_descriptors))
    if cell.tap_link is not None:
        netns = None if cell.netns_resolved is None else str(cell.netns_resolved)
        probes.append(TapLinkProbe(cell.tap_link, cell.netns, netns, shared.link_watchers))
    if cell.nftables is not None:
        netns = None if cell.netns_resolved is None else str(cell.netns_resolved)
        probes.append(NftablesProbe(cell.nftables, cell.netns, netns, shared.nft_tables))
    if cell.fc_metrics is not None:
        probes.append(FcMetricsProbe(cell.fc_metrics, shared.fc_rounds))
    return probes


@dataclass
class CellRunner:
    """One cell: its attribution context and its probe instances (with their baselines).

    A probe that needs to run between ticks (draining a FIFO, say) defines
    ``async def background(self, *, task_status)``; it runs under the cell's
    ``scope``, which a reload that removes or changes the cell cancels.
    """

    config: CellConfig
    context: ProbeContext
    probes: list[HostProbe]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def make_runner(cell: CellConfig, shared: SharedResources) -> CellRunner:
    context = ProbeContext(cell.id, cell.run_id, cell.spec_signature_hash)
    return CellRunner(cell, context, build_probes(cell, shared))


@dataclass(slots=True)
class ProbeStats:
    readings: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] | None = None

    def count_error(self, kind: str) -> None:
        self.errors += 1
        if self.errors_by_kind is None:
            self.errors_by_kind = {}
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1


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
        stamper: EventStamper,
        shared: SharedResources | None = None,
    ) -> None:
        self.config = config
        self.sink = sink
        self.stamper = stamper
        self.shared = shared or SharedResources()
        self.shared.kept_descriptors.limit = _room_for_kept_files(config)
        self.runners: dict[str, CellRunner] = {
            cell.id: make_runner(cell, self.shared) for cell in config.cells
        }
        self.tick_stats = TickStats()
        self.probe_stats = ProbeStats()
        self._errors = RepeatedErrorFilter()
        self._services: trio.Nursery | None = None
        #: the probe lists the groups were made from, and the groups (see _probe_groups)
        self._groups: (
            tuple[list[list[HostProbe]], dict[tuple[Any, ...], list[tuple[CellRunner, HostProbe]]]]
            | None
        ) = None
        #: cells were replaced since the heap was last settled (allocator.settle_long_lived)
        self.reloaded_since_settle = False
        #: the share of the host's cells this process runs (None: all of them)
        self.shard: Shard | None = None

    async def run_services(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Shared services and every cell's background tasks; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self.shared.nursery = nursery
            self._services = nursery
            for runner in self.runners.values():
                await nursery.start(self._run_cell_background, runner)
            task_status.started()
            await trio.sleep_forever()

    async def _run_cell_background(
        self, runner: CellRunner, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        probe_context.set((runner.context.cell_id, None))
        started = False
        try:
            with runner.scope:
                async with trio.open_nursery() as nursery:
                    for probe in runner.probes:
                        background = getattr(probe, "background", None)
                        if background is not None:
                            await nursery.start(background)
                    task_status.started()
                    started = True
                    await trio.sleep_forever()
        finally:
            # the cell was removed or changed, or the daemon is stopping:
            # what its probes keep open between ticks goes now
            for probe in runner.probes:
                close = getattr(probe, "close", None)
                if close is not None:
                    close()
        if not started:  # cancelled by a reload before it was up: nothing to wait for
            task_status.started()

    async def prepare(
        self, runners: Iterable[CellRunner] | None = None, *, while_ticking: bool = False
    ) -> None:
        """What probes open once and keep, opened now rather than in their first tick.

        A cell's first cgroup read walks to its directory and opens its files
        (a dozen system calls; later reads are one a file): a thousand cells'
        at once in the first tick, among every other first (connections,
        ``GET /``), took longer than the probe timeout for a quarter of them
        (232 timeouts at N=1000, measured); so did 2,000 VMMs' first
        connections and ``GET /``. Probes that can (``prepare_batch``: cgroup
        directories and files; Firecracker API connections and instances)
        open theirs here, in batches, before the first tick; what is not open
        by PREPARE_SECONDS, or failed, is opened (and reported) by its tick.

        ``while_ticking`` (cells a reload added): only probes whose preparing
        may overlap a tick (``PREPARE_WHILE_TICKING``: the cgroup directory
        has a lock); a Firecracker connection must never be in two rounds.
        """
        chosen = list(self.runners.values() if runners is None else runners)
        groups: dict[Callable[[list[HostProbe]], Awaitable[None]], list[HostProbe]] = {}
        for runner in chosen:
            for probe in runner.probes:
                prepare_batch = getattr(type(probe), "prepare_batch", None)
                if while_ticking and not getattr(probe, "PREPARE_WHILE_TICKING", False):
                    continue
                if prepare_batch is not None:
                    groups.setdefault(prepare_batch, []).append(probe)
        with trio.move_on_after(PREPARE_SECONDS):
            async with trio.open_nursery() as nursery:
                for prepare_batch, probes in groups.items():
                    nursery.start_soon(prepare_batch, probes)

    async def tick(self, index: int = 0) -> None:
        """Every cell's probes, once: one task per group of probes that share a resource.

        A task per (cell, probe) cost ~40 us of spawning and cancel scopes
        each, a sixth of a core at a thousand cells; a group (one probe type
        and one batch key: a namespace, an nftables table, "every cgroup")
        is one task under one timeout, so a resource that hangs only times
        out the cells that use it.
        """
        timeout = self.config.daemon.probe_timeout_seconds
        self.shared.tick_index = index
        self.shared.ticks_begun += 1
        groups = self._probe_groups()
        self._errors.start_tick()
        async with trio.open_nursery() as nursery:
            for (probe_type, _), members in groups.items():
                nursery.start_soon(self._run_group, probe_type, members, timeout)
        held = self._errors.end_tick()
        if held is not None:
            probe_context.set(None)
            log.warning(
                "more probes failed or recovered this tick than are logged one by one", **held
            )

    def _probe_groups(self) -> dict[tuple[Any, ...], list[tuple[CellRunner, HostProbe]]]:
        """The tick's groups, worked out again only when the cells or their probes change."""
        probe_lists = [runner.probes for runner in self.runners.values()]
        cached = self._groups
        if (
            cached is not None
            and len(cached[0]) == len(probe_lists)
            and all(map(operator.is_, cached[0], probe_lists))
        ):
            return cached[1]
        groups: dict[tuple[Any, ...], list[tuple[CellRunner, HostProbe]]] = {}
        for runner in self.runners.values():
            for probe in runner.probes:
                key_of = getattr(probe, "batch_key", None)
                key = (type(probe), key_of() if key_of is not None else id(probe))
                groups.setdefault(key, []).append((runner, probe))
        self._groups = (probe_lists, groups)
        return groups

    async def _run_group(
        self, probe_type: type, members: list[tuple[CellRunner, HostProbe]], timeout: float
    ) -> None:
        results: list[ProbeReading | ProbeError | None] = [None] * len(members)
        read_batch = getattr(probe_type, "read_batch", None)
        with trio.move_on_after(timeout):
            if read_batch is not None:
                try:
                    await read_batch(
                        [(runner.context, probe) for runner, probe in members], results
                    )
                except Exception as exc:
                    probe_context.set((None, members[0][1].probe_name()))
                    log.exception("batch read raised an unexpected exception")
                    failure = _as_probe_error(exc)
                    results = [failure if r is None else r for r in results]
            else:
                for i, (runner, probe) in enumerate(members):
                    probe_context.set((runner.context.cell_id, probe.probe_name()))
                    results[i] = await self._read_one(runner, probe)
        put = getattr(self.sink, EMIT_NOWAIT, None)
        for (runner, probe), result in zip(members, results, strict=True):
            event = self._event_for(runner, probe, result, timeout)
            if put is not None:
                put(event)
            else:
                await self.sink.emit(event)

    @staticmethod
    async def _read_one(runner: CellRunner, probe: HostProbe) -> ProbeReading | ProbeError:
        try:
            return await probe.read(runner.context)
        except ProbeError as exc:
            return exc
        except Exception as exc:
            log.exception("probe raised an unexpected exception")
            return _as_probe_error(exc)

    def _event_for(
        self,
        runner: CellRunner,
        probe: HostProbe,
        result: ProbeReading | ProbeError | None,
        timeout: float,
    ) -> CloudEvent:
        """The event a probe's result becomes, counted and (when it changes) logged."""
        name = probe.probe_name()
        cell = runner.context.cell_id
        if result is None:
            result = ProbeTimeoutError(f"{name} probe did not finish within {timeout:g}s")
        if isinstance(result, ProbeReading):
            self.probe_stats.readings += 1
            if self._errors.recovered(cell, name):
                probe_context.set((cell, name))
                log.info("probe recovered")
            return reading_event(runner.context, result, self.stamper)
        self.probe_stats.count_error(result.kind)
        if self._errors.failed(cell, name, str(result)):
            probe_context.set((cell, name))
            log.warning("probe failed", kind=result.kind, error=result.message)
        return probe_error_event(
            runner.context, f"host.{name}", probe.inputs(), result, self.stamper
        )

    def apply(self, config: Config) -> dict[str, list[str]]:
        """Swap in a new config between ticks; unchanged cells keep their state."""
        new_runners: dict[str, CellRunner] = {}
        changes: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "kept": []}
        for cell_config in config.cells:
            old = self.runners.get(cell_config.id)
            if old is not None and old.config == cell_config:
                new_runners[cell_config.id] = old
                changes["kept"].append(cell_config.id)
            else:
                new_runners[cell_config.id] = make_runner(cell_config, self.shared)
                changes["changed" if old is not None else "added"].append(cell_config.id)
        changes["removed"] = [cell for cell in self.runners if cell not in new_runners]
        for cell in changes["removed"]:
            self._errors.forget_cell(cell)
        for cell_id, old in self.runners.items():
            if new_runners.get(cell_id) is not old:
                old.scope.cancel()
        if self._services is not None:
            for cell_id in changes["added"] + changes["changed"]:
                self._services.start_soon(self._run_cell_background, new_runners[cell_id])
            fresh = [new_runners[cell_id] for cell_id in changes["added"] + changes["changed"]]
            if fresh:
                self._services.start_soon(partial(self.prepare, fresh, while_ticking=True))
        self.runners = new_runners
        self.config = config
        self.shared.kept_descriptors.limit = _room_for_kept_files(config)
        self.reloaded_since_settle = True
        return changes


async def run_once(config: Config, sink: EventSink, stamper: EventStamper | None = None) -> Prober:
    """One tick, every event to ``sink``: the ``once`` command."""
    prober = Prober(config, sink, stamper or EventStamper())
    async with trio.open_nursery() as nursery:
        await nursery.start(prober.run_services)
        await prober.tick()
        nursery.cancel_scope.cancel()
    return prober


@dataclass
class DaemonHandle:
    """What a running daemon exposes to its caller (tests, the CLI)."""

    prober: Prober
    sink: Any
    stop: Callable[[], None]
    reload: Callable[[], None]


async def run_daemon(
    config: Config,
    sink: Any,
    *,
    config_path: str | None = None,
    stamper: EventStamper | None = None,
    handle_signals: bool = True,
    notifier: Notifier | None = None,
    shard: Shard | None = None,
    settle_heap: bool = False,
    task_status: trio.TaskStatus[DaemonHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until stopped; ``sink`` must offer ``run``, ``emit`` and ``drain``.

    ``settle_heap``: the daemon owns its process, so it may freeze its
    long-lived objects out of the collector's sight (``allocator.py``).

    With ``shard``, ``config`` holds the shard's cells already; reloads are
    narrowed to them the same way.
    """
    stamper = stamper or EventStamper()
    notifier = notifier or Notifier()
    prober = Prober(config, sink, stamper)
    prober.shard = shard
    status = StatusReport(prober, sink)
    stop_requested = trio.Event()
    # capacity 1: reload requests that arrive during a reload fold into one
    reload_send, reload_receive = trio.open_memory_channel[None](1)
    log.info(
        "starting",
        shard=None if shard is None else shard.label,
        cells=len(config.cells),
        tick_seconds=config.daemon.tick_seconds,
        boot=stamper.boot_id,
    )
    watchdog = notifier.watchdog_seconds
    if watchdog is not None and config.daemon.tick_seconds > watchdog / 2:
        log.warning(
            "WatchdogSec is too short for the tick: pings come once per tick",
            watchdog_seconds=watchdog,
            tick_seconds=config.daemon.tick_seconds,
        )

    async def after_tick() -> None:
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
            await sink.emit(
                build_agent_envelope(
                    prober.config.daemon.host_id, stamper.boot_id, collect_figures(prober, sink)
                )
            )
        # the watchdog is fed only here: a wedged tick loop stops feeding it
        if not notifier.tick_completed(status.line()) and status.due():
            notifier.status(status.line())

    async with trio.open_nursery() as root:
        await root.start(sink.run)

        def stop() -> None:
            if stop_requested.is_set():
                held = getattr(getattr(sink, "outbox", None), "__len__", lambda: 0)()
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
            probing.start_soon(_reloader, prober, config_path, reload_receive, notifier, status)
            notifier.ready(status.line())
            task_status.started(DaemonHandle(prober, sink, stop, reload))
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
        root.cancel_scope.cancel()
    notifier.close()


def collect_figures(prober: Prober, sink: Any) -> dict[str, Any]:
    """The daemon's own figures: the ``agent`` event's data and the ``STATUS=`` line."""
    stats = prober.probe_stats
    ticks = prober.tick_stats
    figures: dict[str, Any] = {
        "cells": len(prober.runners),
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
    sink_stats = getattr(sink, "stats", None)
    outbox = getattr(sink, "outbox", None)
    if sink_stats is not None and outbox is not None:
        jetstream = getattr(getattr(sink, "settings", None), "jetstream", None)
        figures.update(
            published=sink_stats.published,
            acknowledged=sink_stats.published if jetstream is not None else 0,
            buffered=len(outbox),
            dropped=outbox.dropped,
            gapsDeclared=sink_stats.gaps,
            reconnects=getattr(sink, "reconnects", 0),
            connected=bool(getattr(sink, "connected", False)),
            **spool_stats(outbox),
        )
    return figures


class StatusReport:
    """The one-line ``STATUS=`` an operator reads in ``systemctl status``."""

    EVERY_SECONDS = 5.0

    def __init__(self, prober: Prober, sink: Any) -> None:
        self.prober = prober
        self.sink = sink
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
        if self.problem:
            parts.append(self.problem)
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
            notifier.ready(status.line())
            continue
        status.problem = None
        if new.nats != prober.config.nats:
            apply_nats = getattr(prober.sink, "apply_settings", None)
            if apply_nats is not None:
                apply_nats(new.nats)
                log.info("reload: reconnecting with the new [nats] settings")
        changes = prober.apply(new)
        log.info("reloaded", **{k: v for k, v in changes.items() if k != "kept"})
        notifier.ready(status.line())
