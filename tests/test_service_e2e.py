"""The daemon as a process: reload by SIGHUP through NATS, bounded and forced stops."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio

from cellos_probed.nats_bridge import open_subscription
from testbed.cgroup_tree import FakeCgroup
from tests.conftest import NatsServer, needs_nats, poll_until
from tests.e2e import PREFIX, Collector


def config_text(root: Path, servers: list[str], cells: list[str], drain: float = 5.0) -> str:
    text = (
        f"[daemon]\ntick_seconds = 0.2\ndrain_timeout_seconds = {drain}\n"
        f'[paths]\ncgroup_root = "{root}"\n[nats]\nservers = {json.dumps(servers)}\n'
    )
    for cell in cells:
        text += (
            f'[[cell]]\nid = "{cell}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
            f'[cell.cgroup]\npath = "{cell}"\n'
        )
    return text


async def start_daemon(config: Path, log: Path) -> trio.Process:
    with log.open("wb") as stderr:
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "cellos_probed", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def log_events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@needs_nats
async def test_sighup_adds_removes_and_refuses_broken_configs(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    for cell in ("a", "b", "c"):
        FakeCgroup(tmp_path / cell).write()
    config = tmp_path / "c.toml"
    config.write_text(config_text(tmp_path, [nats_server.url], ["a", "b"]))
    log = tmp_path / "daemon.log"
    collector = Collector()
    count = collector.of
    with trio.fail_after(40):
        async with (
            open_subscription([nats_server.url], f"{PREFIX}.>") as messages,
            trio.open_nursery() as nursery,
        ):

            async def collect() -> None:
                async for message in messages:
                    collector.add(message)

            nursery.start_soon(collect)
            daemon = await start_daemon(config, log)
            try:
                await collector.wait_for(lambda: len(count("b", ".cgroup")) >= 3)
                config.write_text(config_text(tmp_path, [nats_server.url], ["a", "c"]))
                daemon.send_signal(signal.SIGHUP)
                await collector.wait_for(lambda: len(count("c", ".cgroup")) >= 3)
                b_after_reload = len(count("b", ".cgroup"))
                a_before_broken = len(count("a", ".cgroup"))
                config.write_text("[daemon]\ntick_seconds = 'often'\n")
                daemon.send_signal(signal.SIGHUP)
                await collector.wait_for(lambda: len(count("a", ".cgroup")) >= a_before_broken + 5)
                assert len(count("b", ".cgroup")) == b_after_reload  # b stopped
                assert len(count("c", ".cgroup")) >= 5  # c kept going
            finally:
                daemon.send_signal(signal.SIGTERM)
                with trio.fail_after(5):
                    assert await daemon.wait() == 0
            nursery.cancel_scope.cancel()

    sequences: dict[str, list[int]] = defaultdict(list)
    for event in collector.events:
        sequences[event["data"]["cellId"]].append(event["cellosseq"])
    for cell, seen in sequences.items():
        assert seen == list(range(1, len(seen) + 1)), cell  # a never restarted its count
    assert len({e["cellosagentboot"] for e in collector.events}) == 1
    entries = log_events(log)
    reloaded = [e for e in entries if e.get("event") == "reloaded"]
    assert reloaded[0]["added"] == ["c"]
    assert reloaded[0]["removed"] == ["b"]
    refused = [e for e in entries if e.get("event", "").startswith("reload refused")]
    assert len(refused) == 1
    assert "key 'daemon.tick_seconds': must be a number, not a string" in refused[0]["error"]


def holding(log: Path) -> bool:
    """The daemon is probing and holding events for a server that is away."""
    return any(e.get("event") == "cannot publish yet; holding events" for e in log_events(log))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nobody listens there once closed


async def test_stop_is_bounded_by_the_drain_timeout_when_nats_is_away(tmp_path: Path) -> None:
    FakeCgroup(tmp_path / "a").write()
    config = tmp_path / "c.toml"
    servers = [f"nats://127.0.0.1:{closed_port()}"]
    config.write_text(config_text(tmp_path, servers, ["a"], drain=1.0))
    log = tmp_path / "daemon.log"
    with trio.fail_after(20):
        daemon = await start_daemon(config, log)
        # wait until it is probing (its first warning says it holds events)
        await poll_until(lambda: holding(log))
        started = trio.current_time()
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait() == 0
        elapsed = trio.current_time() - started
    assert 0.9 <= elapsed < 4.0
    stopped = [e for e in log_events(log) if e.get("event") == "stopped"]
    assert stopped[0]["drained"] is False
    timed_out = [e for e in log_events(log) if e.get("event", "").startswith("drain timed out")]
    assert len(timed_out) == 1


async def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    FakeCgroup(tmp_path / "a").write()
    config = tmp_path / "c.toml"
    servers = [f"nats://127.0.0.1:{closed_port()}"]
    config.write_text(config_text(tmp_path, servers, ["a"], drain=60.0))
    log = tmp_path / "daemon.log"
    with trio.fail_after(20):
        daemon = await start_daemon(config, log)
        await poll_until(lambda: holding(log))
        daemon.send_signal(signal.SIGTERM)
        await poll_until(
            lambda: any(e.get("event", "").startswith("stopping:") for e in log_events(log))
        )
        started = trio.current_time()
        daemon.send_signal(signal.SIGINT)
        assert await daemon.wait() == 0
        assert trio.current_time() - started < 3.0  # not the 60 s drain
    forced = [e for e in log_events(log) if e.get("event") == "second stop request: stopping now"]
    assert len(forced) == 1
    assert forced[0]["unpublished"] >= 1
