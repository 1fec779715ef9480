"""The ``fc_metrics`` probe: the Firecracker VMM's own metrics, every line of them.

Firecracker's counters are per-flush deltas and every flush resets them,
its own 60 s timer's included, so the probe reads *every* line the VMM
writes and sums them (``fc_metrics_parse``). Two parts per cell:

- :class:`MetricsFollower` (the cell's ``background`` task) drains the
  metrics FIFO as lines arrive, read natively by trio (a FIFO holds about
  ten lines before Firecracker starts dropping them), or follows a regular
  file from its end, surviving truncation;
- each tick, :meth:`FcMetricsProbe.read` asks for a flush
  (``PUT /actions {"action_type": "FlushMetrics"}``) over the API socket,
  checks that the line it caused arrived (Firecracker answers 204 even when
  metrics were never configured), asks ``GET /`` for the instance and
  publishes the sums. Firecracker writes the line before it replies, so it
  is in the pipe when the 204 arrives.

HTTP goes through h11 over the Unix socket (``fc_api``), one kept-alive
connection per VM (Firecracker serves at most ten).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from cellos_probed.config import FcMetricsProbeConfig
from cellos_probed.confine import EscapeError, open_beneath
from cellos_probed.probes import (
    ProbeContext,
    ProbeError,
    ProbeIoError,
    ProbeReading,
)
from cellos_probed.probes.fc_api import FirecrackerApi
from cellos_probed.probes.fc_metrics_parse import MetricsAccumulator

log = structlog.get_logger("cellos_probed.fc_metrics")

#: One read of the metrics stream; a line is about 6 KB, a pipe 64 KiB.
READ_BYTES: Final = 64 * 1024
#: Bytes drained in one go before letting other tasks run (a flood must not starve them).
DRAIN_SLICE_BYTES: Final = 1024 * 1024
#: With no writer on the FIFO (the VMM is not running) poll() reports hang-up at once.
NO_WRITER_RETRY_SECONDS: Final = 0.25
#: How often a missing metrics path is looked for again, and a regular file polled.
REOPEN_SECONDS: Final = 0.5
FILE_POLL_SECONDS: Final = 0.5
#: ``GET /`` at least this often (in readings); see FcMetricsProbe._instance.
INSTANCE_REFRESH_READS: Final = 10


class MetricsFollower:
    """The metrics path of one VMM, drained into a :class:`MetricsAccumulator`."""

    def __init__(
        self, path: str, accumulator: MetricsAccumulator, root: Path | None = None
    ) -> None:
        self.path = path
        self.root = root
        self.accumulator = accumulator
        self.fd: int | None = None
        self.is_fifo = False
        self._identity: tuple[int, int] | None = None
        self._opened_once = False
        self.writer_present = False
        self._wakeup = trio.Event()
        #: set (and replaced) whenever bytes were read: lets a caller await new lines
        self.changed = trio.Event()

    # -- opening ---------------------------------------------------------------------------

    def ensure_open(self) -> None:
        """Open the path, or reopen it if it names another file now; ProbeIoError if absent."""
        try:
            current = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            raise ProbeIoError(f"metrics path does not exist: {self.path}") from None
        except OSError as exc:
            raise ProbeIoError(f"cannot stat metrics path: {exc.strerror}") from None
        identity = (current.st_dev, current.st_ino)
        if self.fd is not None and identity == self._identity:
            return
        if self.fd is not None:  # replaced (a new FIFO for a new VMM): finish the old one first
            self.drain()
            self.close()
        self._open(current.st_mode, identity)

    def _open(self, mode: int, identity: tuple[int, int]) -> None:
        if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
            raise ProbeIoError(f"metrics path is neither a FIFO nor a regular file: {self.path}")
        try:
            # a jailed VMM owns its chroot and could plant a symlink there: walk
            # down from the jail root refusing symlinks at every step
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
            if self.root is not None:
                fd = open_beneath(self.root, Path(self.path), flags)
            else:
                fd = os.open(self.path, flags)
        except EscapeError:
            raise ProbeIoError(
                f"metrics path goes through a symlink, not followed: {self.path}"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ProbeIoError(
                    f"metrics path is a symlink, not followed: {self.path}"
                ) from None
            raise ProbeIoError(f"cannot open metrics path: {exc.strerror}") from None
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != identity:  # swapped between stat and open
            os.close(fd)
            raise ProbeIoError(f"metrics path changed while being opened: {self.path}")
        self.is_fifo = stat.S_ISFIFO(opened.st_mode)
        if not self.is_fifo and not self._opened_once:
            os.lseek(fd, 0, os.SEEK_END)  # a regular file: lines from now on, not its history
        self.fd, self._identity, self._opened_once = fd, identity, True
        self._wakeup.set()

    def close(self) -> None:
        if self.fd is not None:
            trio.lowlevel.notify_closing(self.fd)  # wakes the task parked on it
            os.close(self.fd)
            self.fd = None

    # -- reading ---------------------------------------------------------------------------

    def drain(self, limit: int = DRAIN_SLICE_BYTES) -> int:
        """Read what is there now (up to ``limit`` bytes) without waiting; bytes read."""
        fd = self.fd
        if fd is None:
            return 0
        if not self.is_fifo:
            self._check_truncation(fd)
        total = 0
        while total < limit:
            try:
                data = os.read(fd, READ_BYTES)
            except BlockingIOError:
                self.writer_present = True
                break
            except OSError as exc:
                raise ProbeIoError(f"cannot read metrics path: {exc.strerror}") from None
            if not data:  # FIFO: no writer has it open; file: its end
                self.writer_present = False
                break
            self.writer_present = True
            total += len(data)
            self.accumulator.feed(data)
        if total:
            self.changed.set()
            self.changed = trio.Event()
        return total

    async def wait_for_records(self, count: int) -> None:
        """Until the accumulator has seen ``count`` records (tests, demo)."""
        while self.accumulator.records < count:
            await self.changed.wait()

    def _check_truncation(self, fd: int) -> None:
        position = os.lseek(fd, 0, os.SEEK_CUR)
        if os.fstat(fd).st_size < position:
            # Firecracker keeps writing at its old offset: NULs fill the gap, skipped by the parser
            os.lseek(fd, 0, os.SEEK_SET)
            self.accumulator.truncated()

    async def run(self) -> None:
        """Drain continuously: the background task of the cell."""
        while True:
            if self.fd is None:
                try:
                    self.ensure_open()
                except ProbeError:
                    self._wakeup = trio.Event()
                    with trio.move_on_after(REOPEN_SECONDS):
                        await self._wakeup.wait()
                    continue
            await self._follow_once()

    async def _follow_once(self) -> None:
        fd = self.fd
        assert fd is not None
        try:
            read = self.drain()
        except ProbeError as exc:
            log.warning("metrics path unreadable; reopening", path=self.path, error=exc.message)
            self.close()
            return
        if read >= DRAIN_SLICE_BYTES:
            await trio.lowlevel.checkpoint()
        elif self.is_fifo and self.writer_present:
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                pass  # closed for a reopen
        else:  # a regular file, or a FIFO with no writer (poll() would say hang-up at once)
            try:
                self.ensure_open()  # a restarted VMM may write to a new FIFO at the same path
            except ProbeError:
                self.close()
            if self.fd != fd:
                return
            self._wakeup = trio.Event()
            wait = FILE_POLL_SECONDS if not self.is_fifo else NO_WRITER_RETRY_SECONDS
            with trio.move_on_after(wait):
                await self._wakeup.wait()


class FcMetricsProbe:
    """One cell's VMM: flush, check the line arrived, publish the sums."""

    def __init__(self, config: FcMetricsProbeConfig) -> None:
        self._config = config
        self.accumulator = MetricsAccumulator()
        self.follower = MetricsFollower(
            str(config.metrics_path_resolved), self.accumulator, config.root
        )
        self.api = FirecrackerApi(str(config.api_socket_resolved), config.root)
        self._instance_cache: dict[str, Any] | None = None
        self._instance_connections = -1
        self._reads_since_instance = 0

    def probe_name(self) -> str:
        return "fc_metrics"

    def inputs(self) -> dict[str, Any]:
        return {"api_socket": self._config.api_socket, "metrics_path": self._config.metrics_path}

    async def background(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Drain the metrics path from before the first tick until the cell goes away."""
        try:
            try:
                self.follower.ensure_open()  # lines already waiting count too
                self.follower.drain()
            except ProbeError:
                pass  # not there yet: the follower keeps looking, the tick reports it
            task_status.started()
            await self.follower.run()
        finally:
            self.follower.close()
            await self.api.aclose()

    async def aclose(self) -> None:
        """For callers that read without running ``background``."""
        self.follower.close()
        await self.api.aclose()

    async def _instance(self) -> dict[str, Any]:
        """``GET /``: every INSTANCE_REFRESH_READS readings, and at once after a reconnect.

        The id and version only change with a new VMM process, which means a
        new API connection (or a failed read, which drops the cache); the
        state (Running/Paused) may lag by a few ticks. Asking every tick
        cost as much as the flush itself at a thousand VMs.
        """
        connections = self.api.connections
        if (
            self._instance_cache is None
            or connections != self._instance_connections
            or self._reads_since_instance >= INSTANCE_REFRESH_READS
        ):
            self._instance_cache = await self.api.instance()
            self._instance_connections = self.api.connections
            self._reads_since_instance = 0
        self._reads_since_instance += 1
        return self._instance_cache

    async def read(self, ctx: ProbeContext) -> ProbeReading:
        self.follower.ensure_open()
        self.follower.drain()  # what arrived since the background task last ran
        records_before = self.accumulator.records
        await self.api.flush_metrics()
        self.follower.drain()  # the flush's line was written before the 204
        if self.accumulator.records == records_before:
            raise ProbeIoError(
                "FlushMetrics answered 204 but no line arrived at metrics_path "
                "(metrics not configured, or configured elsewhere)"
            )
        instance = await self._instance()
        reading = self.accumulator.take_reading()
        output = {
            "instance": instance,
            "utc_timestamp_ms": reading.utc_timestamp_ms,
            "lines": reading.lines,
            "torn_lines": reading.torn_lines,
            "unparsed_lines": reading.unparsed_lines,
            "lost_lines": reading.lost_lines,
            "delta": reading.delta,
            "totals": reading.totals,
        }
        return ProbeReading("host.fc_metrics", self.inputs(), output)
