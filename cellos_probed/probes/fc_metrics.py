"""The ``fc_metrics`` probe: the Firecracker VMM's own metrics, every line of them.

Firecracker's counters are per-flush deltas and every flush resets them,
its own 60 s timer's included, so the probe reads *every* line the VMM
writes and sums them (``fc_metrics_parse``). Each tick, for every cell at
once (:meth:`FcMetricsProbe.read_batch`), a worker thread:

- drains the metrics path (:class:`MetricsFollower`): a FIFO read without
  blocking, or a regular file followed from its end, surviving truncation
  and a new Firecracker process writing it again from its start;
- asks for a flush (``PUT /actions {"action_type": "FlushMetrics"}``) over
  the API socket, drains again and checks that the line it caused arrived
  (Firecracker writes the line before it replies, and answers 204 even when
  metrics were never configured; a line over the bound ahead of it is a
  parse error);
- now and then asks ``GET /`` for the instance, and takes the sums.

What a reading publishes of the sums (``delta`` and ``totals``) leaves out
every leaf whose value is 0, and with ``sections`` the sections not named;
``totals`` come every ``totals_every``-th reading, and at once after a new
API connection (see FcMetricsProbe._totals_due).

A reading's ``output`` also has ``metrics_id`` and ``metrics_properties``
when the VMM writes them (Firecracker main's ``PUT /metrics`` ``emit_id`` /
``properties``): the ``id`` and ``properties`` of the newest line of the
reading that had them, never summed. ``instance`` stays what ``GET /`` says.

The VMs' exchanges run together in one epoll loop (``fc_exchange``). A FIFO
holds about ten lines and Firecracker writes one a minute on its own, so
draining at every tick loses nothing; with long ticks the cell's
background task drains in between.
"""

from __future__ import annotations

import errno
import os
import stat
import time
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import orjson
import structlog
import trio

from cellos_probed.config import FcMetricsProbeConfig
from cellos_probed.confine import EscapeError, open_beneath
from cellos_probed.probes import (
    ProbeContext,
    ProbeError,
    ProbeIoError,
    ProbeParseError,
    ProbeReading,
)
from cellos_probed.probes.base import HostProbe
from cellos_probed.probes.fc_api import ApiConnection
from cellos_probed.probes.fc_exchange import Exchange, run_round
from cellos_probed.probes.fc_http import (
    FLUSH_REQUEST,
    INSTANCE_REQUEST,
    ApiResponse,
    describe,
    parse_instance,
)
from cellos_probed.probes.fc_metrics_parse import (
    MAX_LINE_BYTES,
    MetricsAccumulator,
    line_timestamp,
)

log = structlog.get_logger("cellos_probed.fc_metrics")

#: One read of the metrics stream; a line is about 6 KB, a pipe 64 KiB.
READ_BYTES: Final = 64 * 1024
#: Bytes drained in one go (a flooding writer must not hold a round for ever).
DRAIN_SLICE_BYTES: Final = 1024 * 1024
#: A regular file's first bytes, looked at on every drain: they hold the first
#: line's timestamp, so a new Firecracker process writing from offset 0 changes them.
HEAD_BYTES: Final = 64
#: ``GET /`` at least this often (in readings); see FcMetricsProbe._instance_due.
INSTANCE_REFRESH_READS: Final = 10
#: Rounds an open FIFO whose writer was there at the last read is kept without
#: looking at its path again, while the VMM's API connection stays the same
#: (a stat of a path deep in a jail, per VM per tick, was ~3 ms a tick at a
#: thousand VMs). A new VMM means a new connection, and a flush whose line did
#: not arrive looks at the path at once: see FcMetricsProbe.answered.
TRUSTED_ROUNDS: Final = 10
#: Between ticks further apart than this, the background task drains the metrics path.
BACKGROUND_DRAIN_SECONDS: Final = 10.0
#: A backstop only: the daemon's probe timeout ends a round first.
API_TIMEOUT_SECONDS: Final = 5.0
#: VMs per round (one worker thread and one epoll each). Every request of a
#: round goes out at once; rounds beyond the limiter's threads wait for one,
#: so a host's VMs should fit in as many rounds as there are threads. One
#: round for a thousand VMs rather than four of 256: every VMM is asked at
#: the start of the tick, and one thread does not fight others for the
#: interpreter lock (measured at N=1000: no timeouts left, tick p99 -20 %).
ROUND_SIZE: Final = 2048
#: A round hands back this long before the daemon's timeout would fire.
ROUND_MARGIN_SECONDS: Final = 0.01
#: How long the VMMs have to answer ``GET /`` before the first tick (``prepare_batch``).
PREPARE_ROUND_SECONDS: Final = 2.0


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
        #: a regular file's first line's timestamp as last seen (see HEAD_BYTES), and
        #: whether it was looked at since the file was opened or truncated
        self._first_line: int | None = None
        self._first_seen = False
        #: a new writer rewrites the regular file from its start: the timestamp of its
        #: first line (its lines are those not older), and where the old content ended
        self._new_writer_since: int | None = None
        self._old_end = 0
        self.writer_present = False
        #: calls answered from the open FIFO without a stat since the last stat
        self.trusted = 0

    # -- opening ---------------------------------------------------------------------------

    def ensure_open(self, *, may_trust: bool = False) -> None:
        """Open the path, or reopen it if it names another file now; ProbeIoError if absent.

        ``may_trust``: nothing says the VMM changed (its API connection is the
        same), so an open FIFO that had a writer at the last read is kept as it
        is, at most TRUSTED_ROUNDS times in a row.
        """
        if (
            may_trust
            and self.fd is not None
            and self.is_fifo
            and self.writer_present
            and self.trusted < TRUSTED_ROUNDS
        ):
            self.trusted += 1
            return
        self.trusted = 0
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
        self._first_seen, self._new_writer_since = False, None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- reading ---------------------------------------------------------------------------

    def drain(self, limit: int = DRAIN_SLICE_BYTES) -> int:
        """Read what is there now (up to ``limit`` bytes) without waiting; bytes read."""
        fd = self.fd
        if fd is None:
            return 0
        total = 0
        if not self.is_fifo:
            self._check_rewritten(fd)
            if self._new_writer_since is not None:
                total = self._drain_rewritten(fd, limit)
                if self._new_writer_since is not None:
                    return total
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
            if self.is_fifo and len(data) < READ_BYTES:
                # a pipe's read takes all it holds: it is empty now, and asking
                # again only to be told so (EAGAIN) is an exception per VM per tick
                break
        return total

    # -- a regular file: truncated, or written again from its start by a new process ------

    def _check_rewritten(self, fd: int) -> None:
        """Truncation, and a new Firecracker process on the same file (see _drain_rewritten)."""
        position = os.lseek(fd, 0, os.SEEK_CUR)
        if os.fstat(fd).st_size < position:
            # Firecracker keeps writing at its old offset: NULs fill the gap, skipped by the parser
            os.lseek(fd, 0, os.SEEK_SET)
            self.accumulator.truncated()
            self._first_seen, self._new_writer_since = False, None
            return
        since = line_timestamp(os.pread(fd, HEAD_BYTES, 0))
        seen, self._first_line = self._first_line, since
        if not self._first_seen or since is None or since == seen:
            # a first look, the same first line, or none there (a truncation's hole)
            self._first_seen = True
            return
        # Firecracker opens the file without O_TRUNC or O_APPEND: a new process writes
        # from offset 0 over the old lines. First the old writer's lines not read yet
        # (its exit line, say): the whole ones older than the new writer's first.
        offset = position - self.accumulator.pending_bytes
        self.accumulator.forget_partial()
        self._take_whole_lines(fd, offset, lambda timestamp: timestamp < since)
        self._new_writer_since, self._old_end = since, os.fstat(fd).st_size
        os.lseek(fd, 0, os.SEEK_SET)

    def _drain_rewritten(self, fd: int, limit: int) -> int:
        """A new writer's lines, read from the file's start; bytes taken.

        Beyond the new writer's position the old lines are still there, and
        its next line will overwrite them: only whole lines not older than its
        first are taken, and the read stops (to come back) at anything else,
        until it is past where the old content ended.
        """
        since = self._new_writer_since
        assert since is not None
        start = os.lseek(fd, 0, os.SEEK_CUR)
        offset = self._take_whole_lines(fd, start, lambda timestamp: timestamp >= since, limit)
        os.lseek(fd, offset, os.SEEK_SET)
        if offset >= self._old_end:
            self._new_writer_since = None  # past the old lines: read on as usual
        return offset - start

    def _take_whole_lines(
        self, fd: int, offset: int, accept: Callable[[int], bool], limit: int = DRAIN_SLICE_BYTES
    ) -> int:
        """Whole lines from ``offset`` into the sums while ``accept`` takes their
        timestamps; the offset after the last one taken.

        A refused line followed by one that is taken is skipped: a line read
        while it was being written over an old one can splice with the old
        one's end into a valid object, and the offset after it then falls
        inside the writer's next line, whose rest is refused.
        """
        start = offset
        while offset - start < limit:
            data = os.pread(fd, READ_BYTES, offset)
            if b"\n" not in data and len(data) == READ_BYTES:  # a line longer than a read
                data = os.pread(fd, MAX_LINE_BYTES + 1, offset)
            at = 0
            while (end := data.find(b"\n", at)) >= 0:
                if not self.accumulator.take_line(data[at:end], accept):
                    after = data.find(b"\n", end + 1)
                    if after < 0 or not self.accumulator.take_line(data[end + 1 : after], accept):
                        return offset + at
                    end = after
                at = end + 1
            if at == 0:
                break  # no whole line here yet
            offset += at
        return offset


class FcMetricsProbe(HostProbe):
    """One cell's VMM: flush, check the line arrived, publish the sums.

    Its ``begin``/``answered``/``failed`` are the VM's part of a round of
    exchanges (``fc_exchange``) and run on the round's worker thread; the
    daemon never runs two rounds of one probe at once, and the background
    drain stays out while a round runs (``_in_round``).
    """

    def __init__(
        self, config: FcMetricsProbeConfig, rounds: trio.CapacityLimiter | None = None
    ) -> None:
        self._config = config
        self._rounds = rounds
        self.accumulator = MetricsAccumulator()
        self.follower = MetricsFollower(
            str(config.metrics_path_resolved), self.accumulator, config.root
        )
        self.connection = ApiConnection(str(config.api_socket_resolved), config.root)
        self._instance_cache: dict[str, Any] | None = None
        self._instance_connections = -1
        self._reads_since_instance = 0
        #: where in the refresh cycle this VM starts: VMs started together would
        #: otherwise all ask ``GET /`` on the same tick, every tenth one twice as long
        self._refresh_phase = zlib.crc32(str(config.api_socket).encode()) % INSTANCE_REFRESH_READS
        self._records_before = 0
        #: the accumulator's record count when the last reading was taken
        self._records_published = 0
        #: lines cut for their length before the round's drains (see answered)
        self._cut_before = 0
        #: the API connection count at the previous round's start
        self._connections_at_begin = -1
        self._asked_instance = False
        #: readings to go before the next one with totals (0: the next has them)
        self._totals_in = 0
        #: the API connection count at the last reading with totals
        self._totals_connections = -1
        #: the sections kept, each name as JSON writes it (None: all)
        self._sections = (
            None
            if config.sections is None
            else tuple(orjson.dumps(name)[1:-1] for name in config.sections)
        )
        self._in_round = False
        self._closed = False
        self._last_drain = 0.0
        self.result: ProbeReading | ProbeError | None = None

    def probe_name(self) -> str:
        return "fc_metrics"

    def inputs(self) -> dict[str, Any]:
        return {"api_socket": self._config.api_socket, "metrics_path": self._config.metrics_path}

    def batch_key(self) -> str:
        return "fc"  # every VM in one round: see read_batch

    # -- between ticks ---------------------------------------------------------------------

    async def background(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the metrics path before the first tick; drain it when ticks are far apart."""
        try:
            self._drain_quietly()  # lines already waiting count too
            task_status.started()
            while True:
                await trio.sleep(BACKGROUND_DRAIN_SECONDS)
                if time.monotonic() - self._last_drain >= BACKGROUND_DRAIN_SECONDS:
                    self._drain_quietly()
        finally:
            self._closed = True
            if not self._in_round:  # else the round closes them when it ends
                self.aclose_sync()

    def _drain_quietly(self) -> None:
        if self._in_round:
            return
        try:
            self.follower.ensure_open()
            self.follower.drain()
        except ProbeError:
            pass  # not there yet (or gone): the tick reports it
        self._last_drain = time.monotonic()

    def aclose_sync(self) -> None:
        self.follower.close()
        self.connection.close()

    def close(self) -> None:
        """The cell went, or the daemon stops (a round still running closes them as it ends)."""
        self._closed = True
        if not self._in_round:
            self.aclose_sync()

    # -- a round (on the round's worker thread) ----------------------------------------------

    def begin(self) -> bytes | None:
        self.result = None
        self._cut_before = self.accumulator.oversize
        connections = self.connection.connections
        self.follower.ensure_open(may_trust=connections == self._connections_at_begin)
        self._connections_at_begin = connections
        self.follower.drain()  # what arrived since the last round
        self._records_before = self.accumulator.records
        self._asked_instance = False
        return FLUSH_REQUEST

    def answered(self, response: ApiResponse, *, last_call: bool = False) -> bytes | None:
        if not self._asked_instance:
            if response.status_code != 204:
                self._raise_if_cut()  # a pipe full of a runaway line refuses the flush
                raise ProbeIoError(f"FlushMetrics refused: {describe(response)}")
            self.follower.drain()  # the flush's line was written before the 204
            if self.accumulator.records == self._records_before and self.follower.trusted:
                # the FIFO was kept without a look at its path: a new VMM may have
                # made a new one there (its line is in that one); look now
                self.follower.ensure_open()
                self.follower.drain()
            if self.accumulator.records == self._records_before:
                self._raise_if_cut()  # the flush's line is behind a runaway one
                raise ProbeIoError(
                    "FlushMetrics answered 204 but no line arrived at metrics_path "
                    "(metrics not configured, or configured elsewhere)"
                )
            if self._instance_due():
                if last_call:
                    if self._instance_cache is None:
                        return None  # no instance to name yet: a timeout; the line waits
                    # the instance as last seen (asked again next time)
                    self._instance_connections = -1
                else:
                    self._asked_instance = True
                    return INSTANCE_REQUEST
        else:
            self.learn_instance(response)
        self._reads_since_instance += 1
        self.result = self._reading()
        return None

    def failed(self, error: ProbeError) -> None:
        """The exchange failed. Lines drained since the last reading are published
        first (a crashing VMM's last line is written just before its API goes);
        the failure is then the next round's, when no line is left to publish."""
        if self.accumulator.records != self._records_published and self._instance_cache is not None:
            self.result = self._reading()
        else:
            self.result = error

    def _raise_if_cut(self) -> None:
        """A parse error if this round's drains are in (or cut) a line over the bound:
        what no whole line followed is that line's doing, drained on by later rounds."""
        if self.accumulator.cutting or self.accumulator.oversize != self._cut_before:
            raise ProbeParseError(
                f"a metrics line longer than {MAX_LINE_BYTES} bytes was cut; "
                "no whole line has followed it yet"
            )

    def learn_instance(self, response: ApiResponse) -> None:
        """``GET /``'s answer: the instance named in readings from now on."""
        first = self._instance_cache is None
        self._instance_cache = parse_instance(response)
        self._instance_connections = self.connection.connections
        # the first answer starts this VM's refresh cycle at its own phase
        self._reads_since_instance = self._refresh_phase if first else 0

    def _instance_due(self) -> bool:
        """``GET /`` every INSTANCE_REFRESH_READS readings, and at once after a reconnect.

        The id and version only change with a new VMM process, which means a
        new API connection (a failed exchange closes the connection, so it
        reconnects); the state (Running/Paused) may lag by a few ticks.
        Asking every tick cost as much as the flush itself at a thousand VMs.
        """
        return (
            self._instance_cache is None
            or self.connection.connections != self._instance_connections
            or self._reads_since_instance >= INSTANCE_REFRESH_READS
        )

    def _totals_due(self) -> bool:
        """Totals in every ``totals_every``-th reading, and in the first on a new API
        connection: a VMM restarted (a new process has a new socket), or a connection
        given up and made again. A consumer adds up the deltas between them; the
        totals set it right again whatever it missed."""
        connections = self.connection.connections
        if self._totals_in > 0 and connections == self._totals_connections:
            self._totals_in -= 1
            return False
        self._totals_in = self._config.totals_every - 1
        self._totals_connections = connections
        return True

    def _reading(self) -> ProbeReading:
        assert self._instance_cache is not None
        self._records_published = self.accumulator.records
        with_totals = self._totals_due()
        # serialised here, on the round's thread
        reading = self.accumulator.take_reading_json(
            with_totals=with_totals, sections=self._sections
        )
        output: dict[str, Any] = {
            "instance": self._instance_cache,
            "utc_timestamp_ms": reading.utc_timestamp_ms,
            "lines": reading.lines,
            "torn_lines": reading.torn_lines,
            "unparsed_lines": reading.unparsed_lines,
            "lost_lines": reading.lost_lines,
        }
        labels = reading.labels
        if labels is not None:  # Firecracker main's emit_id / properties (newest wins)
            if "id" in labels:
                output["metrics_id"] = labels["id"]
            if "properties" in labels:
                output["metrics_properties"] = labels["properties"]
        # The output's JSON as pieces: the small head, then the delta and totals
        # fragments as they are. Serialised whole, it beside its fragments held every
        # VM's ~14 KB twice until the tick's events were made (peak RSS +30 MB,
        # measured); the event's JSON is joined from the pieces in one copy.
        head = orjson.dumps(output)[:-1]
        delta, totals = reading.delta, reading.totals
        output["delta"] = orjson.Fragment(delta)
        pieces: tuple[bytes, ...]
        if totals is None:
            pieces = (head, b',"delta":', delta, b"}")
        else:
            output["totals"] = orjson.Fragment(totals)
            pieces = (head, b',"delta":', delta, b',"totals":', totals, b"}")
        return ProbeReading("host.fc_metrics", self.inputs(), output, None, pieces)

    # -- the tick ------------------------------------------------------------------------------

    @classmethod
    async def read_batch(
        cls,
        jobs: Sequence[tuple[ProbeContext, FcMetricsProbe]],
        results: list[ProbeReading | ProbeError | None],
    ) -> None:
        """Every cell's VMM in rounds of ROUND_SIZE, a few rounds at once on worker threads.

        Each round waits for answers until the enclosing deadline (less a
        margin), then takes what is already there for at most
        ``fc_exchange.LAST_CALL_SECONDS``; a VM whose answer was not taken
        has no result, which the daemon reports as a timeout.
        """
        probes = [probe for _, probe in jobs if not probe._closed]
        if not probes:
            return
        remaining = min(
            trio.current_effective_deadline() - trio.current_time(), API_TIMEOUT_SECONDS
        )
        # the VMMs have until the timeout; the round may then take LAST_CALL_SECONDS more
        # for answers already there (fc_exchange)
        deadline = time.monotonic() + max(0.0, remaining - ROUND_MARGIN_SECONDS)
        try:
            await cls._run_rounds(probes, deadline, lambda probe: probe)
        finally:
            for i, (_, probe) in enumerate(jobs):
                results[i] = probe.result
                probe.result = None

    @staticmethod
    async def _run_rounds(
        probes: list[FcMetricsProbe],
        deadline: float,
        exchange_of: Callable[[FcMetricsProbe], Exchange],
    ) -> None:
        """``probes``' exchanges in rounds of ROUND_SIZE, a few at once on worker threads."""
        if not probes:
            return
        limiter = probes[0]._rounds
        for probe in probes:
            probe._in_round = True
        try:
            async with trio.open_nursery() as nursery:
                for start in range(0, len(probes), ROUND_SIZE):
                    nursery.start_soon(
                        partial(
                            trio.to_thread.run_sync,
                            run_round,
                            [exchange_of(probe) for probe in probes[start : start + ROUND_SIZE]],
                            deadline,
                            limiter=limiter,
                        )
                    )
        finally:
            now = time.monotonic()
            for probe in probes:
                probe._in_round = False
                probe._last_drain = now
                if probe._closed:  # its cell went away during the round
                    probe.aclose_sync()

    @classmethod
    async def prepare_batch(cls, probes: Sequence[FcMetricsProbe]) -> None:
        """Every VMM's API connection opened and its instance asked (``GET /``) before
        the first tick (``Prober.prepare``), so that tick only flushes.

        A first tick asking both of 2,000 VMMs timed every one of them out, and
        the answers owed after it timed out most of the next four ticks
        (measured). A VMM that does not answer here is asked again, and
        reported, by its tick.
        """
        await cls._run_rounds(
            [probe for probe in probes if not probe._closed],
            time.monotonic() + PREPARE_ROUND_SECONDS,
            _AskInstance,
        )


class _AskInstance:
    """A VMM's part of the round before the first tick: ``GET /`` only (no reading)."""

    def __init__(self, probe: FcMetricsProbe) -> None:
        self.probe = probe
        self.connection = probe.connection

    def begin(self) -> bytes | None:
        return INSTANCE_REQUEST

    def answered(self, response: ApiResponse, *, last_call: bool) -> bytes | None:
        self.probe.learn_instance(response)
        return None

    def failed(self, error: ProbeError) -> None:
        pass  # its tick asks again, and reports what fails then
