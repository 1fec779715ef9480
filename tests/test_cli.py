"""The command line: once, tail, --version, --help, exit codes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import orjson
import trio

from cellos_probed import __version__
from cellos_probed.tail import format_event, tail_subject
from testbed.cgroup_tree import FakeCgroup
from tests.conftest import NatsServer, needs_nats

PREFIX = "dev.cellos.events.cell.observability.host.v1"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cellos_probed", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def two_cell_config(tmp_path: Path, extra: str = "") -> Path:
    FakeCgroup(tmp_path / "cg" / "ok").write()
    path = tmp_path / "c.toml"
    path.write_text(
        f'{extra}[paths]\ncgroup_root = "{tmp_path / "cg"}"\n'
        '[[cell]]\nid = "ok"\nrun_id = "r"\nspec_signature_hash = "h"\n'
        '[cell.cgroup]\npath = "ok"\n'
        '[[cell]]\nid = "gone"\nrun_id = "r"\nspec_signature_hash = "h"\n'
        '[cell.cgroup]\npath = "gone"\n'
    )
    return path


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.strip() == f"cellos-probed {__version__}"
    help_text = run_cli("--help").stdout
    for command in ("run", "check-config", "once", "tail"):
        assert command in help_text
    assert "78 configuration error" in help_text


def test_once_prints_every_event_and_exits_zero_even_when_a_probe_fails(tmp_path: Path) -> None:
    result = run_cli("once", "--config", str(two_cell_config(tmp_path)))
    assert result.returncode == 0, result.stderr
    events = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert sorted((e["data"]["cellId"], e["type"].rsplit(".", 1)[1]) for e in events) == [
        ("gone", "probe_error"),
        ("ok", "cgroup"),
    ]
    assert all(e["cellosseq"] == 1 for e in events)
    assert "Traceback" not in result.stderr


def test_a_config_error_exits_78_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\ntick_seconds = -1\n")
    for command in ("once", "run", "check-config"):
        result = run_cli(command, "--config", str(bad))
        assert result.returncode == 78
        assert "Traceback" not in result.stderr
        assert "key 'daemon.tick_seconds': must be between" in result.stderr


def test_format_event_lines() -> None:
    reading = {
        "type": f"{PREFIX}.cgroup", "time": "2026-11-25T10:15:02.123Z", "cellosseq": 7,
        "data": {"cellId": "cell-1", "hostId": "host-a", "probeSource": "host.cgroup", "output": {
            "memory_current": 3 * 2**20, "pids_current": 4,
            "memory_events": {"oom_kill": 1},
            "deltas": {"cpu_stat": {"usage_usec": 2500}, "reset": False},
        }},
    }  # fmt: skip
    assert format_event(reading) == (
        "2026-11-25T10:15:02.123Z host-a       cell-1           cgroup         #7 "
        "cpu +2.5ms mem 3.0MiB oom_kill=1 pids 4"
    )
    error = {
        "type": f"{PREFIX}.probe_error", "time": "T", "cellosseq": 2,
        "data": {"cellId": "c", "probeSource": "host.cgroup",
                 "error": {"kind": "io", "message": "gone"}},
    }  # fmt: skip
    assert format_event(error).endswith("ERROR io: gone")
    gap = {
        "type": f"{PREFIX}.gap", "time": "T",
        "data": {"cellId": "c", "probeSource": "host.cgroup", "dropped": 3,
                 "firstSequence": 4, "lastSequence": 6, "reason": "buffer_full"},
    }  # fmt: skip
    assert format_event(gap).endswith("GAP dropped 3 seq 4..6 (buffer_full)")


def test_tail_subjects() -> None:
    assert tail_subject("p", None, None, None) == "p.>"
    assert tail_subject("p", None, "cell-1", None) == "p.*.*.cell-1"
    assert tail_subject("p", None, None, "cgroup") == "p.cgroup.*.*"
    assert tail_subject("p", "host-a", None, None) == "p.*.host-a.*"
    assert tail_subject("p", "host-a", "cell-1", "cgroup") == "p.cgroup.host-a.cell-1"


@needs_nats
async def test_tail_prints_what_the_daemon_publishes(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    config = two_cell_config(
        tmp_path,
        f'[daemon]\ntick_seconds = 0.2\n[nats]\nservers = ["{nats_server.url}"]\n',
    )
    processes: list[trio.Process] = []
    try:
        with trio.fail_after(30):
            tail = await trio.lowlevel.open_process(
                [sys.executable, "-m", "cellos_probed", "tail", "--config", str(config),
                 "--cell", "ok", "--count", "3"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            processes.append(tail)
            assert tail.stderr is not None
            assert tail.stdout is not None
            # tail says when it is subscribed; only then start the daemon
            banner = await tail.stderr.receive_some()
            assert b"# tail dev.cellos.events.cell.observability.host.v1.*.*.ok" in banner
            daemon = await trio.lowlevel.open_process(
                [sys.executable, "-m", "cellos_probed", "run", "--config", str(config)],
                stderr=subprocess.DEVNULL,
            )
            processes.append(daemon)
            output = b""
            while chunk := await tail.stdout.receive_some():
                output += chunk
            assert await tail.wait() == 0
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
    finally:  # a failed test leaves no process behind
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    lines = output.decode().splitlines()
    assert len(lines) == 3
    assert [line.split()[2:5] for line in lines] == [
        ["ok", "cgroup", "#1"], ["ok", "cgroup", "#2"], ["ok", "cgroup", "#3"],
    ]  # fmt: skip
