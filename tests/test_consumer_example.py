"""examples/consumer.py, the minimal consumer of docs/consuming.md, as a consumer runs it:
a process on a real nats-server, with the schemas `cellos-probed schema` prints."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
import trio

from cellos_probed.events import gap_event
from testbed.cgroup_tree import FakeCgroup
from testbed.fc_emulator import jail_paths, open_emulator
from tests.conftest import NatsServer, needs_nats
from tests.e2e import PREFIX
from tests.fc_helpers import short_root

CONSUMER = Path(__file__).resolve().parent.parent / "examples" / "consumer.py"
STRUCTURED = {"Content-Type": "application/cloudevents+json"}


@pytest.fixture
def fc_root() -> Iterator[Path]:
    yield from short_root()


@pytest.fixture
def schemas(tmp_path: Path) -> Path:
    """`cellos-probed schema > schemas.json`, as docs/consuming.md tells a consumer."""
    printed = subprocess.run([sys.executable, "-m", "cellos_probed", "schema"], capture_output=True)
    assert printed.returncode == 0, printed.stderr.decode()
    path = tmp_path / "schemas.json"
    path.write_bytes(printed.stdout)
    return path


def write_config(tmp_path: Path, server: NatsServer, fc_root: Path) -> Path:
    """cell-a: cgroup and an emulated VM; cell-b: cgroup; cell-c: a cgroup that is gone."""
    cgroup_root = tmp_path / "cgroup"
    for cell in ("cell-a", "cell-b"):
        FakeCgroup(cgroup_root / cell).write()
    api, metrics = jail_paths(fc_root, "cell-a")
    vm = f'[cell.fc_metrics]\napi_socket = "{api}"\nmetrics_path = "{metrics}"\n'
    cells = "".join(
        f'[[cell]]\nid = "{cell}"\nrun_id = "run-7"\nspec_signature_hash = "sha256:abcd"\n'
        f'[cell.cgroup]\npath = "{cell}"\n{vm if cell == "cell-a" else ""}\n'
        for cell in ("cell-a", "cell-b", "cell-c")
    )
    config = tmp_path / "cellos-probed.toml"
    config.write_text(
        "[daemon]\ntick_seconds = 0.25\nprobe_timeout_seconds = 0.2\n"
        'host_id = "host-a"\nagent_event_every_ticks = 2\n'
        f'[paths]\ncgroup_root = "{cgroup_root}"\njail_root = "{fc_root}"\n'
        f'[nats]\nservers = ["{server.url}"]\n\n{cells}'
    )
    return config


async def run_consumer(
    server: NatsServer, schemas: Path, count: int, while_subscribed: Callable[[], Awaitable[None]]
) -> tuple[int, list[str]]:
    """The consumer on every event for ``count`` events (at most 20 s); ``while_subscribed``
    runs once it is subscribed. Its exit code and stdout lines."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(CONSUMER), f"{PREFIX}.>", str(schemas),
         "--server", server.url, "--count", str(count), "--seconds", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stderr is not None
    stdout, stderr = bytearray(), bytearray()
    subscribed = trio.Event()

    async def pump(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
        async for chunk in stream:
            into += chunk
            if b"subscribed to" in stderr:
                subscribed.set()
        subscribed.set()  # ended: the assertion below says whether it ever subscribed

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, process.stdout, stdout)
            nursery.start_soon(pump, process.stderr, stderr)
            await subscribed.wait()
            assert b"subscribed to" in stderr, stderr.decode()
            await while_subscribed()
            returncode = await process.wait()
    finally:
        if process.returncode is None:  # the test failed: no consumer is left behind
            process.kill()
            await process.wait()
    assert b"Traceback" not in stderr, stderr.decode()
    return returncode, stdout.decode().splitlines()


@needs_nats
async def test_the_consumer_validates_a_real_daemons_events(
    tmp_path: Path, fc_root: Path, nats_server: NatsServer, schemas: Path
) -> None:
    config = write_config(tmp_path, nats_server, fc_root)
    log = tmp_path / "daemon.log"
    daemons: list[trio.Process] = []

    async def start_daemon() -> None:
        with log.open("wb") as stderr:
            daemons.append(
                await trio.lowlevel.open_process(
                    [sys.executable, "-m", "cellos_probed", "run", "--config", str(config)],
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            )

    with trio.fail_after(40):
        async with open_emulator(fc_root) as emulator:
            await emulator.add(emulator.spec("cell-a"))
            try:
                returncode, lines = await run_consumer(nats_server, schemas, 40, start_daemon)
            finally:
                for daemon in daemons:
                    daemon.send_signal(signal.SIGTERM)
                    with trio.fail_after(5):
                        await daemon.wait()

    events, summary = lines[:-1], lines[-1]
    assert summary == "summary: events 40, duplicates 0, invalid 0, holes undeclared 0", lines
    assert returncode == 0
    assert all(line.startswith("ok    ") for line in events), events
    assert "ok    host-a agent" in events
    counted = [line.split()[1:] for line in events if " #" in line]  # where, probe, kind, #n
    assert {kind for _, _, kind, _ in counted} == {"cgroup", "fc_metrics", "probe_error"}
    assert ["host-a/cell-c", "host.cgroup", "probe_error", "#1"] in counted
    # subscribed before the daemon started: every (boot, host, cell, probe) count from 1
    first: dict[tuple[str, str], str] = {}
    for where, probe, _, number in counted:
        first.setdefault((where, probe), number)
    assert set(first) == {
        ("host-a/cell-a", "host.cgroup"),
        ("host-a/cell-a", "host.fc_metrics"),
        ("host-a/cell-b", "host.cgroup"),
        ("host-a/cell-c", "host.cgroup"),
    }
    assert set(first.values()) == {"#1"}


def once_event(tmp_path: Path) -> dict[str, Any]:
    """A real cgroup event of cell-a on host-a, from `cellos-probed once`."""
    cgroup_root = tmp_path / "cgroup"
    FakeCgroup(cgroup_root / "cell-a").write()
    config = tmp_path / "once.toml"
    config.write_text(
        f'[daemon]\nhost_id = "host-a"\n[paths]\ncgroup_root = "{cgroup_root}"\n'
        '[[cell]]\nid = "cell-a"\nrun_id = "run-7"\nspec_signature_hash = "sha256:abcd"\n'
        '[cell.cgroup]\npath = "cell-a"\n'
    )
    printed = subprocess.run(
        [sys.executable, "-m", "cellos_probed", "once", "--config", str(config)],
        capture_output=True,
        check=True,
    )
    (event,) = map(json.loads, printed.stdout.splitlines())
    assert event["data"]["hostId"] == "host-a"
    return dict(event)


def variant(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``event`` as another event: a new id, then ``changes`` (``cell`` moves it to that cell)."""
    out: dict[str, Any] = json.loads(json.dumps(event))
    out["id"] = f"urn:cellos:event:{uuid.uuid4()}"
    if "cell" in changes:
        out["subject"] = out["data"]["cellId"] = changes.pop("cell")
    out.update(changes)
    return out


async def publish(server: NatsServer, events: list[tuple[str, bytes]]) -> None:
    """Publish as the daemon does (structured mode), flushed: on return the server has
    routed every one."""

    async def send() -> None:
        client = await nats.connect(server.url)
        for subject, payload in events:
            await client.publish(subject, payload, headers=STRUCTURED)
        await client.flush()
        await client.close()

    await trio.to_thread.run_sync(asyncio.run, send())


def on_subject(event: dict[str, Any]) -> tuple[str, bytes]:
    data = event["data"]
    return f"{PREFIX}.cgroup.{data['hostId']}.{data['cellId']}", orjson.dumps(event)


@needs_nats
async def test_an_event_whose_data_breaks_its_schema_fails_the_consumer(
    tmp_path: Path, nats_server: NatsServer, schemas: Path
) -> None:
    good = once_event(tmp_path)
    bad = variant(good, cellosseq=2)
    del bad["data"]["hostId"]
    elsewhere = variant(good, cellosseq=3)  # valid, but on another host's subject
    subject = f"{PREFIX}.cgroup.host-a.cell-a"

    async def send() -> None:
        await publish(
            nats_server,
            [on_subject(good), (subject, orjson.dumps(bad)),
             (f"{PREFIX}.cgroup.host-b.cell-a", orjson.dumps(elsewhere))],
        )  # fmt: skip

    with trio.fail_after(30):
        returncode, lines = await run_consumer(nats_server, schemas, 3, send)
    assert lines == [
        "ok    host-a/cell-a host.cgroup cgroup #1",
        f"INVALID {bad['id']}: data: 'hostId' is a required property",
        f"INVALID {elsewhere['id']}: on {PREFIX}.cgroup.host-b.cell-a, "
        "but data names host-a/cell-a",
        "summary: events 3, duplicates 0, invalid 2, holes undeclared 0",
    ]
    assert returncode == 1


@needs_nats
async def test_holes_count_only_when_no_gap_declared_them(
    tmp_path: Path, nats_server: NatsServer, schemas: Path
) -> None:
    first = once_event(tmp_path)
    boot = first["cellosagentboot"]
    second = variant(first, cellosseq=2)
    gap = gap_event(first["data"], "host.cgroup", 3, 4, "buffer_full", boot)
    events = [
        first,
        second,
        second,  # redelivered (same id): counted once
        variant(first, cellosseq=5),
        variant(first, cellosseq=1, cellosagentboot=str(uuid.uuid4())),  # a new boot: from 1
        variant(first, cellosseq=1, cell="cell-b"),
        variant(first, cellosseq=3, cell="cell-b"),  # 2 lost, no gap says so
    ]

    async def send() -> None:
        await publish(
            nats_server,
            [*map(on_subject, events), (gap.nats_subject(PREFIX), gap.to_json())],
        )

    with trio.fail_after(30):
        returncode, lines = await run_consumer(nats_server, schemas, 8, send)
    assert f"DUPLICATE {second['id']} (skipped)" in lines
    assert "gap   host-a/cell-a host.cgroup lost #3..#4 (buffer_full)" in lines
    assert lines[-2:] == [
        f"UNDECLARED HOLE host-a/cell-b host.cgroup boot {boot}: cellosseq [2]",
        "summary: events 8, duplicates 1, invalid 0, holes undeclared 1",
    ]
    assert returncode == 1
