"""End to end: `cellos-probed run` as a process, a real nats-server, a subscriber."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import trio

from cellos_probed.nats_bridge import open_subscription
from cellos_probed.probes.cgroup_parse import parse_flat_keyed
from testbed.cgroup_tree import FakeCgroup
from tests.conftest import NatsServer, needs_nats
from tests.e2e import PREFIX, Collector

RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def write_config(tmp_path: Path, server: NatsServer, cgroup_root: Path) -> Path:
    cells = ""
    for cell in ("cell-a", "cell-b", "cell-c"):
        cells += (
            f'[[cell]]\nid = "{cell}"\nrun_id = "run-{cell}"\n'
            f'spec_signature_hash = "sha256:{cell}"\n'
            f'[cell.cgroup]\npath = "firecracker/{cell}"\n\n'
        )
    path = tmp_path / "cellos-probed.toml"
    path.write_text(
        f'[daemon]\ntick_seconds = 0.25\nprobe_timeout_seconds = 0.2\nhost_id = "host-a"\n'
        f'[paths]\ncgroup_root = "{cgroup_root}"\n'
        f'[nats]\nservers = ["{server.url}"]\n\n{cells}'
    )
    return path


@needs_nats
async def test_daemon_publishes_cloudevents_to_nats(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    root = tmp_path / "cgroup"
    cell_a = FakeCgroup(root / "firecracker" / "cell-a")
    cell_b = FakeCgroup(root / "firecracker" / "cell-b")
    cell_a.cpu_stat["usage_usec"] = 5000
    cell_b.memory_events["max"] = 9
    cell_b.cpu_stat["usage_usec"] = 777
    cell_a.write()
    cell_b.write()  # cell-c's directory never exists
    config = write_config(tmp_path, nats_server, root)
    stderr = tmp_path / "daemon.log"
    collector = Collector()

    with trio.fail_after(30):
        async with (
            open_subscription([nats_server.url], f"{PREFIX}.>") as messages,
            trio.open_nursery() as nursery,
        ):

            async def collect() -> None:
                async for message in messages:
                    collector.add(message)

            nursery.start_soon(collect)
            with stderr.open("wb") as log:
                daemon = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "cellos_probed", "run", "--config", str(config)],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            try:
                # two readings of cell-a, then a counter changes between ticks
                await collector.wait_for(lambda: len(collector.of("cell-a", ".cgroup")) >= 2)
                cell_a.memory_events["oom"] += 1
                cell_a.memory_events["oom_kill"] += 1
                cell_a.cpu_stat["usage_usec"] += 1500
                cell_a.write()
                await collector.wait_for(
                    lambda: any(
                        (e["data"]["output"]["deltas"] or {}).get("memory_events", {}).get("oom")
                        for e in collector.of("cell-a", ".cgroup")
                    )
                )
                await collector.wait_for(lambda: len(collector.of("cell-c", ".probe_error")) >= 4)
            finally:
                daemon.send_signal(signal.SIGTERM)
                with trio.fail_after(5):
                    returncode = await daemon.wait()
            assert returncode == 0, stderr.read_text()
            # everything it read before stopping was published
            stopped = [
                line
                for line in map(json.loads, stderr.read_text().splitlines())
                if line.get("event") == "stopped"
            ]
            assert len(stopped) == 1
            assert stopped[0]["drained"] is True
            produced = stopped[0]["readings"] + stopped[0]["probe_errors"]
            with trio.fail_after(5):
                await collector.wait_for(lambda: len(collector.events) >= produced)
            nursery.cancel_scope.cancel()

    events = collector.events
    assert len(events) == produced
    boots = {e["cellosagentboot"] for e in events}
    assert len(boots) == 1
    uuid.UUID(boots.pop())
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids)

    for message, event in zip(collector.messages, events, strict=True):
        # structured mode: the header tells a NATS >= 2.2 receiver so
        assert message.headers.get("Content-Type") == "application/cloudevents+json"
        kind = event["type"].rsplit(".", 1)[-1]
        cell = event["data"]["cellId"]
        assert message.subject == f"{PREFIX}.{kind}.host-a.{cell}"
        expected_keys = {"specversion", "id", "source", "type", "datacontenttype", "time",
                         "subject", "dataschema", "cellosseq", "cellosagentboot",
                         "data"}  # fmt: skip
        assert set(event) == expected_keys
        assert event["specversion"] == "1.0"
        assert uuid.UUID(event["id"].removeprefix("urn:cellos:event:")).version == 4
        assert event["source"] == "cellos-host-telemetry/probes"
        assert event["datacontenttype"] == "application/json"
        assert RFC3339_MS.fullmatch(event["time"])
        assert event["subject"] == cell
        assert event["dataschema"] == f"urn:cellos:schema:host.v1.{kind}:1"
        assert type(event["cellosseq"]) is int  # a CloudEvents Integer: a JSON number
        data = event["data"]
        assert data["hostId"] == "host-a"
        assert data["hostReceivedAt"] == event["time"]
        assert data["runId"] == f"run-{cell}"
        assert data["specSignatureHash"] == f"sha256:{cell}"
        assert data["probeSource"] == "host.cgroup"
        assert data["inputs"]["cgroup_path"] == f"firecracker/{cell}"
        if cell == "cell-c":
            assert kind == "probe_error"
            assert data["error"] == {
                "kind": "io",
                "message": "cgroup directory does not exist: firecracker/cell-c",
            }
        else:
            assert kind == "cgroup"

    # per cell and probe, the sequence counts up by one from 1
    sequences: dict[str, list[int]] = defaultdict(list)
    for event in events:
        sequences[event["data"]["cellId"]].append(event["cellosseq"])
    for cell, seen in sequences.items():
        assert seen == list(range(1, len(seen) + 1)), cell
    # the failing cell did not slow the others: every cell got (about) the same ticks
    counts = [len(sequences[cell]) for cell in ("cell-a", "cell-b", "cell-c")]
    assert max(counts) - min(counts) <= 1, counts

    # the values are the files'
    last_b = collector.of("cell-b", ".cgroup")[-1]["data"]["output"]
    files = root / "firecracker" / "cell-b"
    assert last_b["memory_events"] == parse_flat_keyed(
        (files / "memory.events").read_text(), "memory.events"
    )
    assert last_b["cpu_stat"] == parse_flat_keyed((files / "cpu.stat").read_text(), "cpu.stat")
    assert last_b["memory_current"] == cell_b.memory_current
    assert last_b["pids_current"] == cell_b.pids_current
    assert last_b["missing"] == []

    readings_a = [e["data"]["output"] for e in collector.of("cell-a", ".cgroup")]
    assert readings_a[0]["deltas"] is None
    changed = [r for r in readings_a if r["deltas"] and r["deltas"]["memory_events"]["oom"]]
    assert len(changed) == 1  # counted once, in the reading after the change
    assert changed[0]["deltas"]["memory_events"]["oom_kill"] == 1
    assert changed[0]["deltas"]["cpu_stat"]["usage_usec"] == 1500
    assert changed[0]["deltas"]["reset"] is False
    assert changed[0]["memory_events"]["oom"] == 1
