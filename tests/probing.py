"""An in-process prober for probe tests: services up, ticks called by the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from cellos_probed.config import Config
from cellos_probed.daemon import Prober
from cellos_probed.probes import CapturingSink, EventStamper


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Prober]:
    """A prober with its services and background tasks up; ticks are the test's to call."""
    async with trio.open_nursery() as nursery:
        prober = Prober(config, CapturingSink(), EventStamper())
        await nursery.start(prober.run_services)
        try:
            yield prober
        finally:
            nursery.cancel_scope.cancel()
