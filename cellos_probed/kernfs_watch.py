"""The kernel's signal that a cell's ``cgroup.events`` or ``memory.events`` changed.

kernfs tells a file's inotify watchers when the cgroup core or a controller
changes what the file says (``cgroup_file_notify``: ``populated`` or
``frozen`` in ``cgroup.events``, a ``memory.events`` counter), at most once
per 10 ms per file. Every cell's two files are watched on ONE inotify
descriptor, read in trio (``wait_readable``, no thread, no polling); a
change becomes a request to read that cell's cgroup now, which the daemon
makes (``Prober.read_now``).

Coalescing, per cell: the first change is read at once; changes during a
read, or within ``interval`` of its start, wait until ``interval`` has
passed and are then read together. A storm is one reading at its start and
at most one per interval after it, the last one after the last change.

A watch is on the file, not its directory: it holds the file's inode, and
kernfs signals only inodes the kernel has in memory. The cgroup probe adds
a cell's watches when it opens the cell's directory (from a worker thread:
a lock keeps the maps whole) and removes them when it lets the directory
go; the kernel removes a watch whose file is gone (``IN_IGNORED``). Watches
are not descriptors; they count against ``fs.inotify.max_user_watches``
(per user, every process of the user together).
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import math
import os
import struct
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import structlog
import trio

log = structlog.get_logger("cellos_probed.kernfs_watch")

#: the files whose change is read at once, and the triggers their readings carry;
#: when both changed, the reading says ``cgroup.events`` (it may be the final one)
WATCHED_FILES: Final = ("cgroup.events", "memory.events")

IN_MODIFY: Final = 0x00000002
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_DONT_FOLLOW: Final = 0x02000000
_EVENT: Final = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len
#: room for hundreds of events a read (an event is 16 bytes: a file watch has no name)
_READ_BYTES: Final = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)

#: reads the cells whose files changed: (trigger, cell ids)
Reader = Callable[[str, list[str]], Awaitable[None]]


def _os_error() -> OSError:
    number = ctypes.get_errno()
    return OSError(number, os.strerror(number))


class CellWatch:
    """One cell's watches: its files' watch descriptors by file name.

    ``key`` is what the reader is given (the cell id). Its methods are called
    by the cell's cgroup directory, under the directory's lock.
    """

    __slots__ = ("_watcher", "key", "wds")

    def __init__(self, watcher: KernfsWatcher, key: str) -> None:
        self._watcher = watcher
        self.key = key
        self.wds: dict[str, int] = {}

    def follow(self, dir_fd: int) -> None:
        """Watch the files of the directory just opened (or whose files changed)
        that are not watched yet: a missing file is watched once it exists."""
        self._watcher.add(self, dir_fd)

    def drop(self) -> None:
        """Remove every watch (the directory goes, or was made anew)."""
        self._watcher.remove(self)


class KernfsWatcher:
    """The shared service: one inotify descriptor for every cell, and the coalescing.

    ``run`` is started in the daemon's services nursery; until it runs (and
    after it ends) nothing is watched and ``follow`` does nothing. ``reader``
    and ``interval`` are the daemon's (``serve``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        #: wd -> the watches on that inode (two cells may name one cgroup), by file name
        self._by_wd: dict[int, dict[CellWatch, str]] = {}
        self._reader: Reader | None = None
        self._interval: Callable[[], float] = lambda: 0.0
        self._warned = False
        # coalescing, in the trio thread only
        #: cells with a change not read yet: the trigger their reading will carry
        self._pending: dict[CellWatch, str] = {}
        #: when each cell may be read again (absent: at once)
        self._not_before: dict[CellWatch, float] = {}
        #: pending cells waiting out their interval, by time (entries may be stale)
        self._waiting: list[tuple[float, int, CellWatch]] = []
        self._order = 0
        self._wake = trio.Event()

    def serve(self, reader: Reader, interval: Callable[[], float]) -> None:
        """Who reads a changed cell, and the interval a cell's readings keep apart."""
        self._reader = reader
        self._interval = interval

    def cell(self, key: str) -> CellWatch:
        return CellWatch(self, key)

    def fileno(self) -> int | None:
        """The inotify descriptor while running (its watches: ``/proc/self/fdinfo``)."""
        return self._fd

    def add(self, owner: CellWatch, dir_fd: int) -> None:
        path = f"/proc/self/fd/{dir_fd}/".encode()
        with self._lock:  # held over the add: its first event must find the wd mapped
            fd = self._fd
            if fd is None:
                return
            for name in WATCHED_FILES:
                if name in owner.wds:
                    continue
                # through the directory's descriptor: the path opened beneath the
                # cgroup root, no walk again; a symlink is watched, not followed
                wd = _libc.inotify_add_watch(fd, path + name.encode(), IN_MODIFY | IN_DONT_FOLLOW)
                if wd < 0:
                    self._add_failed(owner, name, _os_error())
                    continue
                owner.wds[name] = wd
                self._by_wd.setdefault(wd, {})[owner] = name

    def _add_failed(self, owner: CellWatch, name: str, error: OSError) -> None:
        if isinstance(error, FileNotFoundError):
            return  # no such file here (no memory controller): looked for again when
            # the directory's files change (a controller enabled) or it is opened anew
        if not self._warned:  # once: a full watch table fails every cell after
            self._warned = True
            log.warning(
                "a cgroup file cannot be watched: its changes are read only on the tick",
                cell=owner.key,
                file=name,
                error=error.strerror,
                **({"raise": "fs.inotify.max_user_watches"} if error.errno == errno.ENOSPC else {}),
            )

    def remove(self, owner: CellWatch) -> None:
        with self._lock:
            for wd in owner.wds.values():
                watching = self._by_wd.get(wd)
                if watching is None:
                    continue
                watching.pop(owner, None)
                if not watching:
                    del self._by_wd[wd]
                    if self._fd is not None:
                        # EINVAL when the kernel removed it first (the file went): fine
                        _libc.inotify_rm_watch(self._fd, wd)
            owner.wds.clear()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the kernel's signals and have the changed cells read, until cancelled."""
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            error = _os_error()
            log.warning(
                "cgroup files are not watched: their changes are read only on the tick",
                error=error.strerror,
                **(
                    {"raise": "fs.inotify.max_user_instances"}
                    if error.errno == errno.EMFILE
                    else {}
                ),
            )
            task_status.started()
            return
        with self._lock:
            self._fd = fd
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._dispatch)
                task_status.started()
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        data = os.read(fd, _READ_BYTES)
                    except BlockingIOError:
                        continue
                    self._handle(data)
        finally:
            with self._lock:
                self._fd = None
                for watching in self._by_wd.values():
                    for owner in watching:
                        owner.wds.clear()
                self._by_wd.clear()
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def _handle(self, data: bytes) -> None:
        changed: list[tuple[CellWatch, str]] = []
        with self._lock:
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    # the kernel dropped signals: whatever changed, read every cell
                    log.warning("the kernel's queue of cgroup file changes overflowed")
                    changed.extend(
                        (owner, "cgroup.events")
                        for watching in self._by_wd.values()
                        for owner in watching
                    )
                    continue
                watching = self._by_wd.get(wd)
                if watching is None:
                    continue  # a watch removed already
                if mask & IN_IGNORED:  # the file is gone: so is its watch
                    del self._by_wd[wd]
                    for owner, name in watching.items():
                        if owner.wds.get(name) == wd:
                            del owner.wds[name]
                elif mask & IN_MODIFY:
                    changed.extend(watching.items())
        for owner, name in changed:
            self._changed(owner, name)

    def _changed(self, owner: CellWatch, name: str) -> None:
        if self._pending.get(owner) == WATCHED_FILES[0]:
            return  # already pending, with the trigger that wins
        scheduled = owner in self._pending
        self._pending[owner] = name
        if scheduled:
            return
        not_before = self._not_before.get(owner, -math.inf)
        if not_before > trio.current_time():
            self._order += 1
            heapq.heappush(self._waiting, (not_before, self._order, owner))
        self._wake.set()

    def _due(self, now: float) -> dict[CellWatch, str]:
        """The pending cells that may be read now, taken off the pending list."""
        due = {
            owner: trigger
            for owner, trigger in self._pending.items()
            if self._not_before.get(owner, -math.inf) <= now
        }
        for owner in due:
            del self._pending[owner]
        while self._waiting and self._waiting[0][0] <= now:
            heapq.heappop(self._waiting)
        return due

    async def _dispatch(self) -> None:
        while True:
            now = trio.current_time()
            due = self._due(now)
            if not due:
                deadline = self._waiting[0][0] if self._waiting else math.inf
                with trio.move_on_at(deadline):
                    await self._wake.wait()
                self._wake = trio.Event()
                continue
            interval = self._interval()
            # a cell read now may be read again after the interval; those whose
            # interval has run out are forgotten (the map holds only recent cells)
            self._not_before = {owner: at for owner, at in self._not_before.items() if at > now}
            for owner in due:
                self._not_before[owner] = now + interval
            if self._reader is not None:
                for trigger, keys in _by_trigger(due.items()):
                    await self._reader(trigger, keys)


def _by_trigger(requests: Iterable[tuple[CellWatch, str]]) -> list[tuple[str, list[str]]]:
    grouped: dict[str, list[str]] = {}
    for owner, trigger in requests:
        grouped.setdefault(trigger, []).append(owner.key)
    return list(grouped.items())
