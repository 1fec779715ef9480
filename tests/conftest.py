"""Shared fixtures: a real nats-server, privilege checks, a clean cgroup."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

NATS_SERVER = Path(sys.prefix) / "bin" / "nats-server"
IS_ROOT = os.geteuid() == 0

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (netns, TAP, nftables, cgroups)")
needs_nats = pytest.mark.skipif(
    not NATS_SERVER.exists(), reason=f"nats-server not found at {NATS_SERVER} (make setup)"
)


@dataclass
class NatsServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    store: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_nats_server(
    workdir: Path, *, port: int = -1, extra: list[str] | None = None, jetstream: bool = False
) -> NatsServer:
    """Start nats-server on loopback; return once it accepts clients."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"nats-{time.monotonic_ns()}.log"
    args = [str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(port), "-l", str(log)]
    if jetstream:
        args += ["-js", "-sd", str(workdir / "jetstream")]
    args += extra or []
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    pattern = re.compile(r"Listening for client connections on 127\.0\.0\.1:(\d+)")
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        found = pattern.search(text)
        if found and "Server is ready" in text:
            bound = int(found.group(1))
            return NatsServer(f"nats://127.0.0.1:{bound}", bound, process, workdir)
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited: {text[-2000:]}")
        time.sleep(0.02)  # polling a log file for a condition; nothing to await
    process.kill()
    raise RuntimeError("nats-server did not become ready in 10 s")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    if not NATS_SERVER.exists():
        pytest.skip(f"nats-server not found at {NATS_SERVER} (make setup)")
    server = start_nats_server(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def real_cgroup() -> Iterator[Path]:
    """A fresh cgroup under this host's cgroup2 mount, removed afterwards."""
    from cellos_probed.cgroupfs import find_cgroup2_mount

    if not IS_ROOT:
        pytest.skip("creating a cgroup needs root")
    mount = find_cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount on this host")
    path = mount / f"cellos-test-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    try:
        yield path
    finally:
        procs = path / "cgroup.procs"
        parent = path.parent / "cgroup.procs"
        for _ in range(50):
            pids = procs.read_text().split() if procs.exists() else []
            for pid in pids:
                try:
                    parent.write_text(pid)
                except OSError:
                    pass
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def which(name: str) -> str | None:
    return shutil.which(name)


async def poll_until(predicate: Callable[[], bool], *, interval: float = 0.05) -> None:
    """Wait for a condition in another process (a log line, a kernel state) that
    offers nothing to await; callers bound it with ``trio.fail_after``."""
    import trio

    while not predicate():  # noqa: ASYNC110 - an external condition, nothing to await
        await trio.sleep(interval)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "made_up_readings: the test's probe readings (and probe errors) carry made-up "
        "inputs and output: their data is not checked against its schema (the rest of "
        "each event, and gap and agent events whole, still are)",
    )


@pytest.fixture(autouse=True)
def events_honour_their_contract(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Every event any test builds, where it is built (``cellos_probed.events``: what
    sinks, the outbox and the spool carry), honours its contract
    (``tests/event_contract.py``): its data valid against the schema its ``dataschema``
    names, the whole valid against the official CloudEvents schema and read alike by
    the CloudEvents SDK. A probe's event's JSON (joined from parts made once, with
    outputs serialised where they were read) is its dict serialised whole, when it is
    built and when a sink captures it. A broken event raises where it is built, and
    fails the test at its end too, should the code under test swallow the error."""
    import orjson

    from cellos_probed import events
    from cellos_probed.cloudevent import CloudEvent
    from cellos_probed.probes import CapturingSink
    from tests.event_contract import check_event

    made_up = request.node.get_closest_marker("made_up_readings") is not None
    broken: list[str] = []

    def check(payload: bytes) -> None:
        try:
            check_event(payload, made_up_readings=made_up)
        except Exception as exc:  # a ContractError, or what the CloudEvents SDK refused
            broken.append(f"{type(exc).__name__}: {exc}")
            raise

    stream_event = events.EventStream.event
    envelope = events._envelope

    def checked_stream_event(self: events.EventStream, *args: Any, **kwargs: Any) -> CloudEvent:
        event = stream_event(self, *args, **kwargs)
        payload = event.to_json()
        assert payload == orjson.dumps(event.to_dict()), payload[:300]
        check(payload)
        return event

    def checked_envelope(*args: Any, **kwargs: Any) -> CloudEvent:
        event = envelope(*args, **kwargs)
        check(orjson.dumps(event.to_dict()))
        return event

    monkeypatch.setattr(events.EventStream, "event", checked_stream_event)
    monkeypatch.setattr(events, "_envelope", checked_envelope)

    captured = CapturingSink.emit_nowait  # emit() goes through it too

    def checked_capture(self: CapturingSink, event: CloudEvent) -> None:
        assert event.to_json() == orjson.dumps(event.to_dict()), event.to_json()[:300]
        captured(self, event)

    monkeypatch.setattr(CapturingSink, "emit_nowait", checked_capture)
    yield
    if broken:
        pytest.fail(f"{len(broken)} event(s) broke their contract; the first: {broken[0]}")
