"""The benchmark's subscriber: counts what a consumer receives and checks completeness.

Usage: python bench/subscriber.py URL PREFIX OUT.json
Runs until SIGTERM/SIGINT, then counts what the server had sent until then and writes
{received, first_at, last_at, agent, completeness, volume}.

``volume`` holds every message's size by tick and by kind, the subject's token after
the prefix (``<prefix>.<kind>.<host>[.<cell>]``): a list, one entry per ``agent`` event
(``volume[i]`` ends with ``agent[i]``) and one for what came after the last,
``[{kind: {"wire": bytes, "sizes": {payload bytes: count}}}, ...]``. The daemon sends
its agent event after its tick's readings on the same connection, so with one daemon
process an entry is one tick. A message's size is its payload (the CloudEvent's JSON);
``wire`` sums :func:`wire_size`.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellos_probed.nats_bridge import open_subscription
from cellos_probed.verify import Completeness

#: a header block's own framing: its status line before the headers, a blank line after
HEADER_BLOCK_FRAMING = len(b"NATS/1.0\r\n\r\n")


def wire_size(subject: str, headers: dict[str, str], payload: int) -> int:
    """A message's bytes as the daemon sends it, rebuilt from what arrived: its HPUB
    frame (``HPUB <subject> <header bytes> <total bytes>\\r\\n``, the header block,
    the payload, ``\\r\\n``; ``nats_bridge.hpub_frame``). What the server forwards
    differs only by the subscription id; TCP/IP and the flushes' PINGs are not counted.
    """
    # each header a "Key: value\r\n" line; subjects and headers are ASCII
    header = HEADER_BLOCK_FRAMING + sum(len(key) + len(value) + 4 for key, value in headers.items())
    total = header + payload
    return len(f"HPUB {subject} {header} {total}\r\n") + total + 2


@dataclass(slots=True)
class Tally:
    """One kind's messages in one tick."""

    wire: int = 0
    #: payload bytes -> messages: a histogram keeps memory flat in a long soak
    sizes: Counter[int] = field(default_factory=Counter)


async def main(url: str, prefix: str, out: Path) -> None:
    completeness = Completeness(from_start=True)
    received = 0
    first_at = last_at = 0.0
    agent: list[dict[str, Any]] = []
    #: "probe/kind" -> count: which probe failed, and how
    errors: dict[str, int] = {}
    #: "probe/kind" -> {tick (the cell's sequence): count}: a burst, or all along?
    error_ticks: dict[str, dict[int, int]] = {}
    volume: list[dict[str, Tally]] = [{}]
    kind_at = len(prefix) + 1
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    stop.set()

            nursery.start_soon(stop_on_signal)
            # stopped, the subscription still delivers what the server had sent
            # until then: a message published before the stop is counted
            async with open_subscription([url], f"{prefix}.>", stop=stop) as messages:
                await trio.Path(str(out) + ".ready").write_text("ready")
                async for message in messages:
                    event = orjson.loads(message.data)
                    now = time.monotonic()
                    # sizes and kind from the message itself, nothing parsed for them
                    size = len(message.data)
                    kind = message.subject[kind_at:].partition(".")[0]
                    tally = volume[-1].get(kind)
                    if tally is None:
                        tally = volume[-1][kind] = Tally()
                    tally.wire += wire_size(message.subject, message.headers, size)
                    tally.sizes[size] += 1
                    if event["type"].endswith(".agent"):
                        agent.append(event["data"])
                        volume.append({})  # the tick's last message: the next tick's come
                        continue
                    received += 1
                    first_at = first_at or now
                    last_at = now
                    completeness.add(event)
                    if event["type"].endswith(".probe_error"):
                        key = f"{event['data']['probeSource']}/{event['data']['error']['kind']}"
                        errors[key] = errors.get(key, 0) + 1
                        # which ticks: a cell's sequence counts its ticks from 1
                        sequence = event["cellosseq"]
                        seen = error_ticks.setdefault(key, {})
                        seen[sequence] = seen.get(sequence, 0) + 1
            nursery.cancel_scope.cancel()
    rows = completeness.rows()
    await trio.Path(out).write_text(
        json.dumps(
            {
                "received": received,
                "first_at": first_at,
                "last_at": last_at,
                "agent": agent,
                "probe_errors": errors,
                "probe_error_ticks": {
                    key: {str(tick): count for tick, count in sorted(ticks.items())}
                    for key, ticks in error_ticks.items()
                },
                "duplicates": sum(len(row.duplicates) for row in rows),
                "holes": sum(len(row.holes) for row in rows),
                "undeclared": sum(len(row.undeclared) for row in rows),
                "streams": len(rows),
                "volume": [
                    {
                        kind: {"wire": tally.wire, "sizes": dict(tally.sizes)}
                        for kind, tally in kinds.items()
                    }
                    for kinds in volume
                ],
            }
        )
    )


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], Path(sys.argv[3]))
