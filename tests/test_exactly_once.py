"""Exactly once past JetStream's duplicate window, against a real nats-server.

The stream drops a repeated ``Nats-Msg-Id`` only within its duplicate window.
Here a proxy between the daemon and the server loses the server's replies
(readings stored, their acknowledgements never heard) for longer than a
short window; the daemon is killed with SIGKILL and restarted, and re-sends
from its spool what it never saw confirmed. The server runs the shipped
authorization example, the daemon as its host's user: the look-up it needs is
one that user may make.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import nats
import orjson
import pytest
import trio
from structlog.testing import capture_logs

from cellos_probed.config import JetStreamSettings, NatsSettings, SpoolSettings
from cellos_probed.events import SequenceRegistry, build_probe_error_envelope
from cellos_probed.nats_bridge import (
    NatsPublisher,
    PublishRefused,
    StoredMessage,
    open_subscription,
)
from cellos_probed.nats_sink import NO_DIRECT_GET, NatsSink, already_stored
from cellos_probed.outbox import entry_for
from cellos_probed.readings import ProbeContext, ProbeIoError
from cellos_probed.spool import SpoolOutbox
from cellos_probed.tail import run_verify
from cellos_probed.verify import Completeness
from testbed.tcp_proxy import ReplyDroppingProxy
from tests.conftest import NatsServer, needs_nats, poll_until, start_nats_server
from tests.test_delivery import PREFIX, Daemon, write_config
from tests.test_nats_authorization import EXAMPLE, PASSWORDS, user
from tests.test_outbox import reading

pytestmark = needs_nats

STREAM = "CELLOS_HOST"
#: seconds: the stream's duplicate_window, short so that an outage outlasts it, and
#: long enough for the daemon to send more than its first batch before re-sends
#: within half of it end (an attempt takes ack_timeout_seconds + 1 s to fail)
WINDOW = 4.0


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    """nats-server with JetStream and the shipped authorization example; the stream made
    by cellos-admin with a short duplicate window."""
    for variable, password in PASSWORDS.values():
        monkeypatch.setenv(variable, password)
    workdir = tmp_path / "nats"
    workdir.mkdir()
    conf = workdir / "server.conf"
    conf.write_text(f'include "{os.path.relpath(EXAMPLE, workdir)}"\n')
    started = start_nats_server(workdir, jetstream=True, extra=["-c", str(conf)])
    try:
        asyncio.run(create_stream(started))
        yield started
    finally:
        started.stop()


async def create_stream(server: NatsServer) -> None:
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(server.url, user="cellos-admin", password=PASSWORDS["cellos-admin"][1])
    try:
        await nc.jetstream().add_stream(
            StreamConfig(
                name=STREAM,
                subjects=[f"{PREFIX}.>"],
                storage=StorageType.FILE,
                duplicate_window=WINDOW,
                allow_direct=True,
            )
        )
    finally:
        await nc.close()


def stream_messages(server: NatsServer) -> int:
    """How many messages the stream holds, asked directly (not through the proxy)."""

    async def count() -> int:
        password = PASSWORDS["cellos-admin"][1]
        nc = await nats.connect(server.url, user="cellos-admin", password=password)
        try:
            return int((await nc.jetstream().stream_info(STREAM)).state.messages)
        finally:
            await nc.close()

    return asyncio.run(count())


async def stored(server: NatsServer) -> int:
    return await trio.to_thread.run_sync(stream_messages, server)


async def until_stored(server: NatsServer, at_least: int) -> None:
    while await stored(server) < at_least:  # noqa: ASYNC110 - another process's doing
        await trio.sleep(0.05)


def report(name: str, completeness: Completeness, produced: int, acks_lost: int) -> None:
    rows = completeness.rows()
    copies = sum(row.received for row in rows)
    distinct = sum(len(completeness.seen[row.key]) for row in rows)
    declared = sum(len(row.declared) for row in rows)
    print(
        f"\n[{name}] produced={produced} stored={copies} duplicated={copies - distinct} "
        f"declared_lost={declared} undeclared_lost={sum(len(r.undeclared) for r in rows)} "
        f"replies_lost={acks_lost}"
    )


async def scenario(server: NatsServer, proxy: ReplyDroppingProxy, daemon: Daemon) -> None:
    """Acknowledgements lost for longer than the window, kill -9, a restart, a stop."""
    await daemon.start()
    await until_stored(server, 10)
    # the server keeps storing what the daemon sends; the daemon hears nothing
    proxy.dropping = True
    before = await stored(server)
    await poll_until(lambda: daemon.count("cannot publish yet; holding events") >= 1)
    await trio.sleep(2 * WINDOW)  # a duration: the outage outlasts the window
    assert await stored(server) > before  # readings stored, their acks lost
    assert await daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    proxy.dropping = False
    await daemon.start()
    await poll_until(lambda: daemon.count("nats connected") >= 2)
    await until_stored(server, await stored(server) + 20)  # the new boot publishes
    assert await daemon.stop() == 0


async def test_acknowledgements_lost_past_the_window_then_kill_9_every_reading_once(
    tmp_path: Path, server: NatsServer
) -> None:
    """The stream holds every reading once: what was stored while its acknowledgement
    was lost is neither re-sent past the window nor after the restart."""
    proxy = ReplyDroppingProxy(server.port)
    host_a = PASSWORDS["host-a"][1]
    daemon = Daemon(tmp_path / "daemon.toml", tmp_path / "daemon.log")
    try:
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.serve)
                write_config(
                    tmp_path,
                    [proxy.url],
                    nats_extra=f'user = "host-a"\npassword = "{host_a}"\n',
                    jetstream=(
                        f'[nats.jetstream]\nstream = "{STREAM}"\nack_timeout_seconds = 0.5\n'
                    ),
                    extra=f'[spool]\npath = "{tmp_path / "spool"}"\n',
                )
                await scenario(server, proxy, daemon)
                nursery.cancel_scope.cancel()
    finally:
        if daemon.process is not None and daemon.process.returncode is None:
            daemon.process.kill()
    stopped = [entry for entry in daemon.entries() if entry.get("event") == "stopped"]
    assert stopped[0]["drained"] is True
    with trio.fail_after(30):
        completeness = await run_verify(
            [server.url],
            f"{PREFIX}.>",
            stream=STREAM,
            duration=20,
            settings=user(server, "cellos-consumer"),
        )
    rows = completeness.rows()
    boots = sorted({row.key[0] for row in rows})
    assert len(boots) == 2
    killed_boot = next(e["boot"] for e in daemon.entries() if e.get("event") == "starting")
    # the killed run spooled every reading it made: its count is its highest cellosseq
    produced = sum(row.last for row in rows if row.key[0] == killed_boot) + daemon.produced()
    report("acks lost past the window, kill -9", completeness, produced, proxy.dropped)
    assert proxy.dropped > 0
    # what the killed run had sent, the restart found in the stream and left out
    assert daemon.count("already in the stream: not sent again") >= 1
    for row in rows:
        assert row.duplicates == [], row
        assert row.holes == [], row
        assert row.first == 1
    assert sum(row.received for row in rows) == produced


def earlier_runs_events(sequences: SequenceRegistry) -> list:  # type: ignore[type-arg]
    """Readings and probe errors of one cell, two probes: the probe_error subject
    carries both probes' counts."""
    ctx = ProbeContext("a", "run-a", "sha256:x")

    def error(probe: str):  # type: ignore[no-untyped-def]
        return build_probe_error_envelope(ctx, probe, {}, ProbeIoError("gone"), sequences)

    return [
        reading(sequences, "a"),  # cgroup 1
        error("host.tap_link"),  # tap_link 1, on probe_error
        error("host.cgroup"),  # cgroup 2, on probe_error
        reading(sequences, "a", "tap_link"),  # tap_link 2
        reading(sequences, "a"),  # cgroup 3
        error("host.tap_link"),  # tap_link 3, on probe_error
        reading(sequences, "a"),  # cgroup 4
        reading(sequences, "a", "tap_link"),  # tap_link 4
    ]


STORED_BEFORE_THE_KILL = 5


@pytest.mark.made_up_readings
@pytest.mark.parametrize("allow_direct", [True, False])
async def test_a_restart_leaves_out_what_the_stream_holds(
    tmp_path: Path, allow_direct: bool
) -> None:
    """An earlier run sent eight events from its spool; the stream stored the first
    five, their acknowledgements never came, and the duplicate window has passed. The
    restart sends the other three only, judged per subject: on probe_error, the last
    stored is cgroup's, and tap_link's before it is stored as well. A stream without
    direct gets gets all eight again (at least once), and the daemon says why."""
    server = start_nats_server(tmp_path / "nats", jetstream=True)
    window = 0.5
    settings = NatsSettings(
        servers=(server.url,),
        jetstream=JetStreamSettings(stream="CELLOS_EO", create_stream=False),
    )
    spool = tmp_path / "spool"
    try:
        with trio.fail_after(30):

            async def create() -> None:
                from nats.js.api import StreamConfig

                nc = await nats.connect(server.url)
                try:
                    await nc.jetstream().add_stream(
                        StreamConfig(
                            name="CELLOS_EO",
                            subjects=[f"{PREFIX}.>"],
                            duplicate_window=window,
                            allow_direct=allow_direct,
                        )
                    )
                finally:
                    await nc.close()

            await trio.to_thread.run_sync(asyncio.run, create())
            earlier = SequenceRegistry(host_id="host-a")
            events = earlier_runs_events(earlier)
            outbox = SpoolOutbox(spool, PREFIX, earlier.boot_id, max_bytes=1 << 24)
            for event in events:
                outbox.put(event)
            sent = outbox.batch(STORED_BEFORE_THE_KILL)
            publisher = NatsPublisher(settings, host_id="host-a")
            token, up = trio.lowlevel.current_trio_token(), trio.Event()
            publisher.state.on_change = lambda _: token.run_sync_soon(up.set)
            publisher.start()
            try:
                await up.wait()
                await publisher.publish_batch([(e.subject, e.payload, e.msg_id) for e in sent])
            finally:
                await publisher.aclose()
            del outbox  # never confirmed: killed
            await trio.sleep(window)  # a duration: the window passes
            sink = NatsSink(
                settings, SequenceRegistry(host_id="host-a").boot_id, spool=SpoolSettings(spool)
            )
            with capture_logs() as logs:
                async with trio.open_nursery() as nursery:
                    await nursery.start(sink.run)
                    assert await sink.drain(10)
                    nursery.cancel_scope.cancel()
            async with open_subscription(
                [server.url], f"{PREFIX}.>", stream="CELLOS_EO"
            ) as messages:
                stored_ids = [orjson.loads(message.data)["id"] async for message in messages]
    finally:
        server.stop()
    ids = [event.id for event in events]
    said = [entry for entry in logs if entry["event"] == NO_DIRECT_GET]
    if allow_direct:
        assert stored_ids == ids  # each once, in the order made
        assert said == []
        left_out = [e for e in logs if e["event"] == "already in the stream: not sent again"]
        assert [e["records"] for e in left_out] == [STORED_BEFORE_THE_KILL]
    else:
        assert stored_ids == ids[:STORED_BEFORE_THE_KILL] + ids
        assert len(said) == 1
        assert said[0]["log_level"] == "error"
    assert sink.statistics().published == len(events)


@pytest.mark.made_up_readings
def test_what_is_stored_is_judged_by_position_and_by_count() -> None:
    """Where the stored message is not in the batch (a memory outbox moved gap events
    ahead of it), a reading of its boot and probe numbered at or below it is stored."""
    sequences = SequenceRegistry(host_id="host-a")
    other_boot = SequenceRegistry(host_id="host-a")
    batch = [
        entry_for(reading(other_boot, "a"), PREFIX, 1),  # cgroup 1 of another boot
        entry_for(reading(sequences, "a"), PREFIX, 2),  # cgroup 1
        entry_for(reading(sequences, "a", "tap_link"), PREFIX, 3),  # another subject
        entry_for(reading(sequences, "a"), PREFIX, 4),  # cgroup 2
        entry_for(reading(sequences, "a"), PREFIX, 5),  # cgroup 3
    ]
    cgroup = batch[1].subject
    last = {cgroup: StoredMessage("not-in-this-batch", sequences.boot_id, "host.cgroup", 2)}
    assert already_stored(batch, last) == [False, True, False, True, False]
    # by position: everything before it on its subject, whatever its count
    last = {cgroup: StoredMessage(batch[3].msg_id, None, None, None)}
    assert already_stored(batch, last) == [True, True, False, True, False]
    assert already_stored(batch, {cgroup: None}) == [False] * 5


@pytest.mark.made_up_readings
async def test_a_hosts_user_may_look_up_its_own_subjects_only(server: NatsServer) -> None:
    """The shipped authorization example lets host-a's user read back the last message
    on its own subjects (what the daemon asks before re-sending), and no other host's."""
    settings = NatsSettings(
        servers=(server.url,),
        user="host-a",
        password=PASSWORDS["host-a"][1],
        jetstream=JetStreamSettings(stream=STREAM, ack_timeout_seconds=0.5),
    )
    sequences = SequenceRegistry(host_id="host-a")
    event = entry_for(reading(sequences, "a"), PREFIX, 1)
    agent = f"{PREFIX}.agent.host-a"
    host_b = f"{PREFIX}.cgroup.host-b.a"
    publisher = NatsPublisher(settings, host_id="host-a")
    token, up = trio.lowlevel.current_trio_token(), trio.Event()
    publisher.state.on_change = lambda _: token.run_sync_soon(up.set)
    publisher.start()
    try:
        with trio.fail_after(20):
            await up.wait()
            await publisher.publish_batch([(event.subject, event.payload, event.msg_id)])
            assert settings.jetstream is not None
            found = await publisher.last_stored(settings.jetstream, [event.subject, agent])
            assert found == {
                event.subject: StoredMessage(event.msg_id, sequences.boot_id, "host.cgroup", 1),
                agent: None,
            }
            with pytest.raises(PublishRefused) as refused:
                await publisher.last_stored(settings.jetstream, [host_b])
    finally:
        await publisher.aclose()
    assert [str(v) for v in refused.value.violations] == [
        f'publish to "$js.api.direct.get.cellos_host.{host_b.lower()}"'
    ]
