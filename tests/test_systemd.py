"""systemd: the unit passes systemd-analyze, sd_notify datagrams and watchdog cadence."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from cellos_probed.config import load_config
from cellos_probed.daemon import DaemonHandle, run_daemon
from cellos_probed.probes import ProbeContext, ProbeReading, ProbeResult
from cellos_probed.probes.base import HostProbe
from cellos_probed.systemd import Notifier
from testbed.cgroup_tree import FakeCgroup
from tests.test_daemon import RunnableSink, write_config

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "cellos-probed.service"
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


TEMPLATE = REPO / "systemd" / "cellos-probed@.service"


def unit_for_this_venv(
    tmp_path: Path, unit: Path = UNIT, name: str = "cellos-probed.service"
) -> Path:
    """The shipped unit with ExecStart pointing at this virtualenv (verify checks it exists)."""
    text = unit.read_text().replace(
        "/opt/cellos-probed/bin/cellos-probed", str(Path(sys.prefix) / "bin" / "cellos-probed")
    )
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_shard_template_is_the_unit_but_for_its_shard_lines() -> None:
    template = TEMPLATE.read_text()
    assert "--shard %I\n" in template
    unsharded = (
        template.replace(" (shard %I)", "")
        .replace(" --shard %I", "")
        .replace(
            "# a runtime directory per shard: stopping one instance removes only its own\n", ""
        )
        .replace("RuntimeDirectory=cellos-probed-shard-%i", "RuntimeDirectory=cellos-probed")
    )
    body = UNIT.read_text()
    assert unsharded[unsharded.index("[Unit]") :] == body[body.index("[Unit]") :]


@needs_analyze
def test_an_instance_of_the_shard_template_verifies_with_no_warning(tmp_path: Path) -> None:
    unit = unit_for_this_venv(tmp_path, TEMPLATE, "cellos-probed@0-2.service")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@needs_analyze
def test_the_unit_verifies_with_no_warning(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_for_this_venv(tmp_path))],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # unknown keys are only warnings: any output fails


@needs_analyze
def test_the_unit_security_exposure_is_at_most_2_4(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=24",
         str(unit_for_this_venv(tmp_path))],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    score = float(found.group(1))
    print(f"systemd-analyze security --offline=true: exposure {score} (target <= 2.4)")
    assert score <= 2.4
    assert result.returncode == 0
    text = UNIT.read_text()
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_ADMIN\n" in text
    for line in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID",
                 "Restart=on-failure", "ProtectSystem=strict"):  # fmt: skip
        assert f"\n{line}" in text


class DatagramRecorder:
    """A NOTIFY_SOCKET in a thread of its own, timestamping what arrives."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.received.append((time.monotonic(), fields))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def keys(self) -> list[str]:
        return [next(iter(fields)) for _, fields in self.received]


def test_notifier_speaks_to_path_and_abstract_sockets(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    recorder = DatagramRecorder(path)
    try:
        Notifier({"NOTIFY_SOCKET": path}).ready("3 cells")
        abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"cellos-test-{time.monotonic_ns()}"
        abstract.bind(f"\0{name}")
        Notifier({"NOTIFY_SOCKET": f"@{name}"}).stopping()
        assert abstract.recv(100) == b"STOPPING=1\nSTATUS=stopping: publishing what was read"
        abstract.close()
        deadline = time.monotonic() + 5
        while not recorder.received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recorder.received[0][1] == {"READY": "1", "STATUS": "3 cells"}
    finally:
        recorder.close()
    # silent and harmless outside systemd; the watchdog only when the pid is ours
    assert Notifier({}).enabled is False
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None
    assert Notifier({"WATCHDOG_USEC": "1000000"}).watchdog_seconds == 1.0


class WedgingProbe(HostProbe):
    """Blocks the trio thread once (a bug a watchdog exists for), then reads fine."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.wedged = trio.Event()

    def probe_name(self) -> str:
        return "cgroup"

    def inputs(self) -> dict[str, Any]:
        return {}

    @classmethod
    async def read_batch(
        cls,
        jobs: Sequence[tuple[ProbeContext, WedgingProbe]],
        results: list[ProbeResult | None],
    ) -> None:
        for i, (_, probe) in enumerate(jobs):
            if not probe.wedged.is_set():
                probe.wedged.set()
                time.sleep(probe.seconds)  # noqa: ASYNC251 - deliberately blocking the event loop
            results[i] = ProbeReading("host.cgroup", {}, {})


@pytest.mark.made_up_readings
async def test_daemon_notifies_ready_watchdog_reload_and_stop(tmp_path: Path) -> None:
    for cell in ("a", "b"):
        FakeCgroup(tmp_path / cell).write()
    config_path = write_config(tmp_path / "c.toml", tmp_path, ["a"], tick=0.1)
    recorder = DatagramRecorder(str(tmp_path / "notify"))
    env = {
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    sink = RunnableSink()
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                handle: DaemonHandle = await nursery.start(
                    lambda task_status: run_daemon(
                        load_config(config_path), sink, config_path=str(config_path),
                        handle_signals=False, notifier=Notifier(env), task_status=task_status,
                    )
                )  # fmt: skip
                await sink.wait_for(25, "a")  # 2.5 s of ticks: several watchdog pings
                wedge = WedgingProbe(3.0)
                handle.prober.cells["a"].probes = [wedge]
                wedged_at = time.monotonic()
                await wedge.wedged.wait()
                count = len(sink.events)
                await sink.wait_for(count + 15, "a")  # the loop runs again
                write_config(config_path, tmp_path, ["a", "b"], tick=0.1)
                handle.reload()
                await sink.wait_for(3, "b")
                config_path.write_text("[daemon]\ntick_seconds = 'often'\n")
                handle.reload()
                await sink.wait_for(
                    len([e for e in sink.events if e.data.get("cellId") == "b"]) + 3, "b"
                )
                handle.stop()
    finally:
        time.sleep(0.2)  # noqa: ASYNC251 - let the last datagrams reach the recorder thread
        recorder.close()

    keys = recorder.keys()
    assert keys[0] == "READY"
    assert recorder.received[0][1]["STATUS"].startswith("1 cells; ")
    pings = [at for at, fields in recorder.received if "WATCHDOG" in fields]
    before = [at for at in pings if at < wedged_at]
    assert len(before) >= 3
    gaps = [b - a for a, b in itertools.pairwise(before)]
    assert max(gaps) <= 1.0  # at most half of WATCHDOG_USEC
    # while the loop was wedged, no ping: systemd would have restarted us
    wedge_gap = max(b - a for a, b in itertools.pairwise(pings))
    assert wedge_gap >= 2.5
    after = [at for at in pings if at > wedged_at + 3.0]
    assert after, "pings resume once the loop runs again"
    reloading = [fields for _, fields in recorder.received if "RELOADING" in fields]
    assert len(reloading) == 2
    failed = [f for _, f in recorder.received if "RELOAD FAILED" in f.get("STATUS", "")]
    assert failed, "a refused reload shows in STATUS="
    assert "key 'daemon.tick_seconds'" in failed[0]["STATUS"]
    assert failed[0].get("READY") == "1"
    assert int(reloading[0]["MONOTONIC_USEC"]) > 0
    index = keys.index("RELOADING")
    assert "READY" in keys[index + 1 :]
    assert keys[-1] == "STOPPING"
