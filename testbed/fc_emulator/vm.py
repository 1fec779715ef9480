"""One emulated Firecracker VM: API socket, metrics destination, lifecycle, faults.

The API and the VMM share one trio task tree per emulated *process*, and a
flush writes synchronously before its reply is sent, as Firecracker's VMM
thread does (reference section 2): when the 204 arrives the line is in the
pipe. A restart ends the process (with the exit line if clean) and starts a
new one whose counters begin at zero.
"""

from __future__ import annotations

import json
import os
import random
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
from testbed.fc_emulator.line_writer import MetricsLineWriter, WriteOutcome
from testbed.fc_emulator.metrics import VmMetrics, leaves_in_prefix
from testbed.fc_emulator.schema import RELEASE_VERSION, is_gauge, kind_of_key

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


@dataclass
class VmSpec:
    """How to run one emulated VM.

    ``metrics_path`` None: metrics never configured (FlushMetrics is then a
    silent 204). ``metrics_via``: ``cli`` (``--metrics-path`` at start) or
    ``api`` (the orchestrator's ``PUT /metrics`` before boot; ``boot`` then
    waits for ``InstanceStart`` too).
    """

    vm_id: str
    api_socket: Path
    metrics_path: Path | None
    transport: Literal["fifo", "file"] = "fifo"
    metrics_via: Literal["cli", "api"] = "cli"
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
        if spec.metrics_via == "cli" and spec.metrics_path is not None:
            self.writer = MetricsLineWriter(str(spec.metrics_path))
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(serve_unix, listener, self._handle)
                    self._nursery = nursery
                    if spec.boot and spec.metrics_via == "cli":
                        self._boot(nursery)
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            listener.close()  # Firecracker leaves the socket file behind: a stale socket
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            self.state = NOT_STARTED
            self._stopped.set()

    def _boot(self, nursery: trio.Nursery) -> None:
        self.state = RUNNING
        self._boot_at = trio.current_time()
        self._timer_scope = trio.CancelScope()
        self._last_flush_at = time.monotonic()
        self.write_metrics("boot")  # "Write the metrics straight away"
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
        outcome = self.write_metrics("periodic")
        if outcome is not None and not outcome.written:
            self.metrics.add("logger", "missed_metrics_count")
        return outcome

    async def stop(self, *, clean: bool = True) -> None:
        """End the process; ``clean``: write the exit line first (``Drop for Vmm``)."""
        if self._scope is None or self._stopped.is_set():
            return
        if clean and self.state != NOT_STARTED:
            self.write_metrics("exit")
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

    def write_metrics(self, why: str) -> WriteOutcome | None:
        """``Metrics::write``: one line through the LineWriter; None if not configured."""
        if self.writer is None:
            return None
        now = time.monotonic()
        if self.spec.activity:
            self.metrics.synthetic_activity(self._rng, now - self._last_flush_at)
        self._last_flush_at = now
        self.last_timestamp_ms = time.time_ns() // 1_000_000
        line, deltas = self.metrics.build_line(self.last_timestamp_ms)
        text = orjson.dumps(line)
        outcome = self.writer.write_line(text)
        if outcome.written:
            self.metrics.commit(deltas, None, whole=True)
        elif outcome.error == "write":  # serialised whole: every baseline moved
            self.metrics.commit(deltas, None, whole=False)
        else:
            written = leaves_in_prefix(text[: outcome.produced].decode())
            self.metrics.commit(deltas, written, whole=False)
        self.flushes.append((why, outcome))
        keep = self.spec.flush_record
        if keep is not None and len(self.flushes) > keep:
            del self.flushes[:-keep]
        if self.keep_history and outcome.written:
            self.history[self.last_timestamp_ms] = self.emitted_totals()
        return outcome

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
        if route == ("GET", "/"):
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
        if request.method in ("PUT", "PATCH") and not request.body:
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
        metrics.add("put_api_requests", "actions_count")  # counted at parse time
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
        metrics.add("put_api_requests", "metrics_count")
        config = _parse_object(body, {"metrics_path"})
        if isinstance(config, str) or not isinstance(config.get("metrics_path"), str):
            metrics.add("put_api_requests", "metrics_fails")
            return fault(DESERIALIZE + (config if isinstance(config, str) else "missing field"))
        if self.state != NOT_STARTED:
            metrics.add("put_api_requests", "metrics_fails")
            return fault(POST_BOOT)
        if self.writer is not None:
            metrics.add("put_api_requests", "metrics_fails")
            return fault(REINIT)
        try:
            self.writer = MetricsLineWriter(config["metrics_path"])
        except OSError as exc:
            metrics.add("put_api_requests", "metrics_fails")
            return fault(
                "Metrics error: Cannot initialize the metrics system due to bad user input: "
                f"{exc.strerror} (os error {exc.errno})"
            )
        return NO_CONTENT

    def _patch_vm(self, body: bytes) -> Response:
        change = _parse_object(body, {"state"})
        if isinstance(change, str) or change.get("state") not in ("Paused", "Resumed"):
            return fault(DESERIALIZE + (change if isinstance(change, str) else "unknown variant"))
        if self.state == NOT_STARTED:
            return fault(PRE_BOOT)
        self.state = PAUSED if change["state"] == "Paused" else RUNNING
        return NO_CONTENT


def make_fifo(path: Path) -> None:
    """``mkfifo``, as the orchestrator must before Firecracker opens the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise


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
