"""Shards: K daemon processes share a host's cells, each cell in exactly one of them."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import trio

from cellos_probed.config import parse_config
from cellos_probed.nats_bridge import open_subscription
from cellos_probed.shard import Shard
from testbed.cgroup_tree import FakeCgroup
from tests.conftest import NatsServer, needs_nats
from tests.e2e import PREFIX, Collector

CELLS = [f"cell-{i}" for i in range(12)]


def cells_config(root: Path, cells: list[str], extra: str = "") -> str:
    text = f"[daemon]\ntick_seconds = 0.2\nprobe_timeout_seconds = 0.1\n{extra}"
    text += f'[paths]\ncgroup_root = "{root}"\n'
    for cell in cells:
        text += (
            f'[[cell]]\nid = "{cell}"\nrun_id = "r-{cell}"\nspec_signature_hash = "h"\n'
            f'[cell.cgroup]\npath = "{cell}"\n'
        )
    return text


def test_every_cell_is_in_exactly_one_shard_and_stays_there() -> None:
    ids = [f"cell-{i}" for i in range(2000)]
    for count in (1, 2, 3, 8):
        shards = [Shard(index, count) for index in range(count)]
        owners = [[shard for shard in shards if shard.owns(cell)] for cell in ids]
        assert all(len(owner) == 1 for owner in owners)
        sizes = [sum(owner[0] is shard for owner in owners) for shard in shards]
        assert min(sizes) > 0.8 * len(ids) / count  # a hash spreads them evenly enough
    # the same cell, the same shard: across processes, restarts and reloads
    assert Shard(1, 2).owns("cell-1") == Shard.parse("1/2").owns("cell-1")


def test_select_keeps_the_shards_cells_in_order_and_gives_it_its_own_spool(
    tmp_path: Path,
) -> None:
    extra = f'[spool]\npath = "{tmp_path / "spool"}"\n'
    config = parse_config(cells_config(tmp_path, CELLS).replace("[paths]", extra + "[paths]"))
    first, second = Shard(0, 2).select(config), Shard(1, 2).select(config)
    assert [c.id for c in first.cells] + [c.id for c in second.cells] != []
    assert sorted(c.id for c in first.cells + second.cells) == sorted(CELLS)
    assert [c.id for c in first.cells] == [c for c in CELLS if Shard(0, 2).owns(c)]
    assert first.spool is not None
    assert second.spool is not None
    assert first.spool.path == tmp_path / "spool" / "shard-0-of-2"
    assert second.spool.path != first.spool.path
    assert Shard(0, 1).select(config) == config  # one shard: the config as it is


@pytest.mark.parametrize("text", ["2/2", "0/0", "a/b", "1", "-1/2", "0/65"])
def test_a_malformed_shard_is_refused_by_the_command_line(text: str, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(cells_config(tmp_path, CELLS[:1]))
    result = subprocess.run(
        [sys.executable, "-m", "cellos_probed", "run", "--config", str(config), "--shard", text],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--shard" in result.stderr
    assert "Traceback" not in result.stderr


@needs_nats
async def test_two_shards_publish_every_cell_once_with_their_own_boot(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    for cell in CELLS:
        FakeCgroup(tmp_path / "cg" / cell).write()
    config = tmp_path / "c.toml"
    config.write_text(
        cells_config(tmp_path / "cg", CELLS, "agent_event_every_ticks = 1\n")
        + f'[nats]\nservers = ["{nats_server.url}"]\n'
    )
    collector = Collector()
    with trio.fail_after(30):
        async with (
            open_subscription([nats_server.url], f"{PREFIX}.>") as messages,
            trio.open_nursery() as nursery,
        ):

            async def collect() -> None:
                async for message in messages:
                    collector.add(message)

            nursery.start_soon(collect)
            daemons = []
            for index in (0, 1):
                with (tmp_path / f"shard{index}.log").open("wb") as log:
                    daemons.append(
                        await trio.lowlevel.open_process(
                            [
                                sys.executable,
                                "-m",
                                "cellos_probed",
                                "run",
                                "--config",
                                str(config),
                                "--shard",
                                f"{index}/2",
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=log,
                        )
                    )
            await collector.wait_for(
                lambda: all(len(collector.of(cell, ".cgroup")) >= 3 for cell in CELLS)
            )
            for daemon in daemons:
                daemon.send_signal(signal.SIGTERM)
            for daemon in daemons:
                assert await daemon.wait() == 0
            nursery.cancel_scope.cancel()
    boots_of: dict[str, set[str]] = defaultdict(set)
    for event in collector.events:
        boots_of[event["data"]["cellId"]].add(event["cellosagentboot"])
    assert set(boots_of) == set(CELLS)
    # each cell from one process (one boot), its sequence whole from 1
    assert all(len(boots) == 1 for boots in boots_of.values())
    for cell in CELLS:
        sequences = [e["cellosseq"] for e in collector.of(cell, ".cgroup")]
        assert sequences == list(range(1, len(sequences) + 1))
    # two processes, two boots, each with its own share
    shard_boots = {boot for boots in boots_of.values() for boot in boots}
    assert len(shard_boots) == 2
    agents = {e["cellosagentboot"]: e["data"] for e in collector.agent_events}
    assert {figures["shard"] for figures in agents.values()} == {"0/2", "1/2"}
    assert sum({b: f["cells"] for b, f in agents.items()}.values()) == len(CELLS)
    for figures in agents.values():
        shard = Shard.parse(figures["shard"])
        assert figures["cells"] == sum(shard.owns(cell) for cell in CELLS)
