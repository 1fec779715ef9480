"""`tail --verify`: every sequence accounted for, and agent events."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import trio

from cellos_probed.config import load_config
from cellos_probed.daemon import DaemonHandle, run_daemon
from cellos_probed.nats_bridge import open_subscription
from cellos_probed.verify import Completeness
from tests.conftest import NatsServer, needs_nats
from tests.test_daemon import RunnableSink, write_config
from tests.test_delivery import PREFIX
from tests.test_delivery import write_config as write_delivery_config

T = "dev.cellos.events.cell.observability.host.v1"


def reading(seq: int, cell: str = "a", boot: str = "b1", host: str = "h") -> dict[str, object]:
    return {"type": f"{T}.cgroup", "cellosseq": seq, "cellosagentboot": boot,
            "data": {"cellId": cell, "hostId": host, "probeSource": "host.cgroup"}}  # fmt: skip


def gap(first: int, last: int, cell: str = "a", boot: str = "b1") -> dict[str, object]:
    return {"type": f"{T}.gap", "cellosagentboot": boot,
            "data": {"cellId": cell, "hostId": "h", "probeSource": "host.cgroup",
                     "firstSequence": first,
                     "lastSequence": last, "dropped": last - first + 1}}  # fmt: skip


def test_holes_duplicates_and_declarations() -> None:
    check = Completeness(from_start=True)
    for seq in (1, 2, 2, 5, 6, 9):
        check.add(reading(seq))
    check.add(gap(3, 4))
    (row,) = check.rows()
    assert row.received == 6
    assert row.duplicates == [2]
    assert row.holes == [3, 4, 7, 8]
    assert row.declared == [3, 4]
    assert row.undeclared == [7, 8]
    assert not check.ok
    text = check.render()
    assert "undeclared holes: 7..8" in text
    assert text.endswith("FAIL: undeclared holes")
    check.add(gap(7, 8))
    assert check.ok
    assert check.render().endswith("OK: every missing reading was declared")


def test_a_live_subscription_starts_where_it_joined_and_boots_are_separate() -> None:
    check = Completeness(from_start=False)
    for seq in (41, 42, 43):
        check.add(reading(seq))
    for seq in (1, 2):
        check.add(reading(seq, boot="b2"))
    rows = {row.key[0]: row for row in check.rows()}
    assert rows["b1"].holes == []  # 1..40 came before we subscribed
    assert rows["b1"].first == 41
    assert rows["b2"].last == 2
    assert check.ok


def test_hosts_are_accounted_apart_even_with_one_cell_id_and_boot() -> None:
    # cell ids are unique per host only: host h2's reading 2 does not fill h1's hole
    check = Completeness(from_start=True)
    for event in (reading(1, host="h1"), reading(3, host="h1"), reading(2, host="h2")):
        check.add(event)
    rows = {row.key[1]: row for row in check.rows()}
    assert rows["h1"].undeclared == [2]
    assert rows["h2"].undeclared == [1]
    assert not check.ok
    # a sequence sent as a string (0.1.0's `sequence`) is not a cellosseq
    legacy = Completeness()
    legacy.add({"type": f"{T}.cgroup", "sequence": "1", "data": {"cellId": "a"}})
    assert legacy.rows() == []
    assert legacy.other == 1


def test_a_probe_filter_keeps_that_probes_errors_and_gaps_in_its_count() -> None:
    # readings 1, 3 and the probe_error 2 of cgroup; a tap_link reading is not counted
    check = Completeness(from_start=True, probe="cgroup")
    error = {**reading(2), "type": f"{T}.probe_error"}
    tap = {**reading(1), "data": {"cellId": "a", "hostId": "h", "probeSource": "host.tap_link"}}
    for event in (reading(1), error, reading(3), tap, gap(4, 5)):
        check.add(event)
    (row,) = check.rows()
    assert row.key[3] == "host.cgroup"
    assert (row.received, row.holes, row.declared) == (3, [4, 5], [4, 5])
    assert check.ok


async def test_agent_events_carry_the_daemons_figures(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", tmp_path, ["gone"])
    path.write_text(
        path.read_text().replace("[daemon]\n", "[daemon]\nagent_event_every_ticks = 3\n")
    )
    sink = RunnableSink()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            handle: DaemonHandle = await nursery.start(
                lambda task_status: run_daemon(
                    load_config(path), sink, handle_signals=False, task_status=task_status
                )
            )
            while sum(e.kind == "agent" for e in sink.events) < 2:
                await sink.changed.wait()
            handle.stop()
    agents = [e for e in sink.events if e.kind == "agent"]
    first = agents[0]
    assert first.type == f"{T}.agent"
    assert first.nats_subject(T) == f"{T}.agent.host-a"
    assert first.subject == "host-a"
    assert first.cellosseq is None
    assert first.data["hostId"] == "host-a"
    assert first.data["ticks"] == 3
    assert first.data["probeErrors"] == 3  # the cell's cgroup does not exist
    assert first.data["probeErrorsByKind"] == {"io": 3}
    assert first.data["readingsProduced"] == 0
    assert set(first.data["tickDurationMs"]) == {"p50", "p99", "max"}
    assert agents[1].data["ticks"] == 6


@needs_nats
async def test_tail_verify_against_a_running_daemon(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    config = write_delivery_config(tmp_path, [nats_server.url], tick=0.05)
    daemon = await trio.lowlevel.open_process(
        [sys.executable, "-m", "cellos_probed", "run", "--config", str(config)],
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(30):
            async with open_subscription([nats_server.url], f"{PREFIX}.>") as messages:
                # the daemon is publishing before the tail starts (a loaded machine
                # can take longer than the tail's 1.5 s to start it)
                await messages.receive()
            result = await trio.run_process(
                [sys.executable, "-m", "cellos_probed", "tail", "--config", str(config),
                 "--verify", "--duration", "1.5"],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
    finally:
        if daemon.returncode is None:  # the test failed: no daemon is left behind
            daemon.kill()
            await daemon.wait()
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert out.strip().endswith("OK: every missing reading was declared")
    assert " a " in out
    assert " b " in out
