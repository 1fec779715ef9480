"""The shared query's single-flight rules, with a stand-in for the namespace threads.

No root needed: the stand-in answers ``run`` when the test releases it, so
the tests control exactly when a query lands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio

from cellos_probed.probes import ProbeIoError, ProbeTimeoutError
from cellos_probed.probes.nftables import NftTableQueries
from cellos_probed.probes.nftables_parse import NamedCounter, TableSnapshot


class HeldThreads:
    """Records each query and answers it when ``release`` is set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.release = trio.Event()
        self.error = error

    async def run(self, netns: str | None, fn: Callable[..., Any], *args: Any) -> TableSnapshot:
        family, table, with_rules, _where = args
        self.calls.append((netns, family, table, with_rules))
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return TableSnapshot(family, table, (netns, 1), {"c": NamedCounter(2, len(self.calls), 0)})

    def stop_all(self) -> None:
        pass


def queries_with(
    threads: HeldThreads, nursery: trio.Nursery | None, tick: list[int]
) -> NftTableQueries:
    return NftTableQueries(threads, lambda: nursery, lambda: tick[0])  # type: ignore[arg-type]


async def test_one_query_per_table_per_tick_shared_by_every_asker() -> None:
    threads, tick = HeldThreads(), [0]
    results: list[TableSnapshot] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            queries = queries_with(threads, None, tick)

            async def ask(netns: str | None, table: str) -> None:
                results.append(await queries.snapshot(netns, "inet", table, with_rules=False))

            for _ in range(5):  # the first of each table runs the query itself (no services)
                nursery.start_soon(ask, "/run/netns/a", "t")
            nursery.start_soon(ask, "/run/netns/b", "t")
            nursery.start_soon(ask, "/run/netns/a", "u")
            await trio.testing.wait_all_tasks_blocked()
            threads.release.set()
    assert queries.queries == 3
    assert sorted(threads.calls, key=str) == sorted(
        [("/run/netns/a", "inet", "t", False), ("/run/netns/b", "inet", "t", False),
         ("/run/netns/a", "inet", "u", False)], key=str)  # fmt: skip
    assert len(results) == 7
    # the next tick asks again
    tick[0] = 1
    with trio.fail_after(5):
        await queries.snapshot("/run/netns/a", "inet", "t", with_rules=False)
    assert queries.queries == 4


async def test_a_chain_reader_upgrades_the_tick_and_rules_stay_listed_while_it_asks() -> None:
    threads, tick = HeldThreads(), [0]
    threads.release.set()
    with trio.fail_after(5):
        queries = queries_with(threads, None, tick)
        await queries.snapshot(None, "inet", "t", with_rules=False)
        await queries.snapshot(None, "inet", "t", with_rules=True)  # counters-only: list again
        await queries.snapshot(None, "inet", "t", with_rules=False)  # the upgraded one serves
        tick[0] = 1
        await queries.snapshot(None, "inet", "t", with_rules=False)  # rules from the start
        await queries.snapshot(None, "inet", "t", with_rules=True)
        tick[0] = 2
        await queries.snapshot(None, "inet", "t", with_rules=False)
        tick[0] = 3  # no chain reader asked in tick 2: counters only again
        await queries.snapshot(None, "inet", "t", with_rules=False)
    assert [call[3] for call in threads.calls] == [False, True, True, True, False]


async def test_an_error_reaches_every_asker_of_the_tick() -> None:
    threads = HeldThreads(ProbeIoError("table inet t does not exist in x"))
    errors: list[str] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            queries = queries_with(threads, nursery, [0])

            async def ask() -> None:
                with pytest.raises(ProbeIoError) as caught:
                    await queries.snapshot(None, "inet", "t", with_rules=False)
                errors.append(caught.value.message)

            for _ in range(3):
                nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            threads.release.set()
    assert errors == ["table inet t does not exist in x"] * 3
    assert queries.queries == 1


async def test_the_first_askers_timeout_does_not_abandon_the_others() -> None:
    threads = HeldThreads()
    with trio.fail_after(5):
        async with trio.open_nursery() as services:
            queries = queries_with(threads, services, [0])
            with trio.move_on_after(0.01) as first:
                await queries.snapshot(None, "inet", "t", with_rules=False)
            assert first.cancelled_caught
            async with trio.open_nursery() as cells:
                results: list[TableSnapshot] = []

                async def ask() -> None:
                    results.append(await queries.snapshot(None, "inet", "t", with_rules=False))

                cells.start_soon(ask)
                await trio.testing.wait_all_tasks_blocked()
                threads.release.set()
            assert results[0].counters["c"].packets == 1
            assert queries.queries == 1


async def test_without_a_services_nursery_a_cancelled_first_asker_fails_the_others_fast() -> None:
    threads = HeldThreads()
    outcome: list[str] = []
    with trio.fail_after(5):
        queries = queries_with(threads, None, [0])
        async with trio.open_nursery() as cells:
            first_scope = trio.CancelScope()

            async def first() -> None:
                with first_scope:
                    await queries.snapshot(None, "inet", "t", with_rules=False)

            async def second() -> None:
                try:
                    await queries.snapshot(None, "inet", "t", with_rules=False)
                except ProbeTimeoutError as exc:
                    outcome.append(exc.message)

            cells.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            cells.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            first_scope.cancel()
    assert outcome == ["the shared nftables query was cancelled"]
