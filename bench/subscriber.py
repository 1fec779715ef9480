"""The benchmark's subscriber: counts what a consumer receives and checks completeness.

Usage: python bench/subscriber.py URL PREFIX OUT.json
Runs until SIGTERM/SIGINT, then writes {received, first_at, last_at, agent, completeness}.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellos_probed.nats_bridge import open_subscription
from cellos_probed.verify import Completeness


async def main(url: str, prefix: str, out: Path) -> None:
    completeness = Completeness(from_start=True)
    received = 0
    first_at = last_at = 0.0
    agent: list[dict[str, Any]] = []
    #: "probe/kind" -> count: which probe failed, and how
    errors: dict[str, int] = {}
    #: "probe/kind" -> {tick (the cell's sequence): count}: a burst, or all along?
    error_ticks: dict[str, dict[int, int]] = {}
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            async with open_subscription([url], f"{prefix}.>") as messages:
                await trio.Path(str(out) + ".ready").write_text("ready")
                async for message in messages:
                    event = orjson.loads(message.data)
                    now = time.monotonic()
                    if event["type"].endswith(".agent"):
                        agent.append(event["data"])
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
            }
        )
    )


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], Path(sys.argv[3]))
