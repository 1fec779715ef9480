"""End to end: `cellos-probed run` as a process, a table in a namespace, a NATS subscriber."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from testbed.nft import (
    ECHO_PACKET_BYTES,
    CellRules,
    TableSpec,
    counter_figures,
    namespace_with_loopback,
    namespaces,
    nft_table,
    ping,
)
from testbed.taps import unique_name
from tests.conftest import NatsServer, needs_nats, needs_root
from tests.e2e import PREFIX, daemon_with_subscriber


@needs_root
@needs_nats
async def test_nftables_readings_arrive_on_their_subject(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    ns, rules = unique_name("nfe"), CellRules("cell-9")
    spec = TableSpec("inet", f"cellos{os.getpid()}", (rules,))

    def rx_packets(event: dict[str, Any]) -> int:
        packets: int = event["data"]["output"]["counters"][rules.rx]["packets"]
        return packets

    with namespace_with_loopback(ns) as path, nft_table(spec, ns):
        config = tmp_path / "cellos-probed.toml"
        config.write_text(
            '[daemon]\ntick_seconds = 0.2\nhost_id = "host-a"\n'
            f'[nats]\nservers = ["{nats_server.url}"]\n'
            '[[cell]]\nid = "cell-9"\nrun_id = "run-9"\nspec_signature_hash = "sha256:99"\n'
            f'netns = "{path}"\n[cell.nftables]\nfamily = "inet"\ntable = "{spec.name}"\n'
            f'counters = ["{rules.rx}"]\nchain = "{rules.chain}"\n'
        )
        stderr = tmp_path / "daemon.log"
        with trio.fail_after(30):
            async with daemon_with_subscriber(
                config, nats_server.url, f"{PREFIX}.nftables.host-a.cell-9", stderr
            ) as seen:
                events = seen.events
                await seen.wait_for(lambda: len(events) >= 1)
                await trio.to_thread.run_sync(ping, ns, 3)
                await seen.wait_for(lambda: rx_packets(events[-1]) == 6)
        reference = counter_figures("inet", spec.name, ns)
    assert seen.returncode == 0, stderr.read_text()
    headers = [message.headers for message in seen.messages]
    assert ns not in namespaces()

    first = events[0]
    assert first["type"] == f"{PREFIX}.nftables"
    assert headers[0] is not None
    assert headers[0]["Content-Type"] == "application/cloudevents+json"
    assert first["data"]["probeSource"] == "host.nftables"
    assert first["data"]["cellId"] == "cell-9"
    assert first["data"]["inputs"] == {
        "family": "inet",
        "table": spec.name,
        "counters": [rules.rx],
        "netns": str(path),
        "chain": rules.chain,
    }
    assert first["data"]["output"]["counters"] == {rules.rx: {"packets": 0, "bytes": 0}}
    assert first["data"]["output"]["deltas"] is None
    last = events[-1]["data"]["output"]
    assert last["counters"] == {rules.rx: reference[rules.rx]}
    assert reference[rules.rx] == {"packets": 6, "bytes": 6 * ECHO_PACKET_BYTES}
    assert [r["comment"] for r in last["rules"]] == ["echo requests", "echo replies", None, None]
    assert last["missing"] == []
    # the increases add up to the total, across however many ticks the pings spanned
    total = sum(e["data"]["output"]["deltas"]["counters"][rules.rx]["packets"] for e in events[1:])
    assert total == 6
    assert all(e["data"]["output"]["deltas"]["reset"] is False for e in events[1:])
    assert [e["cellosseq"] for e in events] == list(range(1, len(events) + 1))
