"""The end-to-end harness: `cellos-probed run` as a process and a NATS subscriber."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import trio

from cellos_probed.nats_bridge import ReceivedMessage, open_subscription

PREFIX = "dev.cellos.events.cell.observability.host.v1"


class Collector:
    """Every message on the subscription, decoded; waits are on arrivals, not sleeps."""

    def __init__(self) -> None:
        self.messages: list[ReceivedMessage] = []
        self.events: list[dict[str, Any]] = []
        self.agent_events: list[dict[str, Any]] = []
        self.returncode: int | None = None
        self._changed = trio.Event()

    def add(self, message: ReceivedMessage) -> None:
        event = orjson.loads(message.data)
        if event["type"].endswith(".agent"):  # the daemon's own figures, not a cell's
            self.agent_events.append(event)
        else:
            self.messages.append(message)
            self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    def of(self, cell: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["data"]["cellId"] == cell and e["type"].endswith(kind)]

    async def wait_for(self, condition: Callable[[], Any]) -> None:
        while not condition():
            await self._changed.wait()


@asynccontextmanager
async def daemon_with_subscriber(
    config: Path, server_url: str, subject: str, log: Path
) -> AsyncIterator[Collector]:
    """The daemon runs while the block does; SIGTERM at its end (``returncode`` is kept)."""
    collector = Collector()
    async with (
        open_subscription([server_url], subject) as messages,
        trio.open_nursery() as nursery,
    ):

        async def collect() -> None:
            async for message in messages:
                collector.add(message)

        nursery.start_soon(collect)
        with log.open("wb") as stderr:
            daemon = await trio.lowlevel.open_process(
                [sys.executable, "-m", "cellos_probed", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            yield collector
        finally:
            daemon.send_signal(signal.SIGTERM)
            with trio.fail_after(5):
                collector.returncode = await daemon.wait()
            nursery.cancel_scope.cancel()
