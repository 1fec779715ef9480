"""Work inside a network namespace without moving the daemon there.

A :class:`NamespaceThread` is one dedicated OS thread that ``setns()``es
into a network namespace once, at start, and then runs the callables it is
handed, one at a time. Network namespaces are a per-thread attribute on
Linux, so no other thread of the daemon changes namespace, and nothing is
forked. Things that bind to the namespace they were created in (a
libnftables context, a netlink socket) are created and used on that thread.

Entering a namespace needs CAP_SYS_ADMIN; the error says so.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from cellos_probed.confine import EscapeError, open_beneath
from cellos_probed.readings import ProbeIoError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_NSFS_MAGIC = 0x6E736673


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    # os.setns arrives in Python 3.12; the daemon targets 3.11
    if _libc.setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class NamespaceError(ProbeIoError):
    """The namespace path is missing, not a namespace, or cannot be entered."""


@dataclass(frozen=True, slots=True)
class NetnsPath:
    """A cell's configured network namespace file: ``path``, under ``root`` ([paths] netns_root).

    Hashable: services keep one thread or watcher per namespace, keyed on it.
    """

    root: Path
    path: Path

    def __str__(self) -> str:
        return str(self.path)

    def open(self) -> int:
        """A descriptor of the namespace file, walked down from the root refusing symlinks.

        The tree below the root may change after the config loaded (a cell's
        supervisor may own it): a symlink there could lead to any namespace.
        O_NONBLOCK: a FIFO planted at the path must not hang the caller.
        """
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
        try:
            return open_beneath(self.root, self.path, flags)
        except EscapeError:
            raise NamespaceError(
                f"network namespace path {self} goes through a symlink; refusing it"
            ) from None
        except FileNotFoundError:
            raise NamespaceError(f"network namespace does not exist: {self}") from None
        except PermissionError:
            raise NamespaceError(f"permission denied opening network namespace {self}") from None
        except OSError as exc:
            raise NamespaceError(f"cannot open network namespace {self}: {exc.strerror}") from None

    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the namespace file (deleted and re-added: another one)."""
        fd = self.open()
        try:
            stat = os.fstat(fd)
        finally:
            os.close(fd)
        return (stat.st_dev, stat.st_ino)


def enter_netns(netns: NetnsPath) -> None:
    """``setns()`` the *calling thread* into the network namespace ``netns``."""
    fd = netns.open()
    try:
        _setns(fd, CLONE_NEWNET)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise NamespaceError(
                f"entering network namespace {netns} needs CAP_SYS_ADMIN"
            ) from None
        if exc.errno == errno.EINVAL:
            raise NamespaceError(f"not a network namespace: {netns}") from None
        raise NamespaceError(f"cannot enter network namespace {netns}: {exc.strerror}") from None
    finally:
        os.close(fd)


_STOP = object()


class NamespaceThread:
    """A thread living in one network namespace (``None``: the daemon's own)."""

    def __init__(self, netns: NetnsPath | None, name: str | None = None) -> None:
        self.netns = netns
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._main, name=name or f"netns:{netns or 'host'}", daemon=True
        )
        self._entered = threading.Event()
        self._enter_error: BaseException | None = None
        #: (st_dev, st_ino) of the namespace file when the thread was made
        self.identity: tuple[int, int] | None = None

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        if self.netns is not None:
            try:
                enter_netns(self.netns)
            except BaseException as exc:
                self._enter_error = exc
        self._entered.set()
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, deliver = job
            try:
                if self._enter_error is not None:
                    raise self._enter_error
                result: Any = ("ok", fn(*args))
            except BaseException as exc:
                result = ("error", exc)
            deliver(result)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the namespace thread; jobs run one at a time, in order.

        If the caller is cancelled the job still finishes on the thread (it
        cannot be interrupted); its result is dropped.
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[Any] = []

        def deliver(result: Any) -> None:
            box.append(result)
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        self._jobs.put((fn, args, deliver))
        await done.wait()
        status, value = box[0]
        if status == "error":
            raise value
        return value  # type: ignore[no-any-return]

    def stop(self) -> None:
        self._jobs.put(_STOP)

    @property
    def enter_error(self) -> BaseException | None:
        self._entered.wait(5)
        return self._enter_error


def _identity(netns: NetnsPath | None) -> tuple[int, int] | None:
    if netns is None:
        return None
    try:
        return netns.identity()
    except NamespaceError:
        return None  # the thread's entering reports why


class NamespaceThreads:
    """One :class:`NamespaceThread` per namespace path, created on first use.

    A thread whose namespace could not be entered is not kept, so a
    namespace created later is picked up on the next request.
    """

    def __init__(self) -> None:
        self._threads: dict[NetnsPath | None, NamespaceThread] = {}

    def get(self, netns: NetnsPath | None) -> NamespaceThread:
        thread = self._threads.get(netns)
        identity = _identity(netns)
        if thread is not None and thread.identity != identity:
            # the path now names another namespace (deleted and re-added)
            thread.stop()
            thread = None
        if thread is None:
            thread = NamespaceThread(netns)
            thread.identity = identity
            thread.start()
            self._threads[netns] = thread
        return thread

    async def run(self, netns: NetnsPath | None, fn: Callable[..., T], *args: Any) -> T:
        thread = self.get(netns)
        try:
            return await thread.run(fn, *args)
        except NamespaceError:
            if self._threads.get(netns) is thread:
                del self._threads[netns]
                thread.stop()
            raise

    def stop_all(self) -> None:
        for thread in self._threads.values():
            thread.stop()
        self._threads.clear()
