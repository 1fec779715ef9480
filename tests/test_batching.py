"""ThreadBatcher: one worker-thread hop for many small calls, an outcome per call."""

from __future__ import annotations

import threading

import outcome
import pytest
import trio

from cellos_probed.batching import ThreadBatcher


def square(n: int) -> tuple[int, str]:
    if n == 13:
        raise ValueError("unlucky")
    return n * n, threading.current_thread().name


async def test_calls_share_a_few_hops_and_get_their_own_outcomes() -> None:
    batcher = ThreadBatcher(trio.CapacityLimiter(2), chunk_size=64)
    into: list[outcome.Outcome[tuple[int, str]] | None] = [None] * 200
    with trio.fail_after(10):
        await batcher.run_many(square, [(n,) for n in range(200)], into)
    assert batcher.hops == 4  # ceil(200 / 64), not 200
    error = into[13]
    assert isinstance(error, outcome.Error)
    with pytest.raises(ValueError, match="unlucky"):
        error.unwrap()
    values = [r.unwrap() for n, r in enumerate(into) if n != 13 and r is not None]
    assert [square for square, _ in values] == [n * n for n in range(200) if n != 13]
    # a chunk's calls ran on one thread
    assert len({thread for _, thread in values[64:127]}) == 1
