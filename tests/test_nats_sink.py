"""The NATS sink against a real server: headers, batching, holding through an outage."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import orjson
import pytest
import trio

from cellos_probed import nats_bridge
from cellos_probed.config import NatsSettings, SpoolSettings
from cellos_probed.nats_bridge import (
    FRAME_SPLIT_BYTES,
    NatsPublisher,
    hpub_frame,
    hpub_pieces,
    open_subscription,
)
from cellos_probed.nats_sink import NatsSink
from cellos_probed.probes import ProbeContext, ProbeReading, SequenceRegistry, emit_reading
from tests.conftest import NatsServer, needs_nats, start_nats_server

PREFIX = "dev.cellos.events.cell.observability.host.v1"
CTX = ProbeContext("cell-1", "run-1", "sha256:x")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_in_msgs(monitor_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/varz", timeout=2) as reply:
        return int(json.load(reply)["in_msgs"])


async def emit_n(sink: NatsSink, sequences: SequenceRegistry, count: int) -> None:
    for n in range(count):
        await emit_reading(sink, CTX, ProbeReading("host.cgroup", {}, {"n": n}), sequences)


def test_an_event_frame_is_byte_for_byte_what_nc_publish_sends() -> None:
    from nats.aio.client import NATS_HDR_LINE
    from nats.protocol.command import hpub_cmd

    payload = orjson.dumps({"n": 1, "text": "\r\n in a string"})
    header = bytes(NATS_HDR_LINE) + b"\r\nContent-Type: application/cloudevents+json\r\n\r\n"
    subject = f"{PREFIX}.cgroup.cell-1"

    def nats_py(payload: bytes) -> bytes:
        # nats-py writes an empty reply-to as a second space; the server reads both alike
        return hpub_cmd(subject, "", header, payload).replace(b"  ", b" ", 1)

    assert hpub_frame(subject, payload) == nats_py(payload)
    assert hpub_frame(subject, b"") == nats_py(b"")


@pytest.mark.parametrize("size", [0, 1, FRAME_SPLIT_BYTES - 1, FRAME_SPLIT_BYTES, 20_000])
def test_a_frame_queued_in_pieces_is_the_same_bytes_and_a_big_payload_is_not_copied(
    size: int,
) -> None:
    subject = f"{PREFIX}.fc_metrics.cell-1"
    payload = orjson.dumps({"t": "x" * max(0, size - 8)})[:size] if size else b""
    pieces = hpub_pieces(subject, payload)
    assert b"".join(pieces) == hpub_frame(subject, payload)
    if size >= FRAME_SPLIT_BYTES:
        assert len(pieces) == 3
        assert pieces[1] is payload  # queued as it is
    else:
        assert len(pieces) == 1


@pytest.mark.made_up_readings
@needs_nats
@pytest.mark.parametrize("frames", ["queued frames", "nc.publish"])
async def test_batches_arrive_in_order_with_the_structured_header(
    nats_server: NatsServer, frames: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if frames == "nc.publish":  # the path taken if nats-py drops its private write queue
        monkeypatch.setattr(nats_bridge, "_queue_frames", None)
    else:
        assert nats_bridge._queue_frames is not None, "nats-py no longer has _send_command"
    sequences = SequenceRegistry(host_id="host-a")
    sink = NatsSink(NatsSettings(servers=(nats_server.url,)), sequences.boot_id, batch_size=50)
    with trio.fail_after(20):
        async with (
            open_subscription([nats_server.url], f"{PREFIX}.>") as messages,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(sink.run)
            await emit_n(sink, sequences, 1200)
            assert await sink.drain(10)
            received = [await messages.receive() for _ in range(1200)]
            nursery.cancel_scope.cancel()
    assert [orjson.loads(m.data)["cellosseq"] for m in received] == list(range(1, 1201))
    assert {m.subject for m in received} == {f"{PREFIX}.cgroup.host-a.cell-1"}
    assert all(m.headers["Content-Type"] == "application/cloudevents+json" for m in received)
    assert sink.statistics().published == 1200
    assert sink.outbox.dropped == 0


@pytest.mark.made_up_readings
@needs_nats
async def test_events_are_held_while_the_server_is_down_and_sent_on_reconnect(
    tmp_path: Path,
) -> None:
    port, monitor = free_port(), free_port()
    server = start_nats_server(tmp_path / "a", port=port, extra=["-m", str(monitor)])
    sequences = SequenceRegistry()
    sink = NatsSink(NatsSettings(servers=(server.url,)), sequences.boot_id, retry_seconds=0.05)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(sink.run)
                await emit_n(sink, sequences, 5)
                assert await sink.drain(5)
                assert server_in_msgs(monitor) == 5
                server.stop()
                await sink.wait_connected(False)  # the client noticed the server went away
                await emit_n(sink, sequences, 7)
                assert len(sink.outbox) == 7  # held by us, not by nats-py
                server = start_nats_server(tmp_path / "b", port=port, extra=["-m", str(monitor)])
                assert await sink.drain(15)
                # the restarted server received exactly the held events
                assert server_in_msgs(monitor) == 7
                assert sink.statistics().reconnects >= 1
                nursery.cancel_scope.cancel()
    finally:
        server.stop()
    assert sink.statistics().published == 12
    assert sink.outbox.dropped == 0


@pytest.mark.made_up_readings
@needs_nats
async def test_new_nats_settings_reconnect_without_dropping_what_is_held(
    tmp_path: Path,
) -> None:
    old_port, new_port, monitor = free_port(), free_port(), free_port()
    sequences = SequenceRegistry()
    # the configured server is down: events are held
    sink = NatsSink(
        NatsSettings(servers=(f"nats://127.0.0.1:{old_port}",)),
        sequences.boot_id,
        retry_seconds=0.05,
    )
    new = start_nats_server(tmp_path / "new", port=new_port, extra=["-m", str(monitor)])
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(sink.run)
                await emit_n(sink, sequences, 9)
                assert len(sink.outbox) == 9
                sink.apply_settings(NatsSettings(servers=(new.url,), name="reloaded"))
                await emit_n(sink, sequences, 3)
                assert await sink.drain(15)
                assert server_in_msgs(monitor) == 12
                nursery.cancel_scope.cancel()
    finally:
        new.stop()
    assert sink.outbox.dropped == 0


@needs_nats
async def test_an_event_over_the_servers_max_payload_is_not_sent_and_the_rest_are(
    nats_server: NatsServer,
) -> None:
    # The server closes a connection that sends more than max_payload: such
    # an event is held back (its index returned), the batch's others go out.
    publisher = NatsPublisher(NatsSettings(servers=(nats_server.url,)))
    token, up = trio.lowlevel.current_trio_token(), trio.Event()
    publisher.state.on_change = lambda what: token.run_sync_soon(up.set)
    publisher.start()
    try:
        with trio.fail_after(20):
            async with open_subscription([nats_server.url], f"{PREFIX}.>") as messages:
                await up.wait()
                huge = b"x" * (1024 * 1024)  # nats-server's default max_payload is 1 MiB
                result = await publisher.publish_batch(
                    [(f"{PREFIX}.cgroup.a", b"{}", "1"), (f"{PREFIX}.cgroup.b", huge, "2"),
                     (f"{PREFIX}.cgroup.c", b"{}", "3")]
                )  # fmt: skip
                assert result.too_large == [1]
                assert publisher.state.connected
                assert [(await messages.receive()).subject for _ in range(2)] == [
                    f"{PREFIX}.cgroup.a", f"{PREFIX}.cgroup.c",
                ]  # fmt: skip
    finally:
        await publisher.aclose()


@pytest.mark.made_up_readings
@needs_nats
@pytest.mark.parametrize("outbox", ["memory", "spool"])
async def test_a_reading_the_server_cannot_take_is_declared_as_a_gap_and_nothing_stalls(
    nats_server: NatsServer, outbox: str, tmp_path: Path
) -> None:
    sequences = SequenceRegistry()
    spool = SpoolSettings(tmp_path / "spool") if outbox == "spool" else None
    sink = NatsSink(NatsSettings(servers=(nats_server.url,)), sequences.boot_id, spool=spool)
    with trio.fail_after(20):
        async with (
            open_subscription([nats_server.url], f"{PREFIX}.>") as messages,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(sink.run)
            await sink.wait_connected()
            for n in range(5):
                output = {"rules": ["x" * 1024] * 1100} if n == 2 else {"n": n}
                await emit_reading(sink, CTX, ProbeReading("host.cgroup", {}, output), sequences)
            assert await sink.drain(10)
            received = [orjson.loads((await messages.receive()).data) for _ in range(5)]
            nursery.cancel_scope.cancel()
    readings = [event for event in received if not event["type"].endswith(".gap")]
    gaps = [event["data"] for event in received if event["type"].endswith(".gap")]
    assert [event["cellosseq"] for event in readings] == [1, 2, 4, 5]
    assert len(gaps) == 1
    assert gaps[0]["reason"] == "too_large"
    assert (gaps[0]["firstSequence"], gaps[0]["lastSequence"], gaps[0]["dropped"]) == (3, 3, 1)
    assert gaps[0]["cellId"] == "cell-1"
    assert gaps[0]["probeSource"] == "host.cgroup"
    assert sink.statistics().dropped == 1
    assert sink.statistics().published == 5  # four readings and the gap
    assert len(sink.outbox) == 0
