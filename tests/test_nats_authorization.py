"""config/nats-authorization.example.conf on a real nats-server: a host's user
publishes its own host's events and nothing else, and a daemon given another
host's user says so, keeps running and loses nothing silently."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
import trio
from structlog.testing import capture_logs

from cellos_probed.config import NatsSettings, load_config
from cellos_probed.daemon import DaemonHandle, StatusReport, collect_figures, run_daemon
from cellos_probed.events import SequenceRegistry
from cellos_probed.nats_bridge import NatsPublisher, open_subscription
from cellos_probed.nats_sink import NatsSink
from cellos_probed.systemd import Notifier
from testbed.cgroup_tree import FakeCgroup
from tests.conftest import NatsServer, needs_nats, poll_until, start_nats_server
from tests.test_delivery import PREFIX, Daemon

pytestmark = needs_nats

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "nats-authorization.example.conf"
STREAM = "CELLOS_HOST"
CELLS = ("cell-1", "cell-2")
#: the example reads its passwords from the server's environment
PASSWORDS = {
    "host-a": ("CELLOS_HOST_A_PASSWORD", "pw-host-a"),
    "host-b": ("CELLOS_HOST_B_PASSWORD", "pw-host-b"),
    "cellos-consumer": ("CELLOS_CONSUMER_PASSWORD", "pw-consumer"),
    "cellos-admin": ("CELLOS_ADMIN_PASSWORD", "pw-admin"),
}
REFUSED = "NATS refuses this host's events: check [daemon] host_id and the NATS user"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    for variable, password in PASSWORDS.values():
        monkeypatch.setenv(variable, password)
    workdir = tmp_path / "nats"
    workdir.mkdir()
    conf = workdir / "server.conf"
    # the shipped file itself; nats-server resolves an include relative to the including file
    conf.write_text(f'include "{os.path.relpath(EXAMPLE, workdir)}"\n')
    started = start_nats_server(workdir, jetstream=True, extra=["-c", str(conf)])
    try:
        yield started
    finally:
        started.stop()


def user(server: NatsServer, name: str) -> NatsSettings:
    return NatsSettings(servers=(server.url,), user=name, password=PASSWORDS[name][1])


def server_log(server: NatsServer) -> str:
    return "".join(path.read_text() for path in server.store.glob("nats-*.log"))


def create_stream(server: NatsServer) -> None:
    """The stream, made by cellos-admin: hosts may look it up but not create it."""
    from nats.js.api import StorageType, StreamConfig

    async def create() -> None:
        password = PASSWORDS["cellos-admin"][1]
        nc = await nats.connect(server.url, user="cellos-admin", password=password)
        try:
            await nc.jetstream().add_stream(
                StreamConfig(name=STREAM, subjects=[f"{PREFIX}.>"], storage=StorageType.FILE)
            )
        finally:
            await nc.close()

    asyncio.run(create())


def daemon_config(
    tmp_path: Path, server: NatsServer, *, host_id: str, user: str, jetstream: bool
) -> Path:
    root = tmp_path / "cgroup"
    text = (
        f'[daemon]\nhost_id = "{host_id}"\ntick_seconds = 0.05\nagent_event_every_ticks = 2\n'
        f"drain_timeout_seconds = 1.0\n"
        f'[paths]\ncgroup_root = "{root}"\n'
        f'[nats]\nservers = ["{server.url}"]\nuser = "{user}"\npassword = "{PASSWORDS[user][1]}"\n'
    )
    if jetstream:
        text += f'[nats.jetstream]\nstream = "{STREAM}"\nack_timeout_seconds = 0.5\n'
    for cell in CELLS:
        FakeCgroup(root / cell).write()
        text += (
            f'[[cell]]\nid = "{cell}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
            f'[cell.cgroup]\npath = "{cell}"\n'
        )
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    return path


HOST_A_SUBJECTS = {f"{PREFIX}.cgroup.host-a.{cell}" for cell in CELLS} | {f"{PREFIX}.agent.host-a"}


@pytest.mark.parametrize("mode", ["core", "jetstream"])
async def test_a_hosts_user_publishes_its_hosts_events(
    tmp_path: Path, server: NatsServer, mode: str
) -> None:
    jetstream = mode == "jetstream"
    if jetstream:
        create_stream(server)
    config = daemon_config(tmp_path, server, host_id="host-a", user="host-a", jetstream=jetstream)
    daemon = Daemon(config, tmp_path / "daemon.log")
    consumer = user(server, "cellos-consumer")
    with trio.fail_after(40):
        async with open_subscription(consumer.servers, f"{PREFIX}.>", settings=consumer) as live:
            await daemon.start()
            try:
                seen: set[str] = set()
                while not seen >= HOST_A_SUBJECTS:
                    seen.add((await live.receive()).subject)
            finally:
                assert await daemon.stop() == 0
        stopped = [entry for entry in daemon.entries() if entry.get("event") == "stopped"]
        assert stopped[0]["drained"] is True  # every event confirmed (JetStream: acknowledged)
        if jetstream:  # what the daemon published is in the stream, read as the consumer
            async with open_subscription(
                consumer.servers, f"{PREFIX}.>", settings=consumer, stream=STREAM
            ) as stored:
                subjects = {message.subject async for message in stored}
            assert subjects >= HOST_A_SUBJECTS
            assert all(".host-a" in subject for subject in subjects)
    assert daemon.count(REFUSED) == 0
    assert "Violation" not in server_log(server)


async def test_a_core_batch_returns_with_every_refusal_of_it_attributed(server: NatsServer) -> None:
    """publish_batch returns once the server has processed the batch: the refusals are
    in, each attributed to its event, and what was not refused has arrived."""
    batch = [
        (f"{PREFIX}.cgroup.{'host-b' if n % 3 == 0 else 'host-a'}.cell-{n % 7}", b"{}", str(n))
        for n in range(3000)
    ]
    publisher = NatsPublisher(user(server, "host-a"), host_id="host-a")
    token, up = trio.lowlevel.current_trio_token(), trio.Event()
    publisher.state.on_change = lambda what: token.run_sync_soon(up.set)
    consumer = user(server, "cellos-consumer")
    publisher.start()
    try:
        with trio.fail_after(20):
            async with open_subscription(
                consumer.servers, f"{PREFIX}.>", settings=consumer
            ) as live:
                await up.wait()
                result = await publisher.publish_batch(batch)
                assert result.refused == list(range(0, 3000, 3))
                assert len(result.violations) == 1000
                assert {item.operation for item in result.violations} == {"publish"}
                arrived = [(await live.receive()).subject for _ in range(2000)]
    finally:
        await publisher.aclose()
    assert arrived == [subject for n, (subject, _, _) in enumerate(batch) if n % 3]


async def status_lines(receiver: trio.socket.SocketType) -> str:
    """The next STATUS= the daemon sent to its notify socket."""
    while True:
        fields = (await receiver.recv(4096)).decode().split("\n")
        for field in fields:
            if field.startswith("STATUS="):
                return field.removeprefix("STATUS=")


@pytest.mark.parametrize("mode", ["core", "jetstream"])
async def test_a_daemon_given_another_hosts_user_is_refused_says_so_once_and_keeps_running(
    tmp_path: Path, server: NatsServer, mode: str
) -> None:
    jetstream = mode == "jetstream"
    if jetstream:
        create_stream(server)
    path = daemon_config(tmp_path, server, host_id="host-b", user="host-a", jetstream=jetstream)
    config = load_config(path)
    sequences = SequenceRegistry(host_id=config.daemon.host_id)
    sink = NatsSink(config.nats, sequences.boot_id, host_id=config.daemon.host_id)
    notify = tmp_path / "notify"
    receiver = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await receiver.bind(str(notify))
    # a watchdog, so that STATUS= goes out with its ping after (nearly) every tick
    notifier = Notifier({"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "200000"})
    with capture_logs() as logs, receiver, trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            handle: DaemonHandle = await nursery.start(
                partial(
                    run_daemon,
                    config,
                    sink,
                    sequences=sequences,
                    handle_signals=False,
                    notifier=notifier,
                )
            )
            status = await status_lines(receiver)
            while "NATS REFUSES" not in status:
                status = await status_lines(receiver)
            refused_then = sink.statistics().permission_violations
            ticks_then = handle.prober.tick_stats.ticks
            # it keeps running: ticks go on, and (core) what they read is refused too
            while handle.prober.tick_stats.ticks < ticks_then + 10 or (
                not jetstream and sink.statistics().permission_violations == refused_then
            ):
                status = await status_lines(receiver)
            assert "NATS REFUSES" in status
            assert "host-b" in status
            figures = collect_figures(handle.prober, sink)
            stats = sink.statistics()
            handle.stop()
    assert stats.permission_violations > 0
    assert figures["permissionViolations"] == stats.permission_violations
    assert "NATS REFUSES" in StatusReport(handle.prober, sink).line()
    # nothing claims a reading went out
    assert stats.published == figures["published"] == 0
    assert stats.acknowledged == 0
    assert not [entry for entry in logs if entry["event"] == "publishing again"]
    refusals = [entry for entry in logs if entry["event"] == REFUSED]
    assert len(refusals) == 1, refusals
    assert refusals[0]["log_level"] == "error"
    assert refusals[0]["host"] == "host-b"
    assert "host-b" in refusals[0]["refused"]
    if jetstream:
        # held, to be published once the server takes them; nothing dropped yet
        assert stats.buffered > 0
        assert stats.dropped == 0
        return
    # core NATS: each refused event is counted as dropped (and declared by a gap
    # event, which the server refuses as well), and the count is the server's own
    final = sink.statistics()
    assert final.dropped == final.permission_violations
    assert final.gaps_declared > 0
    with trio.fail_after(10):
        await poll_until(
            lambda: server_log(server).count("Publish Violation") == final.permission_violations
        )


def test_a_hosts_user_cannot_publish_or_read_another_hosts_subjects(server: NatsServer) -> None:
    """The enforcement itself, with plain nats-py: host-a's user is refused host-b's
    subjects and host-b's reply inbox; the connection stays up."""
    host_b_reading = f"{PREFIX}.cgroup.host-b.cell-1"
    host_a_reading = f"{PREFIX}.cgroup.host-a.cell-1"

    async def scenario() -> tuple[list[str], list[Any], bool]:
        refused: list[str] = []

        async def error(exc: Exception) -> None:
            refused.append(str(exc))

        consumer = await nats.connect(
            server.url, user="cellos-consumer", password=PASSWORDS["cellos-consumer"][1]
        )
        host_a = await nats.connect(
            server.url, user="host-a", password=PASSWORDS["host-a"][1], error_cb=error
        )
        try:
            received = await consumer.subscribe(f"{PREFIX}.>")
            await consumer.flush()
            await host_a.subscribe("_INBOX.cellos-probed.host-b.>")
            await host_a.publish(host_b_reading, orjson.dumps({"forged": True}))
            await host_a.publish(host_a_reading, orjson.dumps({"own": True}))
            await host_a.flush()
            # the one host-a may publish arrives; the forged one, sent first, did not
            first = await received.next_msg(timeout=5)
            await host_a.flush()  # the -ERRs are in once a PING sent after them is answered
            return refused, [first.subject, orjson.loads(first.data)], host_a.is_connected
        finally:
            await host_a.close()
            await consumer.close()

    refused, first, connected = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert first == [host_a_reading, {"own": True}]
    assert connected
    assert sorted(refused) == sorted(
        [
            f'nats: permissions violation for publish to "{host_b_reading}"',
            'nats: permissions violation for subscription to "_inbox.cellos-probed.host-b.>"',
        ]
    )
