"""Many small blocking calls, one worker-thread hop.

Every cell's cgroup read is a handful of tiny file reads (microseconds on
kernfs), but a trio worker-thread hop costs 100-200 us of CPU and GIL
hand-offs. At a thousand cells a hop per cell per tick was most of the
daemon's CPU, so the calls made in one scheduler pass are gathered and run
together: in chunks of ``chunk_size``, a few chunks in parallel under the
limiter. Each caller still gets its own result (or error), once every chunk
of its batch is done, and may be cancelled on its own; a cancelled caller's
result is simply dropped.

The trade-off: callers in one chunk share its thread, so a call that blocks
delays its chunk-mates. That is acceptable for kernfs reads, which do not
block; do not batch calls that can hang.
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
    #: set when the request's chunk is done (one event per chunk, not per request)
    done: trio.Event
    result: outcome.Outcome[T] | None = None


class ThreadBatcher:
    def __init__(self, limiter: trio.CapacityLimiter, *, chunk_size: int = 128) -> None:
        self._limiter = limiter
        self._chunk_size = chunk_size
        self._pending: list[_Request[Any]] = []
        self._flusher_scheduled = False
        self._done = trio.Event()
        self.hops = 0  # worker-thread hops made: what batching saves

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._flusher_scheduled:
            self._flusher_scheduled = True
            self._done = trio.Event()
            # a system task: it must finish even if the first caller is cancelled
            trio.lowlevel.spawn_system_task(self._flush, self._done)
        request: _Request[T] = _Request(fn, args, self._done)
        self._pending.append(request)
        await request.done.wait()
        assert request.result is not None
        return request.result.unwrap()

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
        requests: list[_Request[T]] = [_Request(fn, args, self._done) for args in calls]

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

    async def _flush(self, done: trio.Event) -> None:
        # let every task that is runnable now reach run() first: a tick starts
        # all its probes in one scheduler pass
        await trio.lowlevel.checkpoint()
        batch, self._pending = self._pending, []
        self._flusher_scheduled = False
        try:
            async with trio.open_nursery() as nursery:
                for start in range(0, len(batch), self._chunk_size):
                    nursery.start_soon(self._run_chunk, batch[start : start + self._chunk_size])
        finally:
            done.set()

    async def _run_chunk(self, chunk: list[_Request[Any]]) -> None:
        self.hops += 1
        results = await trio.to_thread.run_sync(_run_all, chunk, limiter=self._limiter)
        for request, result in zip(chunk, results, strict=True):
            request.result = result


def _run_all(chunk: list[_Request[Any]]) -> list[outcome.Outcome[Any]]:
    return [outcome.capture(request.fn, *request.args) for request in chunk]
