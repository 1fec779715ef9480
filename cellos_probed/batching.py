"""Many small blocking calls, a few worker-thread hops.

Every cell's cgroup read is a handful of tiny file reads (microseconds on
kernfs), but a worker-thread hop costs 100-200 us of CPU and lock hand-offs;
so a tick's calls run in chunks of ``chunk_size``, a few chunks in parallel
under the limiter, each call with its own outcome. Callers in one chunk share
its thread, so do not batch calls that can hang (kernfs reads do not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import outcome
import trio

T = TypeVar("T")


@dataclass(eq=False, slots=True)
class _Request(Generic[T]):
    fn: Callable[..., T]
    args: tuple[Any, ...]
    result: outcome.Outcome[T] | None = None


class ThreadBatcher:
    def __init__(self, limiter: trio.CapacityLimiter, *, chunk_size: int = 128) -> None:
        self._limiter = limiter
        self._chunk_size = chunk_size
        self.hops = 0  # worker-thread hops made: what batching saves

    async def run_many(
        self,
        fn: Callable[..., T],
        calls: list[tuple[Any, ...]],
        into: list[outcome.Outcome[T] | None],
    ) -> None:
        """``fn(*args)`` for every ``args`` of ``calls``, in chunks, a few in parallel.

        ``into[i]`` gets the outcome of ``calls[i]`` as soon as its chunk is
        done, so a caller cancelled part-way keeps what was finished.
        """
        requests: list[_Request[T]] = [_Request(fn, args) for args in calls]

        async def chunk(start: int) -> None:
            part = requests[start : start + self._chunk_size]
            try:
                await self._run_chunk(part)
            finally:
                for offset, request in enumerate(part):
                    into[start + offset] = request.result

        async with trio.open_nursery() as nursery:
            for start in range(0, len(requests), self._chunk_size):
                nursery.start_soon(chunk, start)

    async def _run_chunk(self, chunk: list[_Request[Any]]) -> None:
        self.hops += 1
        results = await trio.to_thread.run_sync(_run_all, chunk, limiter=self._limiter)
        for request, result in zip(chunk, results, strict=True):
            request.result = result


def _run_all(chunk: list[_Request[Any]]) -> list[outcome.Outcome[Any]]:
    return [outcome.capture(request.fn, *request.args) for request in chunk]
