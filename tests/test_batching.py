"""ThreadBatcher: one worker-thread hop for many small calls, results per caller."""

from __future__ import annotations

import threading

import pytest
import trio

from cellos_probed.batching import ThreadBatcher


def square(n: int) -> tuple[int, str]:
    if n == 13:
        raise ValueError("unlucky")
    return n * n, threading.current_thread().name


async def test_calls_of_one_pass_share_a_few_hops_and_get_their_own_results() -> None:
    batcher = ThreadBatcher(trio.CapacityLimiter(2), chunk_size=64)
    results: dict[int, object] = {}

    async def call(n: int) -> None:
        try:
            results[n] = (await batcher.run(square, n))[0]
        except ValueError as error:
            results[n] = str(error)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(call, n)
    assert batcher.hops == 4  # ceil(200 / 64), not 200
    assert results[13] == "unlucky"
    assert all(results[n] == n * n for n in range(200) if n != 13)
    # a later pass is a new batch
    assert (await batcher.run(square, 3))[0] == 9
    assert batcher.hops == 5


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    batcher = ThreadBatcher(trio.CapacityLimiter(1), chunk_size=8)
    release = threading.Event()

    def slow(n: int) -> int:
        release.wait(5)
        return n

    got: list[int] = []

    async def patient(n: int) -> None:
        got.append(await batcher.run(slow, n))

    async def impatient() -> None:
        with trio.move_on_after(0.05):
            await batcher.run(slow, 99)
        release.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(patient, n)
            nursery.start_soon(impatient)
    assert sorted(got) == [0, 1, 2]


async def test_errors_reach_their_caller_only() -> None:
    batcher = ThreadBatcher(trio.CapacityLimiter(1))
    with pytest.raises(ValueError, match="unlucky"):
        await batcher.run(square, 13)
