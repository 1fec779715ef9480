"""Hostile input: symlinks that try to leave their root, secrets that must not leak."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellos_probed.confine import EscapeError, open_beneath
from testbed.cgroup_tree import FakeCgroup

SECRET = "usage_usec 987654321\n# s3cr3t-t0ken-do-not-leak\n"


def test_open_beneath_refuses_symlinks_anywhere_below_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("ok")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("secret")
    os.symlink(outside, root / "link")
    os.symlink(outside / "f", root / "a" / "b" / "flink")
    fd = open_beneath(root, root / "a" / "b" / "f", os.O_RDONLY)
    assert os.read(fd, 10) == b"ok"
    os.close(fd)
    with pytest.raises(EscapeError):
        open_beneath(root, root / "link" / "f", os.O_RDONLY)
    with pytest.raises(EscapeError):
        open_beneath(root, root / "link", os.O_RDONLY, directory=True)
    with pytest.raises(EscapeError):
        open_beneath(root, root / "a" / "b" / "flink", os.O_RDONLY)
    with pytest.raises(FileNotFoundError):
        open_beneath(root, root / "a" / "missing", os.O_RDONLY)


def _secrets(tmp_path: Path) -> Path:
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    for name in ("cpu.stat", "memory.events", "memory.current", "pids.events"):
        (secret_dir / name).write_text(SECRET)
    return secret_dir


def _cgroup_config(root: Path, cells: dict[str, str]) -> str:
    text = f'[paths]\ncgroup_root = "{root}"\n'
    for cell, path in cells.items():
        text += (
            f'[[cell]]\nid = "{cell}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
            f'[cell.cgroup]\npath = "{path}"\n'
        )
    return text


def test_planted_symlinks_never_leak_a_secret_into_events_or_logs(tmp_path: Path) -> None:
    secret_dir = _secrets(tmp_path)
    root = tmp_path / "cgroup"
    # cell-file: one of its files is a symlink to a secret
    file_cell = FakeCgroup(root / "cell-file")
    file_cell.write()
    os.unlink(file_cell.path / "cpu.stat")
    os.symlink(secret_dir / "cpu.stat", file_cell.path / "cpu.stat")
    # cell-garbage: a file holds binary junk that is not the kernel's format
    garbage = FakeCgroup(root / "cell-garbage")
    garbage.write()
    (garbage.path / "memory.events").write_bytes(b"oom \xff\xfe s3cr3t-t0ken-do-not-leak\n")
    config = tmp_path / "c.toml"
    config.write_text(
        _cgroup_config(root, {"cell-file": "cell-file", "cell-garbage": "cell-garbage"})
    )
    result = subprocess.run(
        [sys.executable, "-m", "cellos_probed", "--log-level", "debug", "once",
         "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    everything = result.stdout + result.stderr
    assert "s3cr3t" not in everything
    assert "987654321" not in everything
    assert "Traceback" not in everything
    errors = {
        line.split('"cellId":"')[1].split('"')[0]: line
        for line in result.stdout.splitlines()
        if '.probe_error"' in line
    }
    assert set(errors) == {"cell-file", "cell-garbage"}
    assert "cpu.stat is a symlink; refusing to follow it" in errors["cell-file"]
    assert '"kind":"parse"' in errors["cell-garbage"]


async def test_symlinks_planted_after_load_are_refused_at_open(tmp_path: Path) -> None:
    """One out of the root at load is a config error (test_config); the tree can
    change afterwards, so every open still refuses them."""
    import structlog
    import trio

    from cellos_probed.config import parse_config
    from cellos_probed.daemon import run_once
    from cellos_probed.probes import CapturingSink

    secret_dir = _secrets(tmp_path)
    root = tmp_path / "cgroup"
    root.mkdir()
    # neither path exists yet: accepted, as for a cell still starting
    config = parse_config(_cgroup_config(root, {"cell-dir": "cell-dir", "cell-up": "up/secrets"}))
    # cell-dir: its directory becomes a symlink to a directory of secrets
    os.symlink(secret_dir, root / "cell-dir")
    # cell-up: a component above it does
    os.symlink(secret_dir.parent, root / "up")
    sink = CapturingSink()
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        await run_once(config, sink)
    errors = {e.data["cellId"]: e.data["error"] for e in sink.events if e.kind == "probe_error"}
    assert set(errors) == {"cell-dir", "cell-up"}
    for error in errors.values():
        assert "goes through a symlink; refusing it" in error["message"]
    everything = repr([e.to_dict() for e in sink.events]) + repr(logs)
    assert "s3cr3t" not in everything
    assert "987654321" not in everything


async def test_firecracker_paths_through_a_symlink_are_refused(tmp_path: Path) -> None:
    """A jailed VMM owns its chroot: a symlinked directory there must not be followed."""
    import socket as socket_module

    import trio

    from cellos_probed.config import parse_config
    from cellos_probed.daemon import run_once
    from cellos_probed.probes import CapturingSink

    jail, elsewhere = tmp_path / "jail", tmp_path / "elsewhere"
    (jail / "vm").mkdir(parents=True)
    elsewhere.mkdir()
    listener = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    listener.bind(str(elsewhere / "api.sock"))
    listener.listen(1)
    os.mkfifo(elsewhere / "metrics.fifo")
    config = parse_config(
        f'[paths]\njail_root = "{jail}"\n'
        '[[cell]]\nid = "c"\nrun_id = "r"\nspec_signature_hash = "h"\n'
        '[cell.fc_metrics]\napi_socket = "vm/root/api.sock"\n'
        'metrics_path = "vm/root/metrics.fifo"\n'
    )
    # planted after load (at load it is a config error): opens must still refuse it
    os.symlink(elsewhere, jail / "vm" / "root")
    sink = CapturingSink()
    try:
        with trio.fail_after(10):
            await run_once(config, sink)
    finally:
        listener.close()
    (event,) = sink.events
    assert event.kind == "probe_error"
    assert event.data["error"]["kind"] == "io"
    assert "symlink" in event.data["error"]["message"]
