"""`make bench`'s byte figures: the bench's subscriber against a real nats-server and
the daemon's own NATS sink, its sizes by tick and kind checked against what arrived."""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from bench.bench_daemon import bytes_per_tick, percentile
from cellos_probed.config import CellConfig, Config, DaemonSettings, NatsSettings, PathRoots
from cellos_probed.daemon import Prober, collect_figures
from cellos_probed.events import agent_event
from cellos_probed.nats_bridge import ReceivedMessage, hpub_frame, open_subscription
from cellos_probed.nats_sink import NatsSink
from cellos_probed.probes import ProbeContext, ProbeReading, SequenceRegistry, emit_reading
from tests.conftest import NatsServer, needs_nats, poll_until

PREFIX = "dev.cellos.events.cell.observability.host.v1"
SUBSCRIBER = Path(__file__).resolve().parent.parent / "bench" / "subscriber.py"
#: ticks published, each its readings then its agent event, as the daemon sends them
TICKS = 3


def reading(n: int) -> tuple[ProbeContext, ProbeReading]:
    """The n-th reading: cgroup and fc_metrics by turns, of many sizes."""
    ctx = ProbeContext(f"cell-{n % 7}", "run-1", "sha256:x")
    if n % 2:
        return ctx, ProbeReading("host.fc_metrics", {}, {"pad": "x" * (3000 + 37 * n)})
    return ctx, ProbeReading("host.cgroup", {}, {"pad": "x" * (n % 40)})


async def publish_and_count(nats_server: NatsServer, out: Path) -> list[list[ReceivedMessage]]:
    """TICKS ticks of readings, each closed by an agent event, and readings after the
    last, through the daemon's sink; counted by the bench's subscriber (writing
    ``out``) and received here too: what arrived, tick by tick (the last: after the
    last agent event)."""
    subscriber = await trio.lowlevel.open_process(
        [sys.executable, str(SUBSCRIBER), nats_server.url, PREFIX, str(out)]
    )
    try:
        sequences = SequenceRegistry(host_id="host-a")
        sink = NatsSink(NatsSettings(servers=(nats_server.url,)), sequences.boot_id)
        config = Config(
            "<test>",
            DaemonSettings(tick_seconds=1.0, probe_timeout_seconds=0.5, host_id="host-a"),
            PathRoots(cgroup_root=None),
            NatsSettings(),
            (CellConfig("cell-1", "run-1", "sha256:x"),),
        )
        prober = Prober(config, sink, sequences)
        published = 0
        with trio.fail_after(30):
            await poll_until(Path(str(out) + ".ready").exists)
            async with (
                open_subscription([nats_server.url], f"{PREFIX}.>") as messages,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(sink.run)
                for tick in range(TICKS + 1):
                    for n in range(100 * tick, 100 * tick + 50 + 30 * tick):
                        await emit_reading(sink, *reading(n), sequences)
                        published += 1
                    if tick < TICKS:
                        figures = collect_figures(prober, sink)
                        sink.emit_nowait(agent_event("host-a", sequences.boot_id, figures))
                        published += 1
                assert await sink.drain(10)
                received = [await messages.receive() for _ in range(published)]
                nursery.cancel_scope.cancel()
            subscriber.send_signal(signal.SIGTERM)
            assert await subscriber.wait() == 0
    finally:
        if subscriber.returncode is None:
            subscriber.kill()
            with trio.CancelScope(shield=True):
                await subscriber.wait()
    ticks: list[list[ReceivedMessage]] = [[]]
    for message in received:
        ticks[-1].append(message)
        if message.subject.startswith(f"{PREFIX}.agent."):
            ticks.append([])
    return ticks


def kind_of(message: ReceivedMessage) -> str:
    return message.subject.removeprefix(PREFIX + ".").split(".")[0]


@pytest.mark.made_up_readings
@needs_nats
async def test_the_subscriber_counts_each_ticks_event_sizes_and_wire_bytes_by_kind(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    out = tmp_path / "subscriber.json"
    ticks = await publish_and_count(nats_server, out)
    counted = json.loads(out.read_text())
    assert len(ticks) == len(counted["volume"]) == len(counted["agent"]) + 1 == TICKS + 1
    for tick, tallies in zip(ticks, counted["volume"], strict=True):
        assert set(tallies) == {kind_of(m) for m in tick}
        for kind, tally in tallies.items():
            mine = [m for m in tick if kind_of(m) == kind]
            # an event's size is its payload; on the wire it is the HPUB frame the daemon sent
            sizes = {int(size): count for size, count in tally["sizes"].items()}
            assert sizes == Counter(len(m.data) for m in mine)
            assert tally["wire"] == sum(len(hpub_frame(m.subject, m.data)) for m in mine)
    assert {kind_of(m) for tick in ticks for m in tick} == {"cgroup", "fc_metrics", "agent"}


@pytest.mark.made_up_readings
@needs_nats
async def test_bytes_per_tick_and_the_event_size_percentiles_of_the_ticks_taken(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    out = tmp_path / "subscriber.json"
    ticks = await publish_and_count(nats_server, out)
    volume: list[dict[str, Any]] = json.loads(out.read_text())["volume"]
    for taken in ([1, 2], [0, 1, 2], [2]):
        figures = bytes_per_tick([volume[index] for index in taken], len(taken))
        assert figures["ticks"] == len(taken)
        mine = [m for index in taken for m in ticks[index]]
        assert figures["wire_bytes_per_tick"] == pytest.approx(
            sum(len(hpub_frame(m.subject, m.data)) for m in mine) / len(taken)
        )
        assert figures["payload_bytes_per_tick"] == pytest.approx(
            sum(len(m.data) for m in mine) / len(taken)
        )
        assert set(figures["by_kind"]) == {"cgroup", "fc_metrics", "agent"}
        for kind, kind_figures in figures["by_kind"].items():
            sizes = sorted(float(len(m.data)) for m in mine if kind_of(m) == kind)
            assert kind_figures["events_per_tick"] == pytest.approx(len(sizes) / len(taken))
            assert kind_figures["payload_bytes_per_tick"] == pytest.approx(sum(sizes) / len(taken))
            assert kind_figures["event_bytes_p50"] == percentile(sizes, 0.50)
            assert kind_figures["event_bytes_p99"] == percentile(sizes, 0.99)
