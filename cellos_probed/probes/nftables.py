"""The ``nftables`` probe: a cell's named counters and chain rule counters, through libnftables.

libnftables runs in-process through its Python binding (``pip-nftables``,
loading Debian's ``libnftables.so.1``); nothing is forked. Three facts of
the library shape this module (``../shared/reference/protocols.md`` §5):

* a context lists the namespace it was *created* in, but resolves
  interface names in the namespace of the *calling* thread: so each
  namespace gets its own context, created and used only on that
  namespace's :class:`~cellos_probed.netns.NamespaceThread` (one per
  thread, kept in a ``threading.local``);
* a context shared between threads crashes the process, and the library
  keeps process-global state: so every call holds one process-wide lock;
* each command re-reads the kernel's ruleset cache (about 10 ms for 1,000
  counters): so :class:`NftTableQueries` runs one query per (namespace,
  family, table) per tick and every cell reading that table shares it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import orjson
import structlog
import trio

from cellos_probed.config import NftablesProbeConfig
from cellos_probed.netns import NamespaceThreads, NetnsPath
from cellos_probed.probes.base import HostProbe
from cellos_probed.probes.nftables_parse import (
    CellView,
    TableSnapshot,
    cell_view,
    parse_table_listing,
    view_deltas,
    view_output,
)
from cellos_probed.probes.shared_read import read_from_shared
from cellos_probed.readings import (
    ProbeContext,
    ProbeError,
    ProbeIoError,
    ProbePlatformUnsupported,
    ProbeReading,
    ProbeTimeoutError,
)

log = structlog.get_logger("cellos_probed.probes.nftables")

#: libnftables keeps process-global state (its interface cache, one-time init)
_LIBNFTABLES_LOCK: Final = threading.Lock()
#: each namespace thread's own libnftables context
_per_thread = threading.local()
#: "internal:0:0-0: " and the like: where in our own request the error was
_LOCATION: Final = re.compile(r"^\S+:\d+:\d+-\d+: ")
_MAX_MESSAGE: Final = 200


def _thread_context() -> Any:
    """This thread's libnftables context, made on first use (so in this thread's namespace)."""
    context = getattr(_per_thread, "nft", None)
    if context is None:
        try:
            import nftables
        except ImportError:
            raise ProbePlatformUnsupported(
                "the libnftables Python binding is not installed (pip-nftables)"
            ) from None
        try:
            context = nftables.Nftables()
        except OSError:
            raise ProbePlatformUnsupported(
                "libnftables.so.1 is not installed (Debian package libnftables1)"
            ) from None
        context.set_json_output(True)
        _per_thread.nft = context
    return context


def list_request(family: str, table: str, *, with_rules: bool) -> bytes:
    """The request, in libnftables' JSON input syntax (so no name can be misread as a keyword).

    Counters alone: ``list tables`` (for the table's handle, which tells a
    recreated table apart) with ``list counters table``, one cache fill for
    both. With rules: ``list table``, about twice the cost.
    """
    if with_rules:
        commands = [{"list": {"table": {"family": family, "name": table}}}]
    else:
        commands = [
            {"list": {"tables": {"family": family}}},
            {"list": {"counters": {"family": family, "table": table}}},
        ]
    return orjson.dumps({"nftables": commands})


def _first_line(error: str) -> str:
    for line in error.splitlines():
        if line.strip():
            return _LOCATION.sub("", line.strip())[:_MAX_MESSAGE]
    return "no error message"


def libnftables_error(error: str, family: str, table: str, where: str) -> ProbeError:
    """A failed request as a short ``io`` error: never a traceback, one line of libnftables'."""
    if "Operation not permitted" in error:
        return ProbeIoError(f"reading nftables in {where} needs CAP_NET_ADMIN (EPERM)")
    if "No such file or directory" in error:
        return ProbeIoError(f"table {family} {table} does not exist in {where}")
    return ProbeIoError(f"libnftables: {_first_line(error)}")


def _namespace_identity() -> tuple[int, int] | None:
    try:
        stat = os.stat("/proc/thread-self/ns/net")
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def query_table(family: str, table: str, with_rules: bool, where: str) -> TableSnapshot:
    """List one table on the calling (namespace) thread and parse it. Blocking."""
    request = list_request(family, table, with_rules=with_rules)
    with _LIBNFTABLES_LOCK:
        rc, output, error = _thread_context().cmd(request)
    if rc != 0:
        raise libnftables_error(error.decode("utf-8", "replace"), family, table, where)
    return parse_table_listing(output, family, table, namespace=_namespace_identity())


def describe_netns(netns: NetnsPath | None) -> str:
    return "the host network namespace" if netns is None else f"network namespace {netns}"


class _Flight:
    """One query in the air, or landed: every cell of the table in this tick awaits it."""

    __slots__ = ("done", "error", "rule_readers", "snapshot", "tick", "with_rules")

    def __init__(self, tick: int, with_rules: bool) -> None:
        self.tick = tick
        self.with_rules = with_rules
        #: a cell reading a chain asked: the next tick's query lists rules from the start
        #: (and one that no chain reader asked for lets the next tick list counters only)
        self.rule_readers = False
        self.done = trio.Event()
        self.snapshot: TableSnapshot | None = None
        self.error: ProbeError | None = None

    async def result(self) -> TableSnapshot:
        if not self.done.is_set():
            # once the listing is in, the table's other cells take it without a
            # trip through the scheduler each (~10 us, a thousand cells a tick)
            await self.done.wait()
        if self.error is not None:
            # a fresh exception per cell: one object raised in many tasks shares a traceback
            raise type(self.error)(self.error.message)
        assert self.snapshot is not None
        return self.snapshot


_TableKey = tuple[NetnsPath | None, str, str]


class NftTableQueries:
    """One libnftables query per (namespace, family, table) per tick, shared (single-flight).

    The first cell to ask in a tick starts the query (in the services
    nursery when there is one, so that cell's timeout does not abandon it
    for the others); the rest await the same result. ``queries`` counts the
    queries actually run.
    """

    def __init__(
        self,
        threads: NamespaceThreads,
        nursery: Callable[[], trio.Nursery | None],
        tick: Callable[[], int],
    ) -> None:
        self._threads = threads
        self._nursery = nursery
        self._tick = tick
        self._flights: dict[_TableKey, _Flight] = {}
        self.queries = 0

    async def snapshot(
        self, netns: NetnsPath | None, family: str, table: str, *, with_rules: bool
    ) -> TableSnapshot:
        key = (netns, family, table)
        tick = self._tick()
        flight = self._flights.get(key)
        if flight is None or flight.tick != tick or (with_rules and not flight.with_rules):
            # a chain reader in the previous tick: list rules now, before one asks again
            wanted = with_rules or (flight is not None and flight.rule_readers)
            self._forget_before(tick)
            flight = self._flights[key] = _Flight(tick, wanted)
            nursery = self._nursery()
            if nursery is None:
                await self._fly(flight, key)
            else:
                nursery.start_soon(self._fly, flight, key)
        if with_rules:
            flight.rule_readers = True
        return await flight.result()

    def _forget_before(self, tick: int) -> None:
        # keep the previous tick's flights: they carry whether rules were wanted
        stale = [key for key, flight in self._flights.items() if flight.tick < tick - 1]
        for key in stale:
            del self._flights[key]

    async def _fly(self, flight: _Flight, key: _TableKey) -> None:
        netns, family, table = key
        self.queries += 1
        try:
            flight.snapshot = await self._threads.run(
                netns, query_table, family, table, flight.with_rules, describe_netns(netns)
            )
        except ProbeError as exc:
            flight.error = exc
        except Exception as exc:
            log.exception(
                "nftables query failed unexpectedly",
                netns=None if netns is None else str(netns),
                table=table,
            )
            flight.error = ProbeIoError(f"unexpected {type(exc).__name__} listing nftables")
        except BaseException:
            flight.error = ProbeTimeoutError("the shared nftables query was cancelled")
            raise
        finally:
            flight.done.set()

    def stop(self) -> None:
        self._threads.stop_all()


class NftablesProbe(HostProbe):
    """One cell's counters (and chain) from its table's shared query, with deltas."""

    def __init__(
        self,
        config: NftablesProbeConfig,
        netns: str | None,
        netns_path: NetnsPath | None,
        queries: NftTableQueries,
    ) -> None:
        self._config = config
        self._netns = netns  # as written, for inputs
        self._netns_path = netns_path  # resolved, for the namespace thread
        self._queries = queries
        self._previous: CellView | None = None
        # built once: a thousand cells read every tick
        self._inputs: dict[str, Any] = {
            "family": config.family,
            "table": config.table,
            "counters": list(config.counters),
            "netns": netns,
        }
        if config.chain is not None:
            self._inputs["chain"] = config.chain

    def probe_name(self) -> str:
        return "nftables"

    def inputs(self) -> dict[str, Any]:
        return dict(self._inputs)

    def batch_key(self) -> tuple[NetnsPath | None, str, str]:
        """Cells reading one table are read in turn by one task: they share its query."""
        return (self._netns_path, self._config.family, self._config.table)

    @classmethod
    async def read_batch(
        cls,
        jobs: Sequence[tuple[ProbeContext, NftablesProbe]],
        results: list[ProbeReading | ProbeError | None],
    ) -> None:
        """A table's cells (one batch key): its listing awaited once, then each
        cell's view in turn (``shared_read``)."""
        if not jobs:
            return
        first = jobs[0][1]
        config = first._config
        with_rules = any(probe._config.chain is not None for _, probe in jobs)

        def listing() -> Awaitable[TableSnapshot]:
            return first._queries.snapshot(
                first._netns_path, config.family, config.table, with_rules=with_rules
            )

        await read_from_shared(jobs, results, listing, NftablesProbe.reading_from)

    def reading_from(self, snapshot: TableSnapshot) -> ProbeReading:
        """This cell's reading from its table's listing, with the increases since the last."""
        config = self._config
        view = cell_view(snapshot, config.counters, config.chain)
        output = view_output(view)
        output["deltas"] = view_deltas(self._previous, view)
        output["missing"] = output.pop("missing")  # keep the documented key order
        self._previous = view
        # serialised now, while its objects are in the cache (the event embeds the bytes)
        return ProbeReading("host.nftables", self.inputs(), output, None, orjson.dumps(output))
