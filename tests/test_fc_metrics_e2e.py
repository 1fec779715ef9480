"""End to end: `cellos-probed run` as a process, emulated VMs with their own timer, NATS."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from testbed.fc_emulator import jail_paths, open_emulator
from tests.conftest import NatsServer, needs_nats
from tests.e2e import PREFIX, daemon_with_subscriber
from tests.fc_helpers import published, short_root


@pytest.fixture
def fc_root() -> Iterator[Path]:
    yield from short_root()


@needs_nats
async def test_fc_metrics_readings_arrive_on_their_subject_and_add_up(
    fc_root: Path, tmp_path: Path, nats_server: NatsServer
) -> None:
    api, metrics = jail_paths(fc_root, "cell-9")
    config = tmp_path / "cellos-probed.toml"
    config.write_text(
        '[daemon]\ntick_seconds = 0.3\nhost_id = "host-a"\n'
        f'[nats]\nservers = ["{nats_server.url}"]\n'
        f'[paths]\njail_root = "{fc_root}"\n'
        '[[cell]]\nid = "cell-9"\nrun_id = "run-9"\nspec_signature_hash = "sha256:99"\n'
        f'[cell.fc_metrics]\napi_socket = "{api}"\nmetrics_path = "{metrics}"\n'
    )
    stderr = tmp_path / "daemon.log"
    rng = random.Random(11)
    with trio.fail_after(30):
        async with open_emulator(fc_root) as emulator, trio.open_nursery() as nursery:
            # Firecracker's own timer, much faster than its 60 s, interleaves with the ticks
            vm = await emulator.add(emulator.spec("cell-9", flush_interval=0.07))
            vm.keep_history = True

            async def activity() -> None:
                while True:
                    vm.metrics.bump_everything(rng)
                    await trio.sleep(0.05)  # guest activity, not synchronisation

            nursery.start_soon(activity)
            async with daemon_with_subscriber(
                config, nats_server.url, f"{PREFIX}.fc_metrics.host-a.cell-9", stderr
            ) as seen:
                events = seen.events
                await seen.wait_for(lambda: len(events) >= 8)
            nursery.cancel_scope.cancel()
    returncode = seen.returncode
    headers = [message.headers for message in seen.messages]
    final = events[-1]["data"]["output"]
    periodic = sum(why == "periodic" for why, _ in vm.flushes)
    assert returncode == 0, stderr.read_text()
    first = events[0]
    assert first["type"] == f"{PREFIX}.fc_metrics"
    assert headers[0] is not None
    assert headers[0]["Content-Type"] == "application/cloudevents+json"
    assert first["data"]["probeSource"] == "host.fc_metrics"
    assert first["data"]["inputs"] == {"api_socket": str(api), "metrics_path": str(metrics)}
    assert first["data"]["output"]["instance"] == {
        "id": "cell-9",
        "state": "Running",
        "vmm_version": "1.16.1",
    }
    assert periodic > len(events)  # the VMM's own flushes did interleave
    # every reading's totals: exactly what the lines written up to its flush carried
    for event in events:
        output = event["data"]["output"]
        assert output["totals"] == published(vm.history[output["utc_timestamp_ms"]])
    assert final["lines"] >= 1
    assert all(e["data"]["output"]["torn_lines"] == 0 for e in events)
