"""The daemon's own health in the Prometheus text format (``[metrics]``).

Two ways out, both off by default: ``textfile``, rewritten atomically every
few ticks for node_exporter's textfile collector (no socket at all), and
``listen``, ``/metrics`` served on a loopback address.

Nothing here runs per event. :class:`DaemonCollector` reads the figures the
daemon keeps anyway (the prober's counts and probe timings, the tick's, the
sink's statistics, the reload record) when a scrape or a write asks for
them, and on the trio thread: a scrape sees one moment between two steps of
the tick, with no lock. That is also why the listener is trio's own
(``trio.serve_listeners``) rather than prometheus_client's server thread,
which would read those dicts while the tick changes them. The tick duration
histogram is observed once per tick.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import structlog
import trio
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    choose_encoder,
    generate_latest,
)

from cellos_probed import __version__
from cellos_probed.config import ListenAddress, MetricsSettings
from cellos_probed.figures import DaemonFigures

if TYPE_CHECKING:
    from cellos_probed.sinks import EventSink

log = structlog.get_logger("cellos_probed.metrics")

#: how stale the textfile may get: node_exporter is scraped every 15 s to 1 min, so
#: a file at most 5 s old is fresh for any of them, at one write every 5 ticks of
#: 1 s rather than a file created and renamed every tick
TEXTFILE_EVERY_SECONDS: Final = 5.0
#: the reasons of ``gap`` events, exported at 0 before the first drop: an alert's
#: increase() sees the first drop only on a series that was there before it
DROP_REASONS: Final = ("buffer_full", "spool_full", "too_large", "permission_denied")
#: scrapes answered at once; a connection beyond them is closed unanswered
MAX_CONNECTIONS: Final = 8
#: a client has this long to send its request and take the answer
REQUEST_SECONDS: Final = 5.0
#: the request line and headers; a scraper's are a few hundred bytes
MAX_REQUEST_HEAD: Final = 16 * 1024
_PREFIX: Final = "cellos_probed_"
_Family = TypeVar("_Family", CounterMetricFamily, GaugeMetricFamily)


@dataclass(slots=True)
class ReloadRecord:
    """The config's history: what ``cellos_probed_config_*`` reports."""

    #: 1 for the config the daemon started with, +1 for each reload that took effect
    generation: int = 1
    last_successful: bool = True
    #: when the running config was loaded (Unix time)
    loaded_at: float = 0.0


class DaemonCollector:
    """The daemon's figures as metric families, read at each collection.

    ``labels``: constant labels on every sample (``shard`` for ``run --shard``:
    every shard's textfile lands in one node_exporter).
    """

    def __init__(
        self, prober: DaemonFigures, sink: EventSink, reloads: ReloadRecord, labels: dict[str, str]
    ) -> None:
        self.prober = prober
        self.sink = sink
        self.reloads = reloads
        self._names = list(labels)
        self._values = list(labels.values())

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
        return CounterMetricFamily(_PREFIX + name, doc, labels=[*self._names, *labels])

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(_PREFIX + name, doc, labels=[*self._names, *labels])

    def _one(self, family: _Family, value: float, *labels: str) -> _Family:
        """``family`` with one more sample: ``value``, labelled ``labels`` (after the
        constant ones)."""
        family.add_metric([*self._values, *labels], value)
        return family

    def collect(self) -> Iterator[Metric]:
        prober, reloads = self.prober, self.reloads
        ticks, stats = prober.tick_stats, prober.probe_stats
        yield self._one(
            self._gauge("build_info", "The running cellos-probed's version (always 1).",
                        ("version",)), 1, __version__)  # fmt: skip
        yield self._one(
            self._gauge("cells", "Cells configured (in this shard)."), len(prober.cells)
        )
        yield self._one(self._counter("ticks", "Ticks run."), ticks.ticks)
        yield self._one(
            self._counter("tick_overruns", "Ticks whose work ran past the next deadline."),
            ticks.overruns,
        )
        yield self._one(
            self._counter("ticks_skipped", "Deadlines skipped after overruns."),
            ticks.skipped_ticks,
        )
        yield self._one(
            self._counter("readings_produced", "Readings the probes produced."), stats.readings
        )
        errors = self._counter(
            "probe_errors", "probe_error events, by probe and kind.", ("probe", "kind")
        )
        for (probe, kind), count in sorted((stats.errors_by or {}).items()):
            self._one(errors, count, probe, kind)
        yield errors
        success = self._gauge(
            "probe_success",
            "1 if every cell's read of the probe succeeded in the last tick that read it.",
            ("probe",),
        )
        duration = self._gauge(
            "probe_duration_seconds",
            "How long the probe's reads took in the last tick that read it (its slowest "
            "group: the groups run side by side).",
            ("probe",),
        )
        for probe, timing in sorted(prober.probe_timings.items()):
            self._one(success, 1 if timing.success else 0, probe)
            self._one(duration, timing.seconds, probe)
        yield success
        yield duration
        yield self._one(
            self._gauge("config_generation", "1 at start, +1 at each reload that took effect."),
            reloads.generation,
        )
        yield self._one(
            self._gauge(
                "config_last_reload_successful",
                "0 if the last reload was refused (the previous config still runs).",
            ),
            1 if reloads.last_successful else 0,
        )
        yield self._one(
            self._gauge(
                "config_last_reload_success_timestamp_seconds",
                "When the running config was loaded.",
            ),
            reloads.loaded_at,
        )
        yield from self._delivery()

    def _delivery(self) -> Iterator[Metric]:
        delivery = self.sink.statistics()
        if delivery.connected is None:  # a sink with nothing to deliver (once, tests)
            return
        yield self._one(
            self._counter("events_published", "Events NATS took (all types)."),
            delivery.published,
        )
        yield self._one(
            self._counter(
                "events_acknowledged", "Events JetStream acknowledged (0 in core NATS mode)."
            ),
            delivery.acknowledged,
        )
        dropped = self._counter(
            "readings_dropped",
            "Events dropped, by the reason their gap event gives (each declared by one).",
            ("reason",),
        )
        by_reason = dict.fromkeys(DROP_REASONS, 0) | dict(delivery.dropped_by_reason)
        for reason, count in sorted(by_reason.items()):
            self._one(dropped, count, reason)
        yield dropped
        yield self._one(
            self._counter("gap_events", "gap events queued to declare dropped readings."),
            delivery.gaps_declared,
        )
        yield self._one(
            self._gauge("events_buffered", "Events held until NATS confirms them (spooled "
                        "ones included)."), delivery.buffered)  # fmt: skip
        yield self._one(
            self._gauge("events_spooled", "Events held in the spool on disk."), delivery.spooled
        )
        yield self._one(
            self._gauge("spool_bytes", "Bytes of the spool's segment files."), delivery.spool_bytes
        )
        yield self._one(
            self._gauge("nats_connected", "1 while connected to a NATS server."),
            1 if delivery.connected else 0,
        )
        yield self._one(
            self._counter("nats_reconnects", "Reconnections to NATS."), delivery.reconnects
        )
        yield self._one(
            self._counter(
                "nats_permission_violations",
                "Publishes and subscriptions NATS refused for the user's permissions.",
            ),
            delivery.permission_violations,
        )


class DaemonMetrics:
    """The registry: the collector and the tick duration histogram."""

    def __init__(
        self,
        prober: DaemonFigures,
        sink: EventSink,
        reloads: ReloadRecord,
        labels: dict[str, str] | None = None,
    ) -> None:
        labels = labels or {}
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(prober, sink, reloads, labels))
        histogram = Histogram(
            _PREFIX + "tick_duration_seconds",
            "How long each tick's work took.",
            labelnames=list(labels),
            registry=self.registry,
        )
        self._ticks = histogram.labels(*labels.values()) if labels else histogram

    def observe_tick(self, seconds: float) -> None:
        self._ticks.observe(seconds)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition a scraper with this ``Accept`` header asked for, and its type:
        the plain text format (0.0.4) if the header makes no sense to prometheus_client
        (``version=x`` raises a TypeError there)."""
        try:
            encoder, content_type = choose_encoder(accept)
        except (TypeError, ValueError):
            return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
        return encoder(self.registry), content_type

    def text(self) -> bytes:
        """The text format (0.0.4), which node_exporter's textfile collector reads."""
        return generate_latest(self.registry)


def textfile_every_ticks(tick_seconds: float) -> int:
    """The ticks between two textfile writes: TEXTFILE_EVERY_SECONDS' worth (5 at 1 s)."""
    return max(1, math.ceil(TEXTFILE_EVERY_SECONDS / tick_seconds))


def write_textfile(path: Path, body: bytes) -> None:
    """``body`` replaces ``path`` at once: written to a temporary name in the same
    directory (node_exporter reads only ``*.prom``), then renamed over it, so a
    scrape never sees half a file.

    prometheus_client's ``write_to_textfile`` does the same but leaves the mode
    to the umask, and the unit's (0077) would make the file unreadable to
    node_exporter's own user: the figures are not secret, the file is 0644.
    O_EXCL|O_NOFOLLOW: the directory may belong to node_exporter's user, who
    must not be able to point our write elsewhere with a planted link.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(temporary, flags, 0o644)
    except FileExistsError:  # left by a crash mid-write (our pid, reused)
        temporary.unlink()
        descriptor = os.open(temporary, flags, 0o644)
    try:
        with open(descriptor, "wb", closefd=True) as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(body)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _hint(error: OSError, hints: dict[int, str]) -> str:
    """``error`` as an operator reads it, with what to change when its errno is one
    the unit's sandbox gives (``hints``)."""
    text = error.strerror or type(error).__name__
    if error.errno in hints:
        text += f" ({hints[error.errno]}; see the README, Metrics)"
    return text


class MetricsExporter:
    """Where the figures go: the textfile and the listener, as ``[metrics]`` says.

    :meth:`run` holds the listener's nursery (in the daemon's, so it stops with
    the daemon); :meth:`apply` takes the settings at start and at each reload;
    :meth:`after_tick` writes the textfile every few ticks. A failure to write
    or to listen is logged once, shown in ``STATUS=`` (:attr:`problem`), and
    never stops the daemon: its readings matter more than its own figures.
    """

    def __init__(self, metrics: DaemonMetrics, tick_seconds: float) -> None:
        self.metrics = metrics
        self.settings = MetricsSettings()
        #: the address being served (None: none)
        self.listening: ListenAddress | None = None
        self._every = textfile_every_ticks(tick_seconds)
        self._nursery: trio.Nursery | None = None
        self._serving: trio.CancelScope | None = None
        self._served = trio.Event()
        self._served.set()
        self._connections = 0
        self._problems: dict[str, str] = {}

    @property
    def problem(self) -> str | None:
        return "; ".join(self._problems.values()) or None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The listener's home; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def apply(self, settings: MetricsSettings) -> None:
        """Take ``settings``: move the textfile (the old one goes: node_exporter would
        serve it, stale, for ever), start, stop or move the listener. A listener that
        failed to bind (``listening`` None) is tried again."""
        old, self.settings = self.settings, settings
        if old.textfile != settings.textfile:
            self._problems.pop("textfile", None)
            if old.textfile is not None:
                try:
                    old.textfile.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("metrics: cannot remove the old textfile", path=str(old.textfile),
                                error=exc.strerror)  # fmt: skip
            self.write()  # at once, not a few ticks later
        if settings.listen is None or settings.listen != self.listening:
            await self._stop_listening()
            self._problems.pop("listen", None)
            if settings.listen is not None:
                await self._listen(settings.listen)

    def after_tick(self, ticks: int) -> None:
        if ticks % self._every == 0:
            self.write()

    def write(self) -> None:
        """The textfile, now (if one is configured)."""
        path = self.settings.textfile
        if path is None:
            return
        try:
            write_textfile(path, self.metrics.text())
        except OSError as exc:
            sandbox = "under systemd, the unit's ReadWritePaths= must name its directory"
            problem = f"METRICS TEXTFILE NOT WRITTEN: {path}: " + _hint(
                exc, {errno.EROFS: sandbox, errno.EACCES: sandbox, errno.EPERM: sandbox}
            )
            if self._problems.get("textfile") != problem:
                log.error("metrics: cannot write the textfile", path=str(path),
                          error=problem.partition(": ")[2])  # fmt: skip
            self._problems["textfile"] = problem
            return
        if self._problems.pop("textfile", None) is not None:
            log.info("metrics: the textfile is written again", path=str(path))

    async def _listen(self, address: ListenAddress) -> None:
        assert self._nursery is not None, "run() first"
        try:
            listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            self._problems["listen"] = f"METRICS NOT SERVED on {address}: " + _hint(
                exc,
                {
                    errno.EPERM: "under systemd, the unit needs "
                    f"SocketBindAllow=tcp:{address.port}",
                    # the unit's capabilities leave out CAP_NET_BIND_SERVICE
                    errno.EACCES: "a port below 1024 needs CAP_NET_BIND_SERVICE: choose another",
                },
            )
            log.error("metrics: cannot listen", address=str(address),
                      error=self._problems["listen"].partition(": ")[2])  # fmt: skip
            return
        await self._nursery.start(self._serve, listeners)
        self.listening = address
        log.info("metrics: serving /metrics", address=str(address))

    async def _serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._served = trio.Event()
        try:
            with trio.CancelScope() as self._serving:
                task_status.started()
                await trio.serve_listeners(self._answer, listeners)
        finally:
            self._served.set()

    async def _stop_listening(self) -> None:
        """Close the listener and wait until it is closed (its port may be bound again)."""
        if self._serving is not None:
            self._serving.cancel()
            await self._served.wait()
            self._serving = None
            log.info("metrics: no longer serving /metrics", address=str(self.listening))
        self.listening = None

    async def _answer(self, stream: trio.SocketStream) -> None:
        """One request, one answer, then the connection closes (serve_listeners
        closes it)."""
        if self._connections >= MAX_CONNECTIONS:
            return
        self._connections += 1
        try:
            with trio.move_on_after(REQUEST_SECONDS):
                head = await _read_head(stream)
                if head is not None:
                    await stream.send_all(self._response(head))
        except trio.BrokenResourceError:
            pass  # the client went away
        except Exception:
            # raised here, it would end serve_listeners and the daemon with it: a
            # scrape must never stop the probing
            log.exception("metrics: answering a scrape failed")
        finally:
            self._connections -= 1

    def _response(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _http(400, "Bad Request", b"bad request\n")
        method, target = parts[0], parts[1].partition("?")[0]
        if target != "/metrics":
            return _http(404, "Not Found", b"not found: the metrics are at /metrics\n")
        if method not in ("GET", "HEAD"):
            return _http(405, "Method Not Allowed", b"GET or HEAD\n", allow="GET, HEAD")
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        body, content_type = self.metrics.render(accept)
        return _http(200, "OK", body, content_type=content_type, head_only=method == "HEAD")


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers (a scrape has no body); None if the client
    closed first or sent more than MAX_REQUEST_HEAD without ending them."""
    received = b""
    while b"\r\n\r\n" not in received:
        if len(received) > MAX_REQUEST_HEAD:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        received += chunk
    return received.partition(b"\r\n\r\n")[0]


def _http(
    status: int,
    reason: str,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    allow: str | None = None,
    head_only: bool = False,
) -> bytes:
    headers = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow is not None:
        headers.append(f"Allow: {allow}")
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + (b"" if head_only else body)
