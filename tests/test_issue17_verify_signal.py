"""`tail --verify` ended by Ctrl-C or SIGTERM: the report of what arrived, as at --duration."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import nats
import orjson
import pytest
import trio

from tests.conftest import NatsServer, needs_nats

T = "dev.cellos.events.cell.observability.host.v1"


def reading(seq: int) -> dict[str, object]:
    return {"type": f"{T}.cgroup", "cellosseq": seq, "cellosagentboot": "b1",
            "data": {"cellId": "a", "hostId": "h", "probeSource": "host.cgroup"}}  # fmt: skip


async def publish(url: str, events: list[dict[str, object]]) -> None:
    """Publish from an asyncio client, flushed: on return the server has routed every event."""

    async def send() -> None:
        client = await nats.connect(url)
        for event in events:
            await client.publish(f"{T}.cgroup.a", orjson.dumps(event))
        await client.flush()
        await client.close()

    await trio.to_thread.run_sync(asyncio.run, send())


@needs_nats
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(
    ("sequences", "exit_code", "verdict"),
    [((1, 2, 3), 0, "OK: every missing reading was declared"),
     ((1, 2, 4), 1, "FAIL: undeclared holes")],
    ids=["complete", "hole"],
)  # fmt: skip
async def test_a_signal_before_the_duration_ends_prints_the_report(
    nats_server: NatsServer,
    stop: signal.Signals,
    sequences: tuple[int, ...],
    exit_code: int,
    verdict: str,
) -> None:
    with trio.fail_after(30):
        tail = await trio.lowlevel.open_process(
            [sys.executable, "-m", "cellos_probed", "tail", "--server", nats_server.url,
             "--prefix", T, "--verify", "--duration", "600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert tail.stdout is not None
            assert tail.stderr is not None
            banner = b""
            while b"# verify" not in banner:  # subscribed: from here nothing is missed
                chunk = await tail.stderr.receive_some()
                assert chunk, f"tail ended before subscribing: {banner.decode()}"
                banner += chunk
            await publish(nats_server.url, [reading(seq) for seq in sequences])
            tail.send_signal(stop)
            output = b""
            while chunk := await tail.stdout.receive_some():
                output += chunk
            assert await tail.wait() == exit_code
        finally:
            if tail.returncode is None:  # the test failed: no tail is left behind
                tail.kill()
                await tail.wait()
    lines = output.decode().splitlines()
    assert lines[-1] == verdict
    (row,) = [line.split() for line in lines if line.startswith("b1 ")]
    assert row[1:5] == ["h", "a", "host.cgroup", "3"]  # host, cell, probe, received
    assert row[5] == f"1..{sequences[-1]}"
    assert ("    undeclared holes: 3" in lines) == bool(exit_code)
