"""The ``tap_link`` probe: a cell's TAP device as rtnetlink sees it.

Per network namespace, one :class:`LinkWatcher` holds one ``AF_NETLINK``
socket subscribed to RTMGRP_LINK, shared by every cell whose TAP lives
there. The socket is created on a :class:`~cellos_probed.netns.NamespaceThread`
(a socket stays in the namespace it was created in) and then read natively
by trio. The watcher keeps every link's state current from RTM_NEWLINK /
RTM_DELLINK notifications, and records each change of (carrier, operstate,
admin state) with its time, so that a flap between two ticks is still seen.

It resynchronises with a dump at start, every ``resync_seconds``, and after
the socket overran (ENOBUFS: notifications were lost). The dump is requested
on the *same* socket as the notifications: the kernel queues dump chunks and
notifications in the order it produced them, so applying them in arrival
order never lets an older notification overwrite newer dumped state.

The kernel announces a link's changes of state, not its traffic, so a
link's counters (``IFLA_STATS64``) are current only in a dump: each tick
asks for one dump per namespace (:meth:`LinkWatcher.refresh`, on the same
socket) and reads that namespace's cells from the cache once it is in. One
request and its replies (~1.5 KB a link) per namespace, whatever the number
of its cells, and no fork; the message of a link whose state did not change
costs the parse of its counters only. Between those dumps the cache still
follows every notification, so transitions keep their own times.
"""

from __future__ import annotations

import errno
import itertools
import operator
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import structlog
import trio

from cellos_probed.cloudevent import rfc3339_millis
from cellos_probed.config import TapLinkProbeConfig
from cellos_probed.netns import NamespaceError, NamespaceThread, NetnsPath
from cellos_probed.probes.base import HostProbe
from cellos_probed.probes.rtnl import (
    NLM_F_DUMP_INTR,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTM_DELLINK,
    RTM_NEWLINK,
    RTMGRP_LINK,
    STATS_KEYS,
    LinkInfo,
    LinkStats,
    iter_messages,
    link_dump_request,
    parse_error_code,
    parse_link,
    parse_link_index,
)
from cellos_probed.probes.shared_read import read_from_shared
from cellos_probed.readings import (
    ProbeContext,
    ProbeError,
    ProbeIoError,
    ProbeParseError,
    ProbeReading,
)

log = structlog.get_logger("cellos_probed.tap_link")

#: Room for a burst of notifications: 1,000 TAPs flapping at once queue ~3 MB.
RECEIVE_BUFFER_BYTES: Final = 8 * 1024 * 1024
#: The kernel sends dump chunks of at most 32 KiB; notifications are ~1.5 KiB.
DATAGRAM_BYTES: Final = 64 * 1024
#: Transitions kept per interface for cells that have not read them yet.
HISTORY_PER_INTERFACE: Final = 1024

#: linux/asm-generic/socket.h; Python's socket module does not name it
SO_RCVBUFFORCE: Final = 33

Identity = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Transition:
    serial: int
    at: datetime
    carrier: bool | None
    operstate: str
    admin_up: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "at": rfc3339_millis(self.at),
            "carrier": self.carrier,
            "operstate": self.operstate,
            "admin_up": self.admin_up,
        }


def open_link_socket(receive_buffer: int) -> socket.socket:
    """A NETLINK_ROUTE socket in the calling thread's namespace, bound to RTMGRP_LINK."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        try:  # FORCE lifts net.core.rmem_max (needs CAP_NET_ADMIN)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((0, RTMGRP_LINK))
    except BaseException:
        sock.close()
        raise
    return sock


class LinkWatcher:
    """Every link of one network namespace, kept current from netlink."""

    def __init__(
        self,
        netns: NetnsPath | None,
        identity: Identity | None,
        serials: Callable[[], int],
        *,
        receive_buffer: int = RECEIVE_BUFFER_BYTES,
        resync_seconds: float = 60.0,
    ) -> None:
        self.netns = netns
        self.identity = identity
        self._next_serial = serials
        self._receive_buffer = receive_buffer
        self._resync_seconds = resync_seconds
        self.by_name: dict[str, LinkInfo] = {}
        self._by_index: dict[int, LinkInfo] = {}
        #: every link's counters as of the latest message about it, by ifindex
        self.counters: dict[int, LinkStats] = {}
        self._history: dict[str, deque[Transition]] = {}
        self.error: ProbeError | None = None
        self.failed_at = 0.0
        self.last_used = time.monotonic()
        self.synced = trio.Event()
        #: set (and replaced) after every batch of messages is applied
        self.changed = trio.Event()
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()
        self.overruns = 0
        self.dumps = 0
        self._sock: trio.socket.SocketType | None = None
        self._dump_seq = 0
        self._dump_ended = 0  # the sequence number of the last dump whose end was read
        self._dump_end = trio.Event()  # set (and replaced) at each dump's end, and on failure
        self._dump_seen: set[int] | None = None  # indices seen while a dump is under way
        self._dump_interrupted = False
        self._dump_wanted = False

    @property
    def _log_netns(self) -> str | None:
        return None if self.netns is None else str(self.netns)

    @property
    def where(self) -> str:
        return (
            "the host network namespace"
            if self.netns is None
            else f"network namespace {self.netns}"
        )

    # -- what probes read ------------------------------------------------------------------

    def link(self, name: str) -> LinkInfo | None:
        return self.by_name.get(name)

    def transitions_since(self, name: str, serial: int) -> list[Transition]:
        history = self._history.get(name)
        if not history or history[-1].serial <= serial:
            return []
        newer = list(itertools.takewhile(lambda t: t.serial > serial, reversed(history)))
        newer.reverse()
        return newer

    @property
    def resync_pending(self) -> bool:
        """A dump is due as soon as the one under way (if any) is done."""
        return self._dump_wanted

    async def refresh(self) -> None:
        """Until a dump asked for after this call is in: every link's counters as of now.

        Readers that ask together share one dump; a dump under way when one
        asks began too early and is followed by the next.
        """
        wanted = self._dump_seq + 1
        await self.request_resync()
        while self._dump_ended < wanted and self.error is None:
            await self._dump_end.wait()
        if self.error is not None:
            raise self.error

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds after some batch of notifications (tests, demo)."""
        while not predicate():
            await self.changed.wait()

    # -- the task --------------------------------------------------------------------------

    async def run(self) -> None:
        """Open the socket in the namespace, dump, then follow notifications until stopped."""
        try:
            with self.scope:
                await self._run()
        except ProbeError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(ProbeIoError(f"netlink socket in {self.where}: {exc.strerror}"))
        except Exception as exc:  # a bug here must cost this namespace's cells, not the daemon
            log.exception("link watcher failed", netns=self._log_netns)
            self._fail(
                ProbeIoError(f"the link watcher of {self.where} failed: {type(exc).__name__}")
            )
        finally:
            if self._sock is not None:
                self._sock.close()
            if self.error is None:  # stopped: readers waiting for the first dump must not hang
                self._fail(ProbeIoError(f"the link watcher of {self.where} stopped"))

    def _fail(self, error: ProbeError) -> None:
        self.error = error
        self.failed_at = time.monotonic()
        self.synced.set()
        self.stopped.set()
        self._dump_end.set()
        self._wake()

    async def _run(self) -> None:
        thread = NamespaceThread(self.netns, name=f"netlink:{self.netns or 'host'}")
        thread.start()
        try:
            # shielded: the socket is made in well under a millisecond, and a dropped
            # result would leave it open
            with trio.CancelScope(shield=True):
                raw = await thread.run(open_link_socket, self._receive_buffer)
        finally:
            thread.stop()  # the socket keeps its namespace; the thread is not needed again
        self._sock = trio.socket.from_stdlib_socket(raw)
        await self.request_resync()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._resync_periodically)
            await self._receive_forever()

    async def _receive_forever(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = await self._sock.recv(DATAGRAM_BYTES)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # the receive queue overflowed: notifications were lost, the dump restores
                self.overruns += 1
                log.warning(
                    "netlink receive queue overflowed; resynchronising", netns=self._log_netns
                )
                await self.request_resync()
                continue
            self.apply(data, datetime.now(UTC))
            if self._dump_wanted and self._dump_seen is None:
                await self.request_resync()

    async def _resync_periodically(self) -> None:
        while True:
            await trio.sleep(self._resync_seconds)
            await self.request_resync()

    async def request_resync(self) -> None:
        if self._dump_seen is not None:  # one dump at a time per socket (else EBUSY)
            self._dump_wanted = True
            return
        assert self._sock is not None
        await self._sock.send(self.begin_dump())

    def begin_dump(self) -> bytes:
        """Note that a dump is under way; returns its request, for the socket."""
        self._dump_wanted = False
        self._dump_seq += 1
        self._dump_seen = set()
        self._dump_interrupted = False
        return link_dump_request(self._dump_seq)

    # -- applying messages -----------------------------------------------------------------

    def apply(self, data: bytes, at: datetime) -> None:
        """Apply one datagram: dump replies and notifications alike, in order."""
        dump_done = False
        for message in iter_messages(data):
            if message.type == RTM_NEWLINK:
                if message.flags & NLM_F_DUMP_INTR:
                    self._dump_interrupted = True
                self._newlink(message.payload, at)
            elif message.type == RTM_DELLINK:
                self._remove(parse_link_index(message.payload))
            elif message.type == NLMSG_DONE and message.seq == self._dump_seq:
                dump_done = True
            elif message.type == NLMSG_ERROR and message.seq == self._dump_seq:
                code = parse_error_code(message.payload)
                if code:
                    raise ProbeIoError(f"link dump in {self.where} failed: {os.strerror(code)}")
        if dump_done:
            self._finish_dump()
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _newlink(self, payload: memoryview, at: datetime) -> None:
        index = parse_link_index(payload)
        old = self._by_index.get(index)
        stats = None if old is None else old.counters_if_unchanged(payload)
        if stats is None:  # a state not seen yet (or no counters): parsed whole
            link, stats = parse_link(payload)
            self._update(link, at)
        elif self._dump_seen is not None:
            self._dump_seen.add(index)
        if stats is None:
            self.counters.pop(index, None)
        else:
            self.counters[index] = stats

    def _update(self, link: LinkInfo, at: datetime) -> None:
        old = self._by_index.get(link.index)
        if old is not None and old.name != link.name:  # renamed
            self._forget_name(old)
        self._by_index[link.index] = link
        if link.name is not None:
            self.by_name[link.name] = link
        if self._dump_seen is not None:
            self._dump_seen.add(link.index)
        appeared = old is None and self.synced.is_set()
        if link.name is not None and (appeared or (old is not None and old.state != link.state)):
            history = self._history.get(link.name)
            if history is None:
                history = self._history[link.name] = deque(maxlen=HISTORY_PER_INTERFACE)
            history.append(
                Transition(self._next_serial(), at, link.carrier, link.operstate, link.admin_up)
            )

    def _remove(self, index: int) -> None:
        self.counters.pop(index, None)
        old = self._by_index.pop(index, None)
        if old is not None:
            self._forget_name(old)
        if self._dump_seen is not None:
            self._dump_seen.discard(index)

    def _forget_name(self, link: LinkInfo) -> None:
        if link.name is not None and self.by_name.get(link.name) is link:
            del self.by_name[link.name]

    def _finish_dump(self) -> None:
        seen, self._dump_seen = self._dump_seen, None
        self._dump_ended = self._dump_seq
        self._dump_end.set()
        self._dump_end = trio.Event()
        if self._dump_interrupted:  # links changed while being dumped: the dump is not whole
            self._dump_wanted = True
        elif seen is not None:
            for index in [i for i in self._by_index if i not in seen]:
                self._remove(index)  # deleted while notifications were being lost
            self.dumps += 1
            self.synced.set()


class LinkWatchers:
    """The shared service: one :class:`LinkWatcher` per namespace path, started on first use.

    ``nursery`` returns the daemon's services nursery, where watchers run.
    A watcher that failed is kept (with its error) for ``retry_seconds`` so
    that a cell whose path is not a namespace does not cost a thread per tick.
    """

    def __init__(
        self,
        nursery: Callable[[], trio.Nursery | None],
        *,
        tick: Callable[[], int] | None = None,
        receive_buffer: int = RECEIVE_BUFFER_BYTES,
        resync_seconds: float = 60.0,
        retry_seconds: float = 5.0,
        idle_seconds: float = 120.0,
    ) -> None:
        self._nursery = nursery
        self._tick = tick
        #: namespace -> (tick, identity): looked at once a tick when ``tick`` is given
        self._looked_at: dict[NetnsPath, tuple[int, Identity]] = {}
        self._receive_buffer = receive_buffer
        self._resync_seconds = resync_seconds
        self._retry_seconds = retry_seconds
        self._idle_seconds = idle_seconds
        self._watchers: dict[NetnsPath | None, LinkWatcher] = {}
        self._serials = itertools.count(1)
        #: the serial of the newest transition of any namespace
        self.last_serial = 0

    def _next_serial(self) -> int:
        self.last_serial = next(self._serials)
        return self.last_serial

    async def watcher(self, netns: NetnsPath | None) -> LinkWatcher:
        """The synchronised watcher of ``netns`` (``None``: the host's), started if needed.

        The namespace file is looked at on every call, or once a tick with
        ``tick`` (the daemon's: a thousand cells of one namespace are read in
        turn within milliseconds): a path deleted, or deleted and made again,
        must never be answered from the namespace it used to name.
        """
        now = time.monotonic()
        current = self._watchers.get(netns)
        identity: Identity | None = None
        if netns is not None:
            tick = None if self._tick is None else self._tick()
            looked = self._looked_at.get(netns)
            if looked is not None and looked[0] == tick:
                identity = looked[1]
            else:
                try:
                    identity = netns.identity()
                except NamespaceError:
                    self._looked_at.pop(netns, None)
                    self._discard(netns)  # let go of a deleted (or refused) namespace
                    raise
            if current is not None and current.identity != identity:
                self._discard(netns)  # the path names another namespace now
                current = None
            if tick is not None:
                self._looked_at[netns] = (tick, identity)
        if current is not None and current.error is not None:
            if now - current.failed_at < self._retry_seconds:
                raise current.error
            self._discard(netns)
            current = None
        if current is None:
            current = self._start(netns, identity)
        current.last_used = now
        if not current.synced.is_set():
            await current.synced.wait()
        if current.error is not None:
            raise current.error
        return current

    def _start(self, key: NetnsPath | None, identity: Identity | None) -> LinkWatcher:
        nursery = self._nursery()
        if nursery is None:
            raise ProbeIoError("the link watcher service is not running")
        watcher = LinkWatcher(
            key,
            identity,
            self._next_serial,
            receive_buffer=self._receive_buffer,
            resync_seconds=self._resync_seconds,
        )
        self._watchers[key] = watcher
        nursery.start_soon(self._supervise, watcher)
        return watcher

    async def _supervise(self, watcher: LinkWatcher) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher.run)
            nursery.start_soon(self._expire_when_unused, watcher)
            await watcher.stopped.wait()
            nursery.cancel_scope.cancel()

    async def _expire_when_unused(self, watcher: LinkWatcher) -> None:
        # a watcher nobody reads (its cells were removed) must not keep its namespace alive
        while True:
            idle = time.monotonic() - watcher.last_used
            if idle >= self._idle_seconds:
                if self._watchers.get(watcher.netns) is watcher:
                    del self._watchers[watcher.netns]
                    if watcher.netns is not None:  # a path used no more: nothing kept for it
                        self._looked_at.pop(watcher.netns, None)
                watcher.scope.cancel()
                return
            await trio.sleep(self._idle_seconds - idle)

    def _discard(self, key: NetnsPath | None) -> None:
        watcher = self._watchers.pop(key, None)
        if watcher is not None:
            watcher.scope.cancel()


def stats_deltas(
    baseline: tuple[int, LinkStats] | None, index: int, stats: LinkStats
) -> dict[str, Any] | None:
    """The counters' increase since ``baseline`` (the previous reading's ifindex and
    counters); ``None`` on the first reading.

    Another ifindex is another device, and a counter that went down was
    restarted: the baseline then restarts at zero, so the deltas are the
    counters themselves and ``reset`` is true (as the cgroup probe's).
    """
    if baseline is None:
        return None
    before_index, before = baseline
    increase = tuple(map(operator.sub, stats, before))
    if before_index != index or min(increase) < 0:
        return {"stats": dict(zip(STATS_KEYS, stats, strict=True)), "reset": True}
    return {"stats": dict(zip(STATS_KEYS, increase, strict=True)), "reset": False}


#: the deltas of a reading with no traffic since the previous one (shared: read only)
_STILL: Final[dict[str, Any]] = {"stats": dict.fromkeys(STATS_KEYS, 0), "reset": False}
_STILL_JSON: Final = orjson.dumps(_STILL)


class TapLinkProbe(HostProbe):
    """One cell's TAP: its state from the namespace's watcher, its changes since last read,
    and its counters with their increase."""

    def __init__(
        self,
        config: TapLinkProbeConfig,
        netns: str | None,
        netns_path: NetnsPath | None,
        watchers: LinkWatchers,
    ) -> None:
        self._config = config
        self._netns = netns
        self._netns_path = netns_path
        self._watchers = watchers
        self._cursor: int | None = None
        #: the previous reading's ifindex and counters, and those as output and JSON
        self._last: tuple[int, LinkStats, dict[str, int], bytes] | None = None

    def probe_name(self) -> str:
        return "tap_link"

    def inputs(self) -> dict[str, Any]:
        return {"interface": self._config.interface, "netns": self._netns}

    def batch_key(self) -> NetnsPath | None:
        """Cells of one namespace are read in turn by one task: they share its watcher."""
        return self._netns_path

    async def _watcher(self) -> LinkWatcher:
        watcher = await self._watchers.watcher(self._netns_path)
        if self._cursor is None:  # changes are reported from the moment this cell looked
            self._cursor = self._watchers.last_serial
        return watcher

    async def _refreshed_watcher(self) -> LinkWatcher:
        watcher = await self._watcher()
        await watcher.refresh()
        return watcher

    async def background(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start watching before the first tick, so changes from daemon start on are seen."""
        task_status.started()
        try:
            await self._watcher()
        except ProbeError:
            pass  # the tick's read reports it

    @classmethod
    async def read_batch(
        cls,
        jobs: Sequence[tuple[ProbeContext, TapLinkProbe]],
        results: list[ProbeReading | ProbeError | None],
    ) -> None:
        """A namespace's cells (one batch key): its watcher looked up and its links dumped
        once, then each cell in turn (``shared_read``)."""
        if jobs:
            await read_from_shared(
                jobs, results, jobs[0][1]._refreshed_watcher, TapLinkProbe.reading_from
            )

    def reading_from(self, watcher: LinkWatcher) -> ProbeReading:
        """This cell's link as ``watcher`` knows it, its transitions since the last
        reading, its counters and their increase."""
        name = self._config.interface
        link = watcher.link(name)
        if link is None:
            raise ProbeIoError(f"interface {name} does not exist in {watcher.where}")
        stats = watcher.counters.get(link.index)
        if stats is None:
            raise ProbeParseError(f"the kernel sent no IFLA_STATS64 for {name} in {watcher.where}")
        if self._cursor is None:  # changes are reported from the moment this cell looked
            self._cursor = self._watchers.last_serial
        transitions = watcher.transitions_since(name, self._cursor)
        self._cursor = self._watchers.last_serial
        last = self._last
        deltas: dict[str, Any] | None
        if last is not None and last[0] == link.index and last[1] == stats:
            # nothing moved (an idle VM): the previous reading's figures again
            counters, counters_json, deltas, deltas_json = last[2], last[3], _STILL, _STILL_JSON
        else:
            counters = dict(zip(STATS_KEYS, stats, strict=True))
            counters_json = orjson.dumps(counters)
            deltas = stats_deltas(None if last is None else last[:2], link.index, stats)
            deltas_json = orjson.dumps(deltas)
            self._last = (link.index, stats, counters, counters_json)
        fields, head = link.output_json()
        changes = [t.as_json() for t in transitions]
        return ProbeReading(
            "host.tap_link",
            self.inputs(),
            {**fields, "transitions": changes, "stats": counters, "deltas": deltas},
            None,
            (
                head,
                b',"transitions":',
                orjson.dumps(changes) if changes else b"[]",
                b',"stats":',
                counters_json,
                b',"deltas":',
                deltas_json,
                b"}",
            ),
        )
