"""End to end: `cellos-probed run` as a process, a TAP in a namespace, a NATS subscriber."""

from __future__ import annotations

from pathlib import Path

import trio

from testbed.taps import attached_tap, link_details, network_namespace, tap_device, unique_name
from tests.conftest import NatsServer, needs_nats, needs_root
from tests.e2e import PREFIX, daemon_with_subscriber
from tests.test_tap_link import STATS_KEYS


@needs_root
@needs_nats
async def test_tap_link_readings_arrive_on_their_subject(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    ns, tap = unique_name("cle"), unique_name("tap")
    with network_namespace(ns) as path, tap_device(tap, ns):
        config = tmp_path / "cellos-probed.toml"
        config.write_text(
            '[daemon]\ntick_seconds = 0.2\nhost_id = "host-a"\n'
            f'[nats]\nservers = ["{nats_server.url}"]\n'
            '[[cell]]\nid = "cell-7"\nrun_id = "run-7"\nspec_signature_hash = "sha256:77"\n'
            f'netns = "{path}"\n[cell.tap_link]\ninterface = "{tap}"\n'
        )
        stderr = tmp_path / "daemon.log"
        with trio.fail_after(30):
            async with daemon_with_subscriber(
                config, nats_server.url, f"{PREFIX}.tap_link.host-a.cell-7", stderr
            ) as seen:
                events = seen.events
                await seen.wait_for(lambda: len(events) >= 1)
                with attached_tap(tap, ns):  # the VMM starts
                    await seen.wait_for(lambda: any(e["data"]["output"]["carrier"] for e in events))
        details = link_details(tap, ns)
    assert seen.returncode == 0, stderr.read_text()
    headers = [message.headers for message in seen.messages]

    first = events[0]
    assert first["type"] == f"{PREFIX}.tap_link"
    assert headers[0] is not None
    assert headers[0]["Content-Type"] == "application/cloudevents+json"
    assert first["data"]["probeSource"] == "host.tap_link"
    assert first["data"]["cellId"] == "cell-7"
    assert first["data"]["inputs"] == {"interface": tap, "netns": str(path)}
    assert first["data"]["output"] == {
        "ifindex": details["ifindex"],
        "operstate": "DOWN",
        "carrier": False,
        "carrier_changes": 1,
        "flags": ["UP", "BROADCAST", "MULTICAST"],
        "admin_up": True,
        "mtu": 1500,
        "address": details["address"],
        "transitions": [],
        "stats": dict.fromkeys(STATS_KEYS, 0),  # nothing passed without a carrier
        "deltas": None,
    }
    up = next(e for e in events if e["data"]["output"]["carrier"])
    assert up["data"]["output"]["transitions"] == [
        {
            "at": up["data"]["output"]["transitions"][0]["at"],
            "carrier": True,
            "operstate": "UP",
            "admin_up": True,
        }
    ]
    assert [e["cellosseq"] for e in events] == list(range(1, len(events) + 1))
