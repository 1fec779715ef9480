"""The ``cgroup`` probe: a cell's cgroup-v2 leaf files.

Fetching (``read_cgroup_files``, blocking, run in a worker thread) is split
from parsing (``cgroup_parse``, pure). Files are opened relative to the
cgroup directory's descriptor with ``O_NOFOLLOW``, so a symlink planted in a
watched directory is refused rather than followed.

Besides the tick, a cell's cgroup is read when the kernel signals a change
of its ``cgroup.events`` or ``memory.events`` (``kernfs_watch``): such a
reading says which (``output.trigger``), reads ``cgroup.events`` too, and is
the cell's final one (``"final": true``) when it is the first to see
``populated`` 0 after one that saw 1 (or after none that read it: the
daemon may have started while the cell ran).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import outcome
import structlog
import trio

from cellos_probed.batching import ThreadBatcher
from cellos_probed.cgroupfs import is_cgroup2
from cellos_probed.config import CgroupProbeConfig
from cellos_probed.confine import EscapeError, open_beneath
from cellos_probed.fd_limit import KEPT_PER_CELL, DescriptorBudget
from cellos_probed.kernfs_watch import CellWatch
from cellos_probed.probes.base import HostProbe
from cellos_probed.probes.cgroup_parse import (
    counter_deltas,
    output_key,
    parse_flat_keyed,
    parse_pressure,
    parse_single_value,
)
from cellos_probed.readings import (
    ProbeContext,
    ProbeError,
    ProbeIoError,
    ProbeParseError,
    ProbeReading,
)

log = structlog.get_logger("cellos_probed.cgroup")

#: Every file the probe reads, in output order, with its format.
CGROUP_FILES: Final = (
    ("memory.events", "keyed"),
    ("cpu.stat", "keyed"),
    ("pids.events", "keyed"),
    ("memory.current", "single"),
    ("memory.peak", "single"),
    ("pids.current", "single"),
    ("cpu.pressure", "pressure"),
    ("memory.pressure", "pressure"),
    ("io.pressure", "pressure"),
)
#: What a reading the kernel's signal triggered reads besides: ``populated`` and
#: ``frozen``. Not on the tick: its changes are signalled, and signalled readings read it.
EVENTS_FILE: Final = "cgroup.events"
#: The counter files whose increase is reported in ``deltas``.
DELTA_FILES: Final = ("memory.events", "pids.events", "cpu.stat")
#: The largest of these files is ``cpu.stat`` at well under 1 KiB.
MAX_FILE_BYTES: Final = 64 * 1024

_PARSERS: Final = {
    "keyed": parse_flat_keyed,
    "single": parse_single_value,
    "pressure": parse_pressure,
}


@dataclass(frozen=True, slots=True)
class CgroupFiles:
    """What one fetch found: file contents by name, absent files, directory identity."""

    contents: dict[str, str]
    missing: list[str]
    directory_id: tuple[int, int]


def _open_file(dir_fd: int, name: str) -> int | None:
    """``name`` in the directory, opened without following a symlink; None if absent."""
    try:
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ProbeIoError(f"{name} is a symlink; refusing to follow it") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ProbeIoError(f"permission denied reading {name}") from None
        raise ProbeIoError(f"cannot open {name}: {exc.strerror}") from None


class _DirectoryGone(Exception):
    """The directory a descriptor holds was removed (a file read said ENODEV)."""


def _read_open_file(fd: int, name: str) -> str:
    # One read from offset 0: cgroupfs (kernfs seq_file) generates the text
    # afresh for a read at 0 and hands over all it has up to the size asked,
    # as do regular files; asking one byte more than the bound tells an
    # oversized file from a full one.
    try:
        data = os.pread(fd, MAX_FILE_BYTES + 1, 0)
    except OSError as exc:
        return _text(exc.errno or errno.EIO, name)
    return _text(data, name)


def _text(read: bytes | int, name: str) -> str:
    """A file's text from what its read gave: its bytes, or the errno it failed with."""
    if isinstance(read, int):
        if read == errno.ENODEV:  # the cgroup (or the file's controller) was removed
            raise _DirectoryGone
        raise ProbeIoError(f"cannot read {name}: {os.strerror(read)}")
    if len(read) > MAX_FILE_BYTES:
        raise ProbeParseError(f"{name}: larger than {MAX_FILE_BYTES} bytes, not read")
    try:
        return read.decode("ascii")
    except UnicodeDecodeError:
        raise ProbeParseError(f"{name}: not ASCII text") from None


def _with_events_file(
    dir_fd: int, contents: dict[str, str], missing: list[str]
) -> tuple[dict[str, str], list[str]]:
    """``cgroup.events`` added to what was read (opened, read and closed: it is read
    only for signalled readings, so it is not kept)."""
    fd = _open_file(dir_fd, EVENTS_FILE)
    if fd is None:
        return contents, [*missing, EVENTS_FILE]
    try:
        contents[EVENTS_FILE] = _read_open_file(fd, EVENTS_FILE)
    finally:
        os.close(fd)
    return contents, missing


def _read_files(dir_fd: int) -> tuple[dict[str, str], list[str]]:
    """Every file opened, read and closed."""
    contents: dict[str, str] = {}
    missing: list[str] = []
    for name, _ in CGROUP_FILES:
        fd = _open_file(dir_fd, name)
        if fd is None:
            missing.append(name)
            continue
        try:
            contents[name] = _read_open_file(fd, name)
        finally:
            os.close(fd)
    return contents, missing


#: what lists the controllers whose files a cgroup has: it changes when one is enabled
CONTROLLERS_FILE: Final = "cgroup.controllers"


class _KeptFiles:
    """A cgroup2 directory's files, held open between reads.

    kernfs makes a file's text anew for every read at offset 0 and says
    ENODEV once the cgroup, or the controller the file belongs to, is gone:
    a kept descriptor is one ``pread`` a file a tick instead of open, read
    and close, a third of the cost (docs/performance.md, "cgroup reads").
    A file that is missing (its controller not enabled here) appears when
    the controller is enabled, which ``cgroup.controllers`` shows: while
    something is missing, that file is read with the others, and a change
    means looking again.
    """

    __slots__ = ("controllers", "fds", "missing", "names", "watching")

    def __init__(self, dir_fd: int) -> None:
        self.names: list[str] = []
        self.missing: list[str] = []
        #: what one read takes: cgroup.controllers first while ``watching``, then the files
        self.fds: list[int] = []
        self.watching = False
        self.controllers = ""
        try:
            controllers_fd = _open_file(dir_fd, CONTROLLERS_FILE)
            if controllers_fd is not None:
                self.fds.append(controllers_fd)
                self.controllers = _read_open_file(controllers_fd, CONTROLLERS_FILE)
            for name, _ in CGROUP_FILES:
                fd = _open_file(dir_fd, name)
                if fd is None:
                    self.missing.append(name)
                else:
                    self.names.append(name)
                    self.fds.append(fd)
        except BaseException:
            self.close()
            raise
        if controllers_fd is not None and not self.missing:
            os.close(self.fds.pop(0))  # nothing to look for: no need to watch
        self.watching = controllers_fd is not None and bool(self.missing)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def read(self, dir_fd: int) -> tuple[dict[str, str], list[str]] | None:
        """Every kept file's text; None when a missing file has (or may have) appeared."""
        if self.missing and not self.watching:  # nothing tells us: look for each of them
            for name in self.missing:
                fd = _open_file(dir_fd, name)
                if fd is not None:
                    os.close(fd)
                    return None
        fds = self.fds
        if self.watching:
            if _read_open_file(fds[0], CONTROLLERS_FILE) != self.controllers:
                return None
            fds = fds[1:]
        texts = {name: _read_open_file(fd, name) for name, fd in zip(self.names, fds, strict=True)}
        return texts, self.missing


class CgroupDirectory:
    """One cell's cgroup directory, opened beneath its root once and then kept.

    Walking the path from the root every tick (a descriptor per component,
    then ``fstat``) was a third of the probe's system calls. The kept
    descriptor goes on naming the directory it opened: when the cgroup is
    removed its files are gone (``ENOENT``, or ``ENODEV`` mid-read), and the
    path is walked again, so a cgroup created anew at the path is found and
    its new identity resets the baselines. (A cgroup renamed away is followed;
    cgroup managers remove a cell's cgroup, they do not rename it.)

    On cgroup2 the files are kept open too (:class:`_KeptFiles`). Elsewhere
    (a tree in the kernel's format on a regular filesystem, as the tests
    build) a file replaced by a rename would leave a kept descriptor reading
    the old one, so there each file is opened anew for every read.

    Read from a worker thread while the trio thread may :meth:`close` it
    (its cell removed by a reload): the lock keeps a descriptor from being
    closed, and its number reused, under a read.

    With ``watch``, the directory's ``cgroup.events`` and ``memory.events``
    are watched from the moment it is opened (before its first read: no
    change falls between) until it is let go, and watched anew when it is
    opened again or its files change.
    """

    __slots__ = ("_budget", "_closed", "_fd", "_identity", "_kept", "_kernfs", "_lock", "_watch")

    def __init__(
        self, budget: DescriptorBudget | None = None, watch: CellWatch | None = None
    ) -> None:
        #: room for kept files under the open-file limit (None: no bound)
        self._budget = budget
        self._watch = watch
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._identity = (0, 0)
        self._kernfs = False
        self._kept: _KeptFiles | None = None
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()

    def __del__(self) -> None:
        # a probe dropped without close() (a test's, a one-off read's): no descriptor
        # leaks (its watches, if any, are the daemon's to remove: it closes its probes)
        self._close_descriptors()

    def _drop(self) -> None:
        if self._watch is not None:
            self._watch.drop()
        self._close_descriptors()

    def _close_descriptors(self) -> None:
        self._let_kept_go()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def held_descriptors(self) -> int:
        """How many descriptors this directory holds now (the directory's and its files')."""
        kept = self._kept
        if self._fd is None:
            return 0
        return 1 + (0 if kept is None else len(kept.fds))

    def read(
        self, directory: Path, label: str, root: Path | None, *, events: bool = False
    ) -> CgroupFiles:
        """The files, and ``cgroup.events`` too with ``events``."""
        with self._lock:
            if self._closed:
                raise ProbeIoError(f"cgroup probe for {label} was closed")
            if self._fd is not None:
                try:
                    contents, missing = self._read(events)
                except _DirectoryGone:
                    contents = {}
                if contents:
                    return CgroupFiles(contents, missing, self._identity)
                self._drop()  # gone (or emptied): look at what the path holds now
            self._fd, self._identity, self._kernfs = _open_directory(directory, label, root)
            if self._watch is not None:
                self._watch.follow(self._fd)
            try:
                contents, missing = self._read(events)
            except _DirectoryGone:
                raise ProbeIoError(f"cgroup directory was removed: {label}") from None
            if not contents and not os.path.isdir(directory):
                raise ProbeIoError(f"cgroup directory was removed: {label}")
            return CgroupFiles(contents, missing, self._identity)

    def _let_kept_go(self) -> None:
        if self._kept is not None:
            self._kept.close()
            self._kept = None
            if self._budget is not None:
                self._budget.give_back(KEPT_PER_CELL)

    def _read(self, events: bool) -> tuple[dict[str, str], list[str]]:
        contents, missing = self._read_files()
        if events and contents:
            assert self._fd is not None
            return _with_events_file(self._fd, contents, missing)
        return contents, missing

    def _read_files(self) -> tuple[dict[str, str], list[str]]:
        assert self._fd is not None
        if not self._kernfs:
            return _read_files(self._fd)
        if self._kept is not None and self._budget is not None and self._budget.over():
            self._let_kept_go()  # a reload added cells: their sockets need the room
        if self._kept is not None:
            read = self._kept.read(self._fd)
            if read is not None:
                return read
            self._let_kept_go()  # a missing file may be there now: open them again
        if self._budget is not None and not self._budget.take(KEPT_PER_CELL):
            return _read_files(self._fd)  # no room under the open-file limit
        try:
            self._kept = _KeptFiles(self._fd)
        except BaseException:
            if self._budget is not None:
                self._budget.give_back(KEPT_PER_CELL)
            raise
        if self._watch is not None:  # a file may have appeared (a controller enabled)
            self._watch.follow(self._fd)
        read = self._kept.read(self._fd)
        # None: cgroup.controllers changed between its first read and now; next time
        return read if read is not None else _read_files(self._fd)


def _open_directory(
    directory: Path, label: str, root: Path | None
) -> tuple[int, tuple[int, int], bool]:
    """The directory's descriptor, its identity, and whether it is on cgroup2."""
    try:
        dir_fd = open_beneath(root or directory.parent, directory, os.O_RDONLY, directory=True)
    except EscapeError:
        raise ProbeIoError(f"cgroup path {label} goes through a symlink; refusing it") from None
    except FileNotFoundError:
        raise ProbeIoError(f"cgroup directory does not exist: {label}") from None
    except NotADirectoryError:
        raise ProbeIoError(f"cgroup path is not a directory: {label}") from None
    except PermissionError:
        raise ProbeIoError(f"permission denied opening cgroup directory: {label}") from None
    except OSError as exc:
        raise ProbeIoError(f"cannot open cgroup directory {label}: {exc.strerror}") from None
    try:
        stat = os.fstat(dir_fd)
        kernfs = is_cgroup2(dir_fd)
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd, (stat.st_dev, stat.st_ino), kernfs


def read_cgroup_files(
    directory: Path,
    label: str,
    root: Path | None = None,
    held: CgroupDirectory | None = None,
    *,
    events: bool = False,
) -> CgroupFiles:
    """Read every file of :data:`CGROUP_FILES` in ``directory`` (blocking), and
    :data:`EVENTS_FILE` with ``events``.

    The directory is reached from ``root`` one component at a time, refusing
    symlinks, and each file is opened relative to it with ``O_NOFOLLOW``.
    With ``held``, the directory's descriptor is kept from one call to the next.
    """
    directory_held = held if held is not None else CgroupDirectory()
    try:
        return directory_held.read(directory, label, root, events=events)
    finally:
        if held is None:
            directory_held.close()


#: (file, its output key, its parser) in output order, worked out once
_FILE_PLAN: Final = tuple((name, output_key(name), _PARSERS[kind]) for name, kind in CGROUP_FILES)
#: (output key) of the counter files whose increase is reported
_DELTA_KEYS: Final = tuple(output_key(name) for name in DELTA_FILES)
_EVENTS_KEY: Final = output_key(EVENTS_FILE)


def parse_cgroup_files(files: CgroupFiles) -> dict[str, Any]:
    """The ``output`` object (without ``deltas``) for one fetch. Pure."""
    output: dict[str, Any] = {}
    contents = files.contents
    for name, key, parse in _FILE_PLAN:
        text = contents.get(name)
        if text is not None:
            output[key] = parse(text, name)
    events = contents.get(EVENTS_FILE)
    if events is not None:
        output[_EVENTS_KEY] = parse_flat_keyed(events, EVENTS_FILE)
    output["missing"] = list(files.missing)
    return output


def fetch_and_parse(
    directory: Path,
    label: str,
    root: Path | None,
    held: CgroupDirectory | None = None,
    events: bool = False,
) -> tuple[CgroupFiles, dict[str, Any]]:
    """Blocking; run in a worker thread (parsing there too keeps the trio thread free)."""
    files = read_cgroup_files(directory, label, root, held, events=events)
    return files, parse_cgroup_files(files)


@dataclass(eq=False)
class CgroupShared:
    """What every cell's cgroup probe of one daemon shares."""

    #: every cell's reads of a tick in a few worker-thread hops
    batcher: ThreadBatcher
    #: room for kept files under the open-file limit (None: no bound)
    budget: DescriptorBudget | None = None
    #: one batch read at a time, the tick's or one the kernel's signal asked for
    #: (never two reads of one probe at once; see ``CgroupProbe.read_batch``)
    reads: trio.Lock = field(default_factory=trio.Lock)


class CgroupProbe(HostProbe):
    """Reads one cell's cgroup and reports counter increases between readings."""

    def __init__(
        self,
        config: CgroupProbeConfig,
        shared: CgroupShared,
        watch: CellWatch | None = None,
    ) -> None:
        self._config = config
        self._shared = shared
        self._baseline: dict[str, dict[str, int]] | None = None
        self._directory_id: tuple[int, int] | None = None
        #: ``populated`` as the last reading that read cgroup.events saw (None: none did)
        self._populated: int | None = None
        self._directory = CgroupDirectory(shared.budget, watch)

    def probe_name(self) -> str:
        return "cgroup"

    def inputs(self, files: list[str] | None = None) -> dict[str, Any]:
        read = [name for name, _ in CGROUP_FILES] if files is None else files
        return {"cgroup_path": self._config.path, "files": read}

    def close(self) -> None:
        """Let the directory go (the cell was removed, or the daemon is stopping)."""
        self._directory.close()

    def batch_key(self) -> str:
        return "cgroupfs"  # every cell's cgroup in one batch: see read_batch

    @classmethod
    async def read_batch(
        cls,
        jobs: Sequence[tuple[ProbeContext, CgroupProbe]],
        results: list[ProbeReading | ProbeError | None],
        trigger: str = "tick",
    ) -> None:
        """Every cell's cgroup: fetched and parsed in a few worker-thread hops.

        ``trigger`` is why: ``"tick"``, or the kernel signalled a change of that
        file (one of ``kernfs_watch.WATCHED_FILES``: the daemon's ``read_now``).
        One batch runs at a time (``CgroupShared.reads``) and fills its results
        before it lets the next one read; the daemon makes their events before
        it awaits anything, so a cell's ``cellosseq`` follows its deltas' order.
        """
        if not jobs:
            return
        shared = jobs[0][1]._shared
        fetched: list[outcome.Outcome[ProbeReading] | None] = [None] * len(jobs)
        async with shared.reads:
            try:
                await shared.batcher.run_many(
                    CgroupProbe.read_blocking, [(probe, trigger) for _, probe in jobs], fetched
                )
            finally:  # on a timeout too: what was read by then is a reading, not an error
                for i, ((_, probe), result) in enumerate(zip(jobs, fetched, strict=True)):
                    if isinstance(result, outcome.Value):
                        results[i] = result.value
                    elif isinstance(result, outcome.Error):
                        error = result.error
                        if isinstance(error, ProbeError):
                            results[i] = error
                        else:  # a bug, not the cgroup's fault: say so loudly, report it typed
                            log.error(
                                "cgroup read raised", error=repr(error), cgroup=probe._config.path
                            )
                            results[i] = ProbeIoError(f"unexpected {type(error).__name__}")

    #: its preparing may overlap a tick: the directory's lock keeps them apart
    prepare_while_ticking = True

    @classmethod
    async def prepare_batch(cls, probes: Sequence[CgroupProbe]) -> None:
        """Open every cell's directory and files before its first tick (``Prober.prepare``)."""
        if not probes:
            return
        into: list[outcome.Outcome[None] | None] = [None] * len(probes)
        await probes[0]._shared.batcher.run_many(
            CgroupProbe.prepare_blocking, [(probe,) for probe in probes], into
        )

    def prepare_blocking(self) -> None:
        """A read whose result is dropped: it opens what later reads keep. No baseline
        moves (that is ``_finish``'s); a failure is left for the tick to report."""
        try:
            self._directory.read(self._config.resolved, self._config.path, self._config.root)
        except ProbeError:
            pass

    def read_blocking(self, trigger: str = "tick") -> ProbeReading:
        """Fetch, parse, take the increases and serialise (blocking: a worker thread).

        All of it where the files were read, while the output's objects are
        still in that thread's cache. The daemon never runs two reads of one
        probe at once, so the baseline is this thread's while it runs.
        """
        files, output = fetch_and_parse(
            self._config.resolved,
            self._config.path,
            self._config.root,
            self._directory,
            trigger != "tick",  # what the kernel signalled: cgroup.events too
        )
        return self._finish(files, output, trigger)

    def _finish(self, files: CgroupFiles, output: dict[str, Any], trigger: str) -> ProbeReading:
        counters = {key: output[key] for key in _DELTA_KEYS if key in output}
        recreated = self._directory_id is not None and self._directory_id != files.directory_id
        output["deltas"] = counter_deltas(self._baseline, counters, recreated=recreated)
        output["trigger"] = trigger
        if recreated:
            self._populated = None
        events = output.get(_EVENTS_KEY)
        if events is not None:
            populated = events.get("populated")
            if populated == 0 and self._populated != 0:
                output["final"] = True
            self._populated = populated
        self._baseline = counters
        self._directory_id = files.directory_id
        return ProbeReading(
            "host.cgroup", self.inputs(list(files.contents)), output, None, orjson.dumps(output)
        )
