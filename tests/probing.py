"""Probes driven as the daemon drives them, for probe tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from cellos_probed.config import Config
from cellos_probed.daemon import Prober
from cellos_probed.events import SequenceRegistry
from cellos_probed.probes.base import HostProbe
from cellos_probed.readings import ProbeContext, ProbeError, ProbeReading, ProbeResult
from cellos_probed.sinks import CapturingSink


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Prober]:
    """A prober with its services and background tasks up; ticks are the test's to call."""
    async with trio.open_nursery() as nursery:
        prober = Prober(config, CapturingSink(), SequenceRegistry())
        await nursery.start(prober.run_services)
        try:
            yield prober
        finally:
            nursery.cancel_scope.cancel()


async def read_one(probe: HostProbe, ctx: ProbeContext) -> ProbeReading:
    """One probe's reading through its batch read, the daemon's only read path;
    its error raised."""
    results: list[ProbeResult | None] = [None]
    await type(probe).read_batch([(ctx, probe)], results)
    result = results[0]
    if isinstance(result, ProbeError):
        raise result
    assert result is not None, "read_batch left the slot empty"
    return result
