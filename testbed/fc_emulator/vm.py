"""One emulated Firecracker VM: API socket, metrics destination, lifecycle, faults.

The API and the VMM share one trio task tree per emulated *process*, and a
flush writes synchronously before its reply is sent, as Firecracker's VMM
thread does (reference section 2): when the 204 arrives the line is in the
pipe. A restart ends the process (with the exit line if clean) and starts a
new one whose counters begin at zero; a crash ends it with one last line.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import orjson
import trio

from testbed.fc_emulator.http_server import (
    NO_CONTENT,
    Request,
    Response,
    fault,
    json_response,
    serve_unix,
)
from testbed.fc_emulator.line_writer import (
    Fate,
    MetricsLineWriter,
    WriteOutcome,
    json_string_tokens,
)
from testbed.fc_emulator.metrics import Leaf, VmMetrics, leaves_in_prefix
from testbed.fc_emulator.schema import (
    RELEASE_VERSION,
    has_id_and_properties,
    is_gauge,
    kind_of_key,
)

NOT_STARTED = "Not started"
RUNNING = "Running"
PAUSED = "Paused"

PRE_BOOT = "The requested operation is not supported before starting the microVM."
POST_BOOT = "The requested operation is not supported after starting the microVM."
REINIT = (
    "Metrics error: Cannot initialize the metrics system due to bad user input: "
    "Reinitialization of metrics not allowed."
)
DESERIALIZE = "An error occurred when deserializing the json body of a request: "
ACTIONS = ("FlushMetrics", "InstanceStart", "SendCtrlAltDel")

#: Firecracker's fatal signal handlers and the flag each stores before its last
#: line and ``_exit`` (src/vmm/src/signal_handler.rs); SIGPIPE is only counted
FATAL_SIGNALS: Final[dict[signal.Signals, tuple[str, str]]] = {
    signal.SIGBUS: ("signals", "sigbus"),
    signal.SIGSEGV: ("signals", "sigsegv"),
    signal.SIGXFSZ: ("signals", "sigxfsz"),
    signal.SIGXCPU: ("signals", "sigxcpu"),
    signal.SIGHUP: ("signals", "sighup"),
    signal.SIGILL: ("signals", "sigill"),
    signal.SIGSYS: ("seccomp", "num_faults"),
}


@dataclass
class VmSpec:
    """How to run one emulated VM.

    ``metrics_path`` None: metrics never configured (FlushMetrics is then a
    silent 204). ``metrics_via``: ``cli`` (``--metrics-path`` at start),
    ``config`` (a ``--config-file`` whose ``metrics`` block also carries
    ``emit_id`` and ``properties``; main only) or ``api`` (the
    orchestrator's ``PUT /metrics`` before boot; ``boot`` then waits for
    ``InstanceStart`` too).
    """

    vm_id: str
    api_socket: Path
    metrics_path: Path | None
    transport: Literal["fifo", "file"] = "fifo"
    metrics_via: Literal["cli", "config", "api"] = "cli"
    emit_id: bool = False
    properties: Mapping[str, str] | None = None
    boot: bool = True
    version: str = RELEASE_VERSION
    nets: tuple[str, ...] = ("eth0",)
    blocks: tuple[str, ...] = ("rootfs",)
    pmems: tuple[str, ...] = ()
    vhost_user_blocks: tuple[str, ...] = ()
    flush_interval: float = 60.0
    activity: bool = False
    seed: int = 0
    #: how many of its latest flushes the VM keeps in ``flushes`` (None: all, for
    #: tests); a long-running emulator process keeps a few, or a soak's thousand
    #: VMs pile up ~700,000 records the emulator's collector walks again and again
    flush_record: int | None = None


class EmulatedVm:
    def __init__(self, spec: VmSpec) -> None:
        self.spec = spec
        self.instance_id = spec.vm_id
        self.state = NOT_STARTED
        #: every process's metrics, oldest first; the last is the running one
        self.processes: list[VmMetrics] = []
        self.writer: MetricsLineWriter | None = None
        #: what ``emit_id`` and ``properties`` add after ``utc_timestamp_ms``, as tokens
        self._labels: tuple[bytes, ...] = ()
        #: the line whose newline waits in the writer's buffer: what it carries, its
        #: gauges and timestamp (see line_writer.Fate.PENDING)
        self._pending: tuple[dict[Leaf, int], dict[Leaf, int], int] | None = None
        self.flushes: list[tuple[str, WriteOutcome]] = []
        self._rng = random.Random(spec.seed)
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._listener: trio.socket.SocketType | None = None
        self._api_open = trio.Event()
        self._api_open.set()
        self._boot_at = 0.0
        self._last_flush_at = 0.0
        self._periodic_wakeup: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._timer_scope = trio.CancelScope()
        self.last_timestamp_ms = 0
        #: tests: the emitted totals as of each whole line, by its utc_timestamp_ms
        self.keep_history = False
        self.history: dict[int, dict[str, Any]] = {}
        if spec.metrics_path is not None and spec.transport == "fifo":
            make_fifo(spec.metrics_path)

    @property
    def metrics(self) -> VmMetrics:
        return self.processes[-1]

    @property
    def lost_lines(self) -> int:
        """Lines every process flushed that never reached a reader (nor ever will)."""
        return sum(process.lines_lost for process in self.processes)

    # -- process lifecycle ----------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Start a new process: API socket up, metrics from the CLI, boot if asked."""
        await nursery.start(self._run_process)

    async def _run_process(self, *, task_status: trio.TaskStatus[None]) -> None:
        spec = self.spec
        self.processes.append(
            VmMetrics(
                version=spec.version,
                nets=spec.nets,
                blocks=spec.blocks,
                pmems=spec.pmems,
                vhost_user_blocks=spec.vhost_user_blocks,
            )
        )
        self.state = NOT_STARTED
        self._stopped = trio.Event()
        spec.api_socket.parent.mkdir(parents=True, exist_ok=True)
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(str(spec.api_socket))
        listener.listen(64)
        self._listener = listener
        startup = self._rng.randint(1_000, 100_000)
        self.metrics.set_gauge("api_server", "process_startup_time_us", startup)
        self.metrics.set_gauge("api_server", "process_startup_time_cpu_us", startup // 3)
        if spec.metrics_via != "api" and spec.metrics_path is not None:
            labelled = spec.metrics_via == "config" and has_id_and_properties(spec.version)
            self._configure_metrics(
                str(spec.metrics_path),
                emit_id=labelled and spec.emit_id,
                properties=spec.properties if labelled else None,
            )
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(serve_unix, listener, self._handle)
                    self._nursery = nursery
                    if spec.boot and spec.metrics_via != "api":
                        self._boot(nursery)
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            listener.close()  # Firecracker leaves the socket file behind: a stale socket
            if self.writer is not None:
                # METRICS is a static, never dropped: what its buffer holds dies with it
                self.writer.close()
                self.writer = None
                self._settle_pending(delivered=False)
            self._labels = ()
            self.state = NOT_STARTED
            self._stopped.set()

    def _boot(self, nursery: trio.Nursery) -> None:
        self.state = RUNNING
        self._boot_at = trio.current_time()
        self._timer_scope = trio.CancelScope()
        self._last_flush_at = time.monotonic()
        self._timer_write("boot")  # "Write the metrics straight away"
        nursery.start_soon(self._periodic)

    def stop_timer(self) -> None:
        """No more periodic lines from this process (tests that need a quiet VMM)."""
        self._timer_scope.cancel()

    async def _periodic(self) -> None:
        with self._timer_scope:
            await self._periodic_loop()

    async def _periodic_loop(self) -> None:
        interval = self.spec.flush_interval
        due = self._boot_at + interval
        while True:
            self._periodic_wakeup = trio.Event()
            with trio.move_on_at(due):
                await self._periodic_wakeup.wait()
            self.periodic_flush()
            due = max(due + interval, trio.current_time())

    def periodic_flush(self) -> WriteOutcome | None:
        """What Firecracker's 60 s timer does: a failed write is a missed line, counted."""
        return self._timer_write("periodic")

    def _timer_write(self, why: str) -> WriteOutcome | None:
        # PeriodicMetrics::write_metrics (src/firecracker/src/metrics.rs), at start too
        outcome = self.write_metrics(why)
        if outcome is not None and not outcome.written:
            self.metrics.add("logger", "missed_metrics_count")
        return outcome

    @property
    def alive(self) -> bool:
        return self._scope is not None and not self._stopped.is_set()

    async def stop(self, *, clean: bool = True) -> None:
        """End the process; ``clean``: write the exit line first (``Drop for Vmm``,
        src/vmm/src/lib.rs; SIGTERM and SIGKILL have no handler: no line)."""
        if not self.alive:
            return
        if clean and self.state != NOT_STARTED:
            self.write_metrics("exit")
        await self._end_process()

    async def crash(self, cause: Literal["panic"] | signal.Signals) -> WriteOutcome | None:
        """The process dies of a panic or a fatal signal, writing one last line first.

        The panic hook (src/firecracker/src/main.rs) stores ``vmm.panic_count``
        = 1, a fatal signal's handler (src/vmm/src/signal_handler.rs) its
        flag; then ``METRICS.write()``, whose failure is only logged, and
        abort or ``_exit``: no exit line, the socket left behind. Metrics
        configured before boot are written then too. A signal without a
        handler (SIGTERM, SIGKILL) kills without a line: :meth:`stop`
        with ``clean=False``.
        """
        if cause == "panic":
            section, field = "vmm", "panic_count"
        elif cause in FATAL_SIGNALS:
            section, field = FATAL_SIGNALS[cause]
        else:
            raise ValueError(
                f"{cause.name} has no handler in Firecracker: it dies without a line "
                "(stop(clean=False))"
            )
        if not self.alive:
            return None
        self.metrics.set_gauge(section, field, 1)
        outcome = self.write_metrics(cause if cause == "panic" else cause.name.lower())
        await self._end_process()
        return outcome

    async def _end_process(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()

    async def restart(
        self,
        nursery: trio.Nursery,
        *,
        clean: bool = True,
        new_id: str | None = None,
        recreate_fifo: bool = False,
    ) -> None:
        """A new Firecracker process on the same paths; its counters start over."""
        await self.stop(clean=clean)
        if new_id is not None:
            self.instance_id = new_id
        path = self.spec.metrics_path
        if recreate_fifo and path is not None and self.spec.transport == "fifo":
            path.unlink(missing_ok=True)
            make_fifo(path)
        # the orchestrator removes the stale socket, or Firecracker refuses to start
        self.spec.api_socket.unlink(missing_ok=True)
        await self.start(nursery)

    # -- metrics ----------------------------------------------------------------------------

    def _configure_metrics(
        self, path: str, *, emit_id: bool, properties: Mapping[str, str] | None
    ) -> None:
        """``init_metrics`` (src/vmm/src/vmm_config/metrics.rs): the writer, then the labels.

        ``InstanceIdField`` and ``MetricsProperties`` (src/vmm/src/logger/metrics.rs)
        are flattened right after ``utc_timestamp_ms``: ``"id"`` (the ``--id``),
        then ``"properties"``, a BTreeMap (sorted by key).
        """
        self.writer = MetricsLineWriter(path)
        labels: list[bytes] = []
        if emit_id:
            labels += [b",", *json_string_tokens("id"), b":"]
            labels += json_string_tokens(self.instance_id)
        if properties is not None:
            labels += [b",", *json_string_tokens("properties"), b":", b"{"]
            for index, key in enumerate(sorted(properties)):
                if index:
                    labels.append(b",")
                labels += [*json_string_tokens(key), b":", *json_string_tokens(properties[key])]
            labels.append(b"}")
        self._labels = tuple(labels)

    def write_metrics(self, why: str) -> WriteOutcome | None:
        """``Metrics::write``: one line through the LineWriter; None if not configured."""
        writer = self.writer
        if writer is None:
            return None
        now = time.monotonic()
        metrics = self.metrics
        if self.spec.activity:
            metrics.synthetic_activity(self._rng, now - self._last_flush_at)
        self._last_flush_at = now
        stamp = self.last_timestamp_ms = time.time_ns() // 1_000_000
        line, deltas = metrics.build_line(stamp)
        text = orjson.dumps(line)
        # the timestamp and labels as serde_json's tokens; the sections after them
        digits = b"%d" % stamp
        head = (b"{", *_TIMESTAMP_KEY, b":", digits, *self._labels)
        body = text[len(_TIMESTAMP_PREFIX) + len(digits) :]
        outcome = writer.write_line(body, head)
        if outcome.earlier_delivered:
            self._settle_pending(delivered=True)
        written = None
        if outcome.error == "serde":  # serialisation stopped: only what came before counts
            taken = outcome.produced - sum(len(token) for token in head)
            written = leaves_in_prefix(body[: max(0, taken)].decode())
        carried = metrics.advance(deltas, written)
        if outcome.fate is Fate.PENDING:
            self._pending = (carried, dict(metrics.gauges), stamp)
        else:
            metrics.settle(carried, metrics.gauges, outcome.fate is Fate.DELIVERED)
            if self.keep_history and outcome.fate is Fate.DELIVERED:
                self.history[stamp] = self.emitted_totals()
        self.flushes.append((why, outcome))
        keep = self.spec.flush_record
        if keep is not None and len(self.flushes) > keep:
            del self.flushes[:-keep]
        return outcome

    def _settle_pending(self, *, delivered: bool) -> None:
        """The pending line reached the file at last, or died with its process."""
        if self._pending is None:
            return
        carried, gauges, stamp = self._pending
        self._pending = None
        self.metrics.settle(carried, gauges, delivered)
        if self.keep_history and delivered:
            self.history[stamp] = self.emitted_totals()

    def inject_full_pipe(self, *, after_writes: int = 0, failures: int = 1) -> None:
        """The next write(2) calls see a full pipe (EAGAIN), after ``after_writes`` succeed."""
        assert self.writer is not None, "metrics are not configured"
        self.writer.inject_eagain(after_writes=after_writes, failures=failures)

    def trigger_periodic(self) -> None:
        """Fire the periodic timer now (tests interleave it with the probe's flushes)."""
        if self._periodic_wakeup is not None:
            self._periodic_wakeup.set()

    # -- accounting across restarts ---------------------------------------------------------

    def emitted_totals(self) -> dict[str, Any]:
        """Counters summed over every process's fully written lines; gauges of the newest."""
        return _sum_processes([p.emitted_totals() for p in self.processes])

    def true_counts(self) -> dict[str, Any]:
        """Everything every process counted, whether a reader could see it or not."""
        return _sum_processes([p.true_counts() for p in self.processes])

    def lost_totals(self) -> dict[str, Any]:
        """Counter deltas serialised into lines that never reached a reader whole."""
        return _sum_processes([p.lost_totals() for p in self.processes])

    # -- the API ------------------------------------------------------------------------------

    def hang_api(self) -> None:
        """Requests are taken but not answered, as when the VMM thread is stuck."""
        self._api_open = trio.Event()

    def release_api(self) -> None:
        self._api_open.set()

    async def _handle(self, request: Request) -> Response:
        await self._api_open.wait()
        metrics = self.metrics
        route = (request.method, request.path.rstrip("/") or "/")
        if route == ("GET", "/"):  # src/vmm/src/vmm_config/instance_info.rs, in field order
            metrics.add("get_api_requests", "instance_info_count")
            return json_response(
                200,
                {
                    "id": self.instance_id,
                    "state": self.state,
                    "vmm_version": self.spec.version,
                    "app_name": "Firecracker",
                },
            )
        if route == ("GET", "/version"):
            metrics.add("get_api_requests", "vmm_version_count")
            return json_response(200, {"firecracker_version": self.spec.version})
        if request.method in ("PUT", "PATCH") and not request.body:  # parsed_request.rs
            return fault(f"Empty {request.method} request.")
        if route == ("PUT", "/actions"):
            return self._put_actions(request.body)
        if route == ("PUT", "/metrics"):
            return self._put_metrics(request.body)
        if route == ("PATCH", "/vm"):
            return self._patch_vm(request.body)
        return fault(f"Invalid request method and/or path: {request.method} {request.path}.")

    def _put_actions(self, body: bytes) -> Response:
        metrics = self.metrics
        # parse_put_actions (src/firecracker/src/api_server/request/actions.rs): counted
        # at parse time, deny_unknown_fields; the VMM answers in src/vmm/src/rpc_interface.rs
        metrics.add("put_api_requests", "actions_count")
        action = _parse_object(body, {"action_type"})
        if isinstance(action, str) or action.get("action_type") not in ACTIONS:
            metrics.add("put_api_requests", "actions_fails")
            detail = action if isinstance(action, str) else _unknown_variant(action)
            return fault(DESERIALIZE + detail)
        kind = action["action_type"]
        if kind == "InstanceStart":
            if self.state != NOT_STARTED:
                return fault(POST_BOOT)
            assert self._nursery is not None
            self._boot(self._nursery)
            return NO_CONTENT
        if self.state == NOT_STARTED:
            return fault(PRE_BOOT)
        if kind == "FlushMetrics":
            outcome = self.write_metrics("api")
            if outcome is not None and not outcome.written:  # no missed_metrics_count here
                return fault(f"Internal VMM error: Metrics error: {outcome.detail}")
        return NO_CONTENT

    def _put_metrics(self, body: bytes) -> Response:
        metrics = self.metrics
        # parse_put_metrics (src/firecracker/src/api_server/request/metrics.rs):
        # metrics_fails counts the body's parse errors only
        metrics.add("put_api_requests", "metrics_count")
        config = _parse_metrics_config(body, labels=has_id_and_properties(self.spec.version))
        if isinstance(config, str):
            metrics.add("put_api_requests", "metrics_fails")
            return fault(DESERIALIZE + config)
        if self.state != NOT_STARTED:
            return fault(POST_BOOT)
        if self.writer is not None:
            # init_metrics opens the path before METRICS.init refuses a second writer
            try:
                MetricsLineWriter(config.metrics_path).close()
            except (OSError, ValueError) as exc:
                return _cannot_open(exc)
            return fault(REINIT)
        try:
            self._configure_metrics(
                config.metrics_path, emit_id=config.emit_id, properties=config.properties
            )
        except (OSError, ValueError) as exc:
            return _cannot_open(exc)
        return NO_CONTENT

    def _patch_vm(self, body: bytes) -> Response:
        change = _parse_object(body, {"state"})
        if isinstance(change, str) or change.get("state") not in ("Paused", "Resumed"):
            return fault(DESERIALIZE + (change if isinstance(change, str) else "unknown variant"))
        if self.state == NOT_STARTED:
            return fault(PRE_BOOT)
        self.state = PAUSED if change["state"] == "Paused" else RUNNING
        return NO_CONTENT


_TIMESTAMP_KEY: Final = tuple(json_string_tokens("utc_timestamp_ms"))
_TIMESTAMP_PREFIX: Final = b'{"utc_timestamp_ms":'


def make_fifo(path: Path) -> None:
    """``mkfifo``, as the orchestrator must before Firecracker opens the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``MetricsConfig`` (src/vmm/src/vmm_config/metrics.rs)."""

    metrics_path: str
    emit_id: bool = False
    properties: dict[str, str] | None = None


def _parse_metrics_config(body: bytes, *, labels: bool) -> MetricsConfig | str:
    """The body as serde's derive reads ``MetricsConfig``; the error's text if it cannot.

    Unknown keys are ignored (no ``deny_unknown_fields``, v1.16.1 too);
    ``labels``: the version knows ``emit_id`` and ``properties``, or they
    are unknown keys as well.
    """
    try:
        value = json.loads(body)
    except ValueError as exc:
        return f"{exc}."
    if not isinstance(value, dict):
        return f"invalid type: {_unexpected(value)}, expected struct MetricsConfig."
    config: dict[str, Any] = {}
    for key, item in value.items():  # serde visits the keys in the body's order
        if key == "metrics_path":
            if not isinstance(item, str):
                return f"invalid type: {_unexpected(item)}, expected path string."
        elif key == "emit_id" and labels:
            if not isinstance(item, bool):
                return f"invalid type: {_unexpected(item)}, expected a boolean."
        elif key == "properties" and labels:
            if item is None:
                continue  # Option: null is None
            if not isinstance(item, dict):
                return f"invalid type: {_unexpected(item)}, expected a map."
            for entry in item.values():
                if not isinstance(entry, str):
                    return f"invalid type: {_unexpected(entry)}, expected a string."
        else:
            continue
        config[key] = item
    if "metrics_path" not in config:
        return "missing field `metrics_path`."
    properties = config.get("properties") or {}
    try:  # a lone surrogate parses in Python; serde_json refuses it
        for text in (config["metrics_path"], *properties, *properties.values()):
            text.encode()
    except UnicodeEncodeError:
        return "lone leading surrogate in hex escape."
    return MetricsConfig(**config)


def _unexpected(value: Any) -> str:
    """serde's ``Unexpected`` as serde_json names it in an ``invalid type`` error."""
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value, ensure_ascii=False)}"
    if value is None:
        return "null"
    return "sequence" if isinstance(value, list) else "map"


def _cannot_open(exc: OSError | ValueError) -> Response:
    """``open_file_nonblock`` failed (a NUL in the path: Rust's InvalidInput, a ValueError)."""
    detail = (
        f"{exc.strerror} (os error {exc.errno})"
        if isinstance(exc, OSError)
        else "file name contained an unexpected NUL byte"
    )
    return fault(
        f"Metrics error: Cannot initialize the metrics system due to bad user input: {detail}"
    )


def _parse_object(body: bytes, allowed: set[str]) -> dict[str, Any] | str:
    """The body as a JSON object with only ``allowed`` keys (``deny_unknown_fields``)."""
    try:
        value = json.loads(body)
    except ValueError as exc:
        return f"{exc}."
    if not isinstance(value, dict):
        return "invalid type: expected a map."
    unknown = sorted(set(value) - allowed)
    if unknown:
        return f"unknown field `{unknown[0]}`, expected one of {sorted(allowed)}."
    return value


def _unknown_variant(action: dict[str, Any]) -> str:
    expected = ", ".join(f"`{name}`" for name in ACTIONS)
    return f"unknown variant `{action.get('action_type')}`, expected one of {expected}."


def _sum_processes(totals: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters added across processes; gauges from the newest (its shape wins)."""
    newest = totals[-1]
    out: dict[str, Any] = {}
    for key, section in newest.items():
        out[key] = {}
        for name, value in section.items():
            if isinstance(value, dict):
                out[key][name] = {
                    sub: (
                        sum(t.get(key, {}).get(name, {}).get(sub, 0) for t in totals)
                        if sub == "sum_us"
                        else value[sub]
                    )
                    for sub in value
                }
            elif is_gauge(kind_of_key(key), name):
                out[key][name] = value
            else:
                out[key][name] = sum(t.get(key, {}).get(name, 0) for t in totals)
    return out
