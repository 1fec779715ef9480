"""The nftables probe against real namespaces and tables, as root.

Each test makes its own namespaces (names carry this process's pid) with a
table of named counters and per-cell chains of commented counter rules
(``testbed.nft``), moves the counters with ``ping`` over loopback inside the
namespace, and runs the daemon's own :class:`Prober` tick by tick. The
reference is ``nft -j list ...`` in the same namespace right after. Every
namespace and table is removed, also on failure (checked after each test).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from cellos_probed.config import parse_config
from cellos_probed.daemon import Prober
from cellos_probed.probes import CapturingSink, SequenceRegistry
from testbed.nft import (
    ECHO_PACKET_BYTES,
    CellRules,
    TableSpec,
    chain_rule_figures,
    counter_figures,
    namespace_with_loopback,
    namespaces,
    nft_table,
    ping,
    reload_table,
    tables,
)
from testbed.taps import unique_name
from tests.conftest import needs_root

pytestmark = needs_root
PID = os.getpid()
ECHO = ECHO_PACKET_BYTES


@pytest.fixture(autouse=True)
def leaves_nothing_behind() -> Iterator[None]:
    host_tables = tables()
    yield
    assert [name for name in namespaces() if str(PID) in name] == []
    assert tables() == host_tables


@dataclass
class Cell:
    id: str
    netns: str | None  # path
    table: str
    counters: tuple[str, ...] = ()
    chain: str | None = None
    family: str = "inet"

    def toml(self) -> str:
        text = f'[[cell]]\nid = "{self.id}"\nrun_id = "run-{self.id}"\nspec_signature_hash = "h"\n'
        if self.netns is not None:
            text += f'netns = "{self.netns}"\n'
        text += f'[cell.nftables]\nfamily = "{self.family}"\ntable = "{self.table}"\n'
        text += f"counters = {list(self.counters)!r}\n".replace("'", '"')
        if self.chain is not None:
            text += f'chain = "{self.chain}"\n'
        return text


class Ticker:
    """The daemon's Prober, one tick at a time; the events of each tick."""

    def __init__(self, prober: Prober, sink: CapturingSink) -> None:
        self.prober = prober
        self.sink = sink
        self.index = 0

    async def tick(self) -> dict[str, dict[str, Any]]:
        """One tick; each cell's event ``data`` (reading or probe_error), by cell id."""
        before = len(self.sink.events)
        await self.prober.tick(self.index)
        self.index += 1
        events = [event.to_dict() for event in self.sink.events[before:]]
        return {
            event["data"]["cellId"]: {"type": event["type"], **event["data"]} for event in events
        }

    @property
    def queries(self) -> int:
        return self.prober.services.nft_tables.queries


@asynccontextmanager
async def ticking(cells: list[Cell]) -> AsyncIterator[Ticker]:
    config = parse_config("[daemon]\ntick_seconds = 1.0\n" + "".join(c.toml() for c in cells))
    sink = CapturingSink()
    prober = Prober(config, sink, SequenceRegistry())
    async with trio.open_nursery() as nursery:
        await nursery.start(prober.run_services)
        try:
            yield Ticker(prober, sink)
        finally:
            prober.services.nft_tables.stop()
            nursery.cancel_scope.cancel()


async def traffic(ns: str, count: int) -> None:
    await trio.to_thread.run_sync(ping, ns, count)


def figures(packets: int) -> dict[str, int]:
    return {"packets": packets, "bytes": packets * ECHO}


def table_name() -> str:
    return f"cellos{PID}"


async def test_readings_equal_nft_and_move_with_traffic() -> None:
    ns, rules = unique_name("nfa"), CellRules("cell-1")
    spec = TableSpec("inet", table_name(), (rules,))
    with namespace_with_loopback(ns) as path, nft_table(spec, ns), trio.fail_after(20):
        cell = Cell("cell-1", path, spec.name, (rules.rx, rules.tx), rules.chain)
        async with ticking([cell]) as ticker:
            first = (await ticker.tick())["cell-1"]
            await traffic(ns, 3)
            second = (await ticker.tick())["cell-1"]
            nft_counters = counter_figures("inet", spec.name, ns)
            nft_rules = chain_rule_figures("inet", spec.name, rules.chain, ns)

    assert first["type"].endswith(".nftables")
    assert first["probeSource"] == "host.nftables"
    assert first["inputs"] == {
        "family": "inet",
        "table": spec.name,
        "counters": [rules.rx, rules.tx],
        "netns": path,
        "chain": rules.chain,
    }
    assert first["output"]["counters"] == {rules.rx: figures(0), rules.tx: figures(0)}
    assert first["output"]["deltas"] is None
    assert first["output"]["missing"] == []

    output = second["output"]
    # three echoes: requests and replies both come in on lo, both go out on it
    assert output["counters"] == {rules.rx: figures(6), rules.tx: figures(6)}
    assert output["counters"] == {name: nft_counters[name] for name in (rules.rx, rules.tx)}
    assert output["rules"] == nft_rules
    assert [(r["comment"], r["packets"], r["bytes"]) for r in output["rules"]] == [
        ("echo requests", 3, 3 * ECHO),
        ("echo replies", 3, 3 * ECHO),
        (None, 6, 6 * ECHO),
        (None, 6, 6 * ECHO),
    ]
    handles = [r["handle"] for r in output["rules"]]
    assert output["deltas"] == {
        "counters": {rules.rx: figures(6), rules.tx: figures(6)},
        "rules": dict(zip(map(str, handles), map(figures, (3, 3, 6, 6)), strict=True)),
        "reset": False,
    }
    assert output["missing"] == []


async def test_a_reloaded_table_resets_and_deltas_are_right_after() -> None:
    ns, rules = unique_name("nfr"), CellRules("cell-r")
    spec = TableSpec("inet", table_name(), (rules,))
    with namespace_with_loopback(ns) as path, nft_table(spec, ns), trio.fail_after(30):
        cell = Cell("cell-r", path, spec.name, (rules.rx,), rules.chain)
        async with ticking([cell]) as ticker:
            await traffic(ns, 3)
            before = (await ticker.tick())["cell-r"]["output"]
            # more traffic after the reload than before it: only the table's identity tells
            await trio.to_thread.run_sync(reload_table, spec, ns)
            await traffic(ns, 5)
            reloaded = (await ticker.tick())["cell-r"]["output"]
            reference = counter_figures("inet", spec.name, ns)
            await traffic(ns, 1)
            after = (await ticker.tick())["cell-r"]["output"]
            unchanged = (await ticker.tick())["cell-r"]["output"]

    assert before["counters"] == {rules.rx: figures(6)}
    assert reloaded["counters"] == {rules.rx: figures(10)} == {rules.rx: reference[rules.rx]}
    handles = [str(r["handle"]) for r in reloaded["rules"]]
    assert reloaded["deltas"] == {
        "counters": {rules.rx: figures(10)},
        "rules": dict(zip(handles, map(figures, (5, 5, 10, 10)), strict=True)),
        "reset": True,
    }
    assert after["deltas"] == {
        "counters": {rules.rx: figures(2)},
        "rules": dict(zip(handles, map(figures, (1, 1, 2, 2)), strict=True)),
        "reset": False,
    }
    assert after["counters"] == {rules.rx: figures(12)}
    assert unchanged["deltas"]["reset"] is False
    assert unchanged["deltas"]["counters"] == {rules.rx: figures(0)}


async def test_cells_sharing_a_table_cost_one_query_per_tick() -> None:
    ns = unique_name("nfs")
    cells_rules = [CellRules(f"cell-{n}") for n in range(3)]
    spec = TableSpec("inet", table_name(), tuple(cells_rules))
    with namespace_with_loopback(ns) as path, nft_table(spec, ns), trio.fail_after(20):
        counting = [Cell(r.cell, path, spec.name, (r.rx, r.tx)) for r in cells_rules]
        async with ticking(counting) as ticker:
            await traffic(ns, 2)
            readings = [await ticker.tick() for _ in range(3)]
            counters_only = ticker.queries
        # a chain reader joins: the first tick may list twice, every later one once
        chained = [*counting, Cell("cell-x", path, spec.name, (), cells_rules[0].chain)]
        async with ticking(chained) as ticker:
            await ticker.tick()
            first_tick = ticker.queries
            mixed = [await ticker.tick() for _ in range(3)]
            later_ticks = ticker.queries - first_tick

    assert counters_only == 3
    assert first_tick in (1, 2)
    assert later_ticks == 3
    for reading in readings:
        for rules in cells_rules:
            assert reading[rules.cell]["output"]["counters"] == {
                rules.rx: figures(4),
                rules.tx: figures(4),
            }
    assert [r["packets"] for r in mixed[-1]["cell-x"]["output"]["rules"]] == [2, 2, 4, 4]
    assert mixed[-1]["cell-1"]["output"]["counters"][cells_rules[1].rx] == figures(4)


async def test_a_view_that_raises_costs_its_own_cell_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cellos_probed.probes.nftables import NftablesProbe

    ns = unique_name("nfr")
    cells_rules = [CellRules(f"cell-{n}") for n in range(3)]
    spec = TableSpec("inet", table_name(), tuple(cells_rules))
    real = NftablesProbe.reading_from

    def broken_for_cell_1(probe: NftablesProbe, snapshot: Any) -> Any:
        if cells_rules[1].rx in probe._config.counters:
            raise KeyError("a bug")
        return real(probe, snapshot)

    monkeypatch.setattr(NftablesProbe, "reading_from", broken_for_cell_1)
    with namespace_with_loopback(ns) as path, nft_table(spec, ns), trio.fail_after(20):
        counting = [Cell(r.cell, path, spec.name, (r.rx, r.tx)) for r in cells_rules]
        async with ticking(counting) as ticker:
            events = await ticker.tick()

    assert events["cell-1"]["error"] == {"kind": "io", "message": "unexpected KeyError"}
    for cell in ("cell-0", "cell-2"):
        assert events[cell]["type"].endswith(".nftables")
        assert events[cell]["output"]["missing"] == []


async def test_cells_in_two_namespaces_read_their_own_table() -> None:
    name = table_name()
    ns_a, ns_b = unique_name("nfa"), unique_name("nfb")
    rules = CellRules("cell")  # the same names in both: only the namespace tells them apart
    spec = TableSpec("inet", name, (rules,))
    with ExitStack() as stack, trio.fail_after(20):
        path_a = stack.enter_context(namespace_with_loopback(ns_a))
        path_b = stack.enter_context(namespace_with_loopback(ns_b))
        stack.enter_context(nft_table(spec, ns_a))
        stack.enter_context(nft_table(spec, ns_b))
        cells = [
            Cell("cell-a", path_a, name, (rules.rx,), rules.chain),
            Cell("cell-b", path_b, name, (rules.rx,), rules.chain),
        ]
        async with ticking(cells) as ticker:
            await traffic(ns_a, 1)
            await traffic(ns_b, 4)
            reading = await ticker.tick()
            queries = ticker.queries
        reference_a = chain_rule_figures("inet", name, rules.chain, ns_a)
        reference_b = chain_rule_figures("inet", name, rules.chain, ns_b)

    assert queries == 2
    assert reading["cell-a"]["output"]["counters"] == {rules.rx: figures(2)}
    assert reading["cell-b"]["output"]["counters"] == {rules.rx: figures(8)}
    assert reading["cell-a"]["output"]["rules"] == reference_a
    assert reading["cell-b"]["output"]["rules"] == reference_b
    assert reading["cell-a"]["inputs"]["netns"] == path_a


async def test_missing_counter_and_chain_are_named_and_the_rest_reported() -> None:
    ns, rules = unique_name("nfm"), CellRules("cell-m")
    spec = TableSpec("inet", table_name(), (rules,))
    with namespace_with_loopback(ns) as path, nft_table(spec, ns), trio.fail_after(20):
        cell = Cell("cell-m", path, spec.name, (rules.rx, "ghost", rules.tx), "ghost-in")
        async with ticking([cell]) as ticker:
            await traffic(ns, 1)
            reading = (await ticker.tick())["cell-m"]

    assert reading["type"].endswith(".nftables")
    assert reading["output"]["counters"] == {rules.rx: figures(2), rules.tx: figures(2)}
    assert reading["output"]["rules"] == []
    assert reading["output"]["missing"] == [
        {"kind": "counter", "name": "ghost"},
        {"kind": "chain", "name": "ghost-in"},
    ]


async def test_a_missing_table_or_namespace_is_an_io_error() -> None:
    ns = unique_name("nft")
    with namespace_with_loopback(ns) as path, trio.fail_after(20):
        gone = f"/var/run/netns/{unique_name('nfg')}"
        cells = [
            Cell("cell-t", path, f"absent{PID}", ("c",)),
            Cell("cell-u", path, f"absent{PID}", (), "x"),
            Cell("cell-n", gone, "cellos", ("c",)),
        ]
        async with ticking(cells) as ticker:
            events = await ticker.tick()

    for cell in ("cell-t", "cell-u"):
        assert events[cell]["type"].endswith(".probe_error")
        assert events[cell]["error"] == {
            "kind": "io",
            "message": f"table inet absent{PID} does not exist in network namespace {path}",
        }
    assert events["cell-t"]["inputs"] == {
        "family": "inet",
        "table": f"absent{PID}",
        "counters": ["c"],
        "netns": path,
    }
    assert events["cell-n"]["error"] == {
        "kind": "io",
        "message": f"network namespace does not exist: {gone}",
    }


def test_without_cap_net_admin_the_error_names_the_capability(tmp_path: Path) -> None:
    config = tmp_path / "cellos-probed.toml"
    config.write_text(Cell("cell-p", None, "cellos", ("c",)).toml())
    # as root but with CAP_NET_ADMIN gone from every set: netlink answers EPERM
    result = subprocess.run(
        ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin",
         sys.executable, "-m", "cellos_probed", "once", "--config", str(config)],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (event,) = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert event["type"].endswith(".probe_error")
    assert event["data"]["error"] == {
        "kind": "io",
        "message": "reading nftables in the host network namespace needs CAP_NET_ADMIN (EPERM)",
    }
