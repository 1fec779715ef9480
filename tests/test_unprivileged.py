"""As a plain user: a probe that cannot work says which permission or capability it lacks;
the rest keep working."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from cellos_probed.config import load_config
from cellos_probed.daemon import run_once
from cellos_probed.probes import CapturingSink
from testbed.cgroup_tree import FakeCgroup
from testbed.taps import network_namespace, tap_device, unique_name
from tests.conftest import IS_ROOT

pytestmark = pytest.mark.skipif(
    not IS_ROOT, reason="needs root to create the objects, then drops it"
)
NOBODY = 65534


def once_as_nobody(config_path: Path) -> list[dict[str, Any]]:
    """One tick in a forked child that dropped to nobody (no capabilities left)."""
    config = load_config(config_path)  # loaded as root: reading the config is not the point
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only code already imported runs here
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sink = CapturingSink()
            trio.run(run_once, config, sink)
            payload = orjson.dumps([event.to_dict() for event in sink.events])
        except BaseException as exc:  # report anything to the parent, never hang
            payload = orjson.dumps([{"crash": repr(exc)}])
        os.write(write_end, payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    events: list[dict[str, Any]] = orjson.loads(data)
    return events


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    """pytest's tmp_path lives under a 0700 directory nobody cannot traverse."""
    path = Path(tempfile.mkdtemp(prefix="cellos-unpriv-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_each_probe_names_what_it_lacks_and_the_others_work(
    world_traversable_dir: Path,
) -> None:
    tmp_path = world_traversable_dir
    root = tmp_path / "cgroup"
    FakeCgroup(root / "open").write()
    FakeCgroup(root / "private").write()
    root.chmod(0o755)
    (root / "open").chmod(0o755)
    for name in os.listdir(root / "open"):
        (root / "open" / name).chmod(0o644)
    (root / "private").chmod(0o700)  # root's only: as a cgroup of another user would be
    ns = unique_name("cpu")
    with network_namespace(ns) as netns, tap_device(unique_name("tu"), ns) as tap:
        cells = {
            "cg-open": '[cell.cgroup]\npath = "open"\n',
            "cg-private": '[cell.cgroup]\npath = "private"\n',
            "tap-host": '[cell.tap_link]\ninterface = "lo"\n',
            "tap-netns": f'netns = "{netns}"\n[cell.tap_link]\ninterface = "{tap}"\n',
        }
        text = f'[paths]\ncgroup_root = "{root}"\n'
        for cell, table in cells.items():
            text += f'[[cell]]\nid = "{cell}"\nrun_id = "r"\nspec_signature_hash = "h"\n{table}'
        config = tmp_path / "c.toml"
        config.write_text(text)
        events = once_as_nobody(config)
    assert "crash" not in events[0], events
    by_cell = {event["data"]["cellId"]: event for event in events}
    assert set(by_cell) == set(cells)
    assert by_cell["cg-open"]["type"].endswith(".cgroup")
    assert by_cell["tap-host"]["type"].endswith(".tap_link")  # rtnetlink reads need no capability
    private = by_cell["cg-private"]["data"]["error"]
    assert private == {
        "kind": "io",
        "message": "permission denied opening cgroup directory: private",
    }
    netns_error = by_cell["tap-netns"]["data"]["error"]
    assert netns_error["kind"] == "io"
    assert "CAP_SYS_ADMIN" in netns_error["message"]
    assert sys.executable  # the parent kept its privileges
    assert os.geteuid() == 0
