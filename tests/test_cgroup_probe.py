"""The cgroup probe on fixture trees in the kernel's format and on a real cgroup."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from cellos_probed.batching import ThreadBatcher
from cellos_probed.config import CgroupProbeConfig, load_config
from cellos_probed.confine import open_beneath
from cellos_probed.daemon import Cell, Prober
from cellos_probed.fd_limit import KEPT_PER_CELL, DescriptorBudget
from cellos_probed.probes import (
    CapturingSink,
    ProbeContext,
    ProbeError,
    ProbeIoError,
    ProbeParseError,
    ProbeReading,
    SequenceRegistry,
    emit_reading,
)
from cellos_probed.probes import cgroup as cgroup_module
from cellos_probed.probes.cgroup import CGROUP_FILES, CgroupProbe, CgroupShared
from cellos_probed.probes.cgroup_parse import parse_flat_keyed
from testbed.cgroup_tree import FakeCgroup
from tests.conftest import needs_root
from tests.probing import read_one
from tests.test_daemon import write_config

CTX = ProbeContext("cell-1", "run-7", "sha256:abcd")
BATCHER = ThreadBatcher(trio.CapacityLimiter(2))


def probe_for(path: Path, written: str = "cell-1") -> CgroupProbe:
    shared = CgroupShared(ThreadBatcher(trio.CapacityLimiter(2)))
    return CgroupProbe(CgroupProbeConfig(written, path), shared)


async def read_while_burning_cpu(probe: CgroupProbe, cgroup: Path) -> ProbeReading:
    """Read ``probe`` until a process burning CPU inside ``cgroup`` shows in its deltas.

    A poll, not a sleep standing in for an event: the kernel accounts CPU time to
    a cgroup as it runs, and nothing announces it.
    """
    burner = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import sys\nsys.stdin.readline()\nwhile True: pass"],
        stdin=subprocess.PIPE,
    )
    try:
        (cgroup / "cgroup.procs").write_text(str(burner.pid))
        assert burner.stdin is not None
        await burner.stdin.send_all(b"go\n")  # start burning only once inside the cgroup
        with trio.fail_after(10):
            while True:
                reading = await read_one(probe, CTX)
                if reading.output["deltas"]["cpu_stat"]["usage_usec"] > 10_000:
                    return reading
                await trio.sleep(0.05)
    finally:
        burner.kill()
        with trio.fail_after(5):
            await burner.wait()


async def test_full_tree_every_file_and_key(tmp_path: Path) -> None:
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.memory_events["oom_kill"] = 4
    cgroup.cpu_stat["usage_usec"] = 123456
    cgroup.pids_events["max"] = 2
    cgroup.write()
    reading = await read_one(probe_for(cgroup.path), CTX)
    out = reading.output
    assert reading.probe_source == "host.cgroup"
    assert reading.inputs == {
        "cgroup_path": "cell-1",
        "files": [name for name, _ in CGROUP_FILES],
    }
    assert out["memory_events"] == {
        "low": 0, "high": 0, "max": 0, "oom": 0, "oom_kill": 4, "oom_group_kill": 0,
    }  # fmt: skip
    assert out["cpu_stat"]["usage_usec"] == 123456
    assert out["pids_events"] == {"max": 2}
    assert out["memory_current"] == 8_388_608
    assert out["memory_peak"] == 12_582_912
    assert out["pids_current"] == 3
    assert out["cpu_pressure"]["some"] == {"avg10": 0.0, "avg60": 0.0, "avg300": 0.0, "total": 0}
    assert out["missing"] == []
    assert out["deltas"] is None


async def test_deltas_follow_the_files_and_reset_on_recreate(tmp_path: Path) -> None:
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.cpu_stat["usage_usec"] = 1000
    cgroup.write()
    probe = probe_for(cgroup.path)
    await read_one(probe, CTX)
    cgroup.memory_events["oom"] += 1
    cgroup.memory_events["oom_kill"] += 1
    cgroup.cpu_stat["usage_usec"] += 2500
    cgroup.pids_events["max"] += 3
    cgroup.write()
    deltas = (await read_one(probe, CTX)).output["deltas"]
    assert deltas["reset"] is False
    assert deltas["memory_events"]["oom"] == 1
    assert deltas["memory_events"]["oom_kill"] == 1
    assert deltas["memory_events"]["max"] == 0
    assert deltas["cpu_stat"]["usage_usec"] == 2500
    assert deltas["pids_events"] == {"max": 3}

    # the cgroup is removed and created again: a new directory, counters from zero
    for name in os.listdir(cgroup.path):
        os.unlink(cgroup.path / name)
    cgroup.path.rmdir()
    fresh = FakeCgroup(cgroup.path)
    fresh.cpu_stat["usage_usec"] = 7
    fresh.write()
    deltas = (await read_one(probe, CTX)).output["deltas"]
    assert deltas["reset"] is True
    assert deltas["cpu_stat"]["usage_usec"] == 7


async def test_files_the_kernel_does_not_offer_are_listed_missing(tmp_path: Path) -> None:
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.write()
    for name in ("memory.events", "memory.current", "memory.peak", "memory.pressure"):
        os.unlink(cgroup.path / name)
    reading = await read_one(probe_for(cgroup.path), CTX)
    assert reading.output["missing"] == [
        "memory.events", "memory.current", "memory.peak", "memory.pressure",
    ]  # fmt: skip
    assert "memory_events" not in reading.output
    assert "memory.events" not in reading.inputs["files"]
    assert reading.output["cpu_stat"]["usage_usec"] == 0


async def test_a_missing_directory_is_an_io_error(tmp_path: Path) -> None:
    with pytest.raises(ProbeIoError, match="cgroup directory does not exist: cell-9"):
        await read_one(probe_for(tmp_path / "nope", "cell-9"), CTX)


async def test_a_symlinked_file_is_refused_and_its_target_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("usage_usec 424242\n")
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.write()
    os.unlink(cgroup.path / "cpu.stat")
    os.symlink(secret, cgroup.path / "cpu.stat")
    with pytest.raises(ProbeIoError, match=r"cpu\.stat is a symlink") as caught:
        await read_one(probe_for(cgroup.path), CTX)
    assert "424242" not in str(caught.value)


async def test_an_oversized_file_is_a_parse_error(tmp_path: Path) -> None:
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.write()
    (cgroup.path / "cpu.stat").write_text("usage_usec 1\n" * 10_000)
    with pytest.raises(ProbeParseError, match=r"cpu\.stat: larger than 65536 bytes"):
        await read_one(probe_for(cgroup.path), CTX)


@needs_root
async def test_a_real_cgroup_reads_what_the_kernel_counts(real_cgroup: Path) -> None:
    """cpu.stat and PSI of a real cgroup v2 directory, with a process burning CPU in it."""
    probe = probe_for(real_cgroup, real_cgroup.name)
    first = await read_one(probe, CTX)
    assert "cpu.stat" in first.inputs["files"]
    assert first.output["cpu_stat"] == parse_flat_keyed(
        (real_cgroup / "cpu.stat").read_text(), "cpu.stat"
    )
    # controllers this kernel lacks are reported missing, not failed
    for name in first.output["missing"]:
        assert not (real_cgroup / name).exists()
    second = await read_while_burning_cpu(probe, real_cgroup)
    assert second.output["deltas"]["reset"] is False
    after = parse_flat_keyed((real_cgroup / "cpu.stat").read_text(), "cpu.stat")
    assert after["usage_usec"] >= second.output["cpu_stat"]["usage_usec"] > 10_000


def held_paths() -> set[str]:
    """What this process holds open, by path (a descriptor closing meanwhile is skipped)."""
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            pass
    return paths


def count_path_walks(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    walked: list[Path] = []
    real = open_beneath

    def spy(root: Path, path: Path, flags: int, *, directory: bool = False) -> int:
        walked.append(path)
        return real(root, path, flags, directory=directory)

    monkeypatch.setattr(cgroup_module, "open_beneath", spy)
    return walked


async def test_the_directory_is_walked_to_once_and_again_only_when_it_was_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked = count_path_walks(monkeypatch)
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.write()
    probe = probe_for(cgroup.path)
    for usage in (1, 2, 3):
        cgroup.cpu_stat["usage_usec"] = usage
        cgroup.write()
        assert (await read_one(probe, CTX)).output["cpu_stat"]["usage_usec"] == usage
    assert walked == [cgroup.path]  # the kept descriptor read the new values
    for name in os.listdir(cgroup.path):
        os.unlink(cgroup.path / name)
    cgroup.path.rmdir()
    with pytest.raises(ProbeIoError, match="cgroup directory does not exist: cell-1"):
        await read_one(probe, CTX)
    FakeCgroup(cgroup.path).write()
    assert (await read_one(probe, CTX)).output["deltas"]["reset"] is True
    assert walked == [cgroup.path] * 3


async def test_a_closed_probe_lets_its_descriptor_go_and_reads_nothing(tmp_path: Path) -> None:
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.write()
    probe = probe_for(cgroup.path)
    assert str(cgroup.path) not in held_paths()
    await read_one(probe, CTX)
    assert str(cgroup.path) in held_paths()
    probe.close()
    assert str(cgroup.path) not in held_paths()
    with pytest.raises(ProbeIoError, match="was closed"):
        await read_one(probe, CTX)


async def test_a_reload_that_removes_a_cell_closes_its_cgroup_directory(tmp_path: Path) -> None:
    for cell in ("a", "b"):
        FakeCgroup(tmp_path / cell).write()
    config = load_config(write_config(tmp_path / "c.toml", tmp_path, ["a", "b"]))
    prober = Prober(config, CapturingSink(), SequenceRegistry())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(prober.run_services)
            await prober.tick()
            assert {str(tmp_path / "a"), str(tmp_path / "b")} <= held_paths()
            prober.apply(load_config(write_config(tmp_path / "c.toml", tmp_path, ["a"])))
            await trio.testing.wait_all_tasks_blocked()
            held = held_paths()
            assert str(tmp_path / "a") in held
            assert str(tmp_path / "b") not in held
            nursery.cancel_scope.cancel()
    assert str(tmp_path / "a") not in held_paths()  # stopping closes the rest


@needs_root
async def test_a_real_cgroup_removed_and_made_again_is_found_anew(real_cgroup: Path) -> None:
    probe = probe_for(real_cgroup, real_cgroup.name)
    first = await read_one(probe, CTX)
    assert first.output["deltas"] is None
    await trio.Path(real_cgroup).rmdir()  # the kept descriptor now names a removed kernfs directory
    with pytest.raises(ProbeIoError, match="cgroup directory does not exist"):
        await read_one(probe, CTX)
    await trio.Path(real_cgroup).mkdir()
    again = await read_one(probe, CTX)
    assert again.output["deltas"]["reset"] is True
    assert "cpu.stat" in again.inputs["files"]
    probe.close()


async def read_signalled(probe: CgroupProbe, trigger: str) -> ProbeReading:
    """A reading the kernel's signal asked for, as the daemon's ``read_now`` takes it."""
    results: list[ProbeReading | ProbeError | None] = [None]
    await CgroupProbe.read_batch([(CTX, probe)], results, trigger)
    assert isinstance(results[0], ProbeReading), results[0]
    return results[0]


async def test_a_reading_says_why_and_a_signalled_one_reads_cgroup_events(tmp_path: Path) -> None:
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.write()
    probe = probe_for(cgroup.path)
    tick = await read_one(probe, CTX)
    assert tick.output["trigger"] == "tick"
    # the tick does not read cgroup.events: its changes are signalled
    assert "cgroup_events" not in tick.output
    assert "cgroup.events" not in tick.inputs["files"] + tick.output["missing"]
    # a fixture without it: read, and missing
    signalled = await read_signalled(probe, "memory.events")
    assert signalled.output["trigger"] == "memory.events"
    assert signalled.output["missing"] == ["cgroup.events"]
    populated = []
    for state in (1, 0, 0, 1, 0):
        (cgroup.path / "cgroup.events").write_text(f"populated {state}\nfrozen 0\n")
        reading = await read_signalled(probe, "cgroup.events")
        assert reading.output["cgroup_events"] == {"populated": state, "frozen": 0}
        assert reading.inputs["files"][-1] == "cgroup.events"
        populated.append((state, reading.output.get("final", False)))
        await read_one(probe, CTX)  # a tick between: it says nothing of populated
    # final: the first to see 0 after one that saw 1
    assert populated == [(1, False), (0, True), (0, False), (1, False), (0, True)]
    assert reading.output["deltas"] == {
        "memory_events": dict.fromkeys(cgroup.memory_events, 0),
        "pids_events": {"max": 0},
        "cpu_stat": dict.fromkeys(cgroup.cpu_stat, 0),
        "reset": False,
    }
    # a file not in the kernel's format: a typed error naming it, not a reading
    (cgroup.path / "cgroup.events").write_text("populated\n")
    results: list[ProbeReading | ProbeError | None] = [None]
    await CgroupProbe.read_batch([(CTX, probe)], results, "cgroup.events")
    assert isinstance(results[0], ProbeParseError)
    assert results[0].message == "cgroup.events: line 1: expected 'key value'"


async def test_a_reading_s_json_is_made_with_it_and_is_what_its_event_carries(
    tmp_path: Path,
) -> None:
    """The output is serialised on the worker thread that read it, deltas included;
    the event embeds those bytes, the same as serialising the output there and then."""
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.cpu_stat["usage_usec"] = 1000
    cgroup.write()
    probe = probe_for(cgroup.path)
    sink = CapturingSink()
    sequences = SequenceRegistry()
    for _ in range(2):
        reading = await read_one(probe, CTX)
        assert reading.output_json == orjson.dumps(reading.output)
        event = await emit_reading(sink, CTX, reading, sequences)
        assert orjson.loads(event.to_json())["data"]["output"] == reading.output
        assert event.to_json() == orjson.dumps(event.to_dict())
        cgroup.cpu_stat["usage_usec"] += 250
        cgroup.write()
    assert reading.output["deltas"]["cpu_stat"]["usage_usec"] == 250
    assert b'"usage_usec":250' in sink.events[-1].to_json()


def count_file_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real = cgroup_module._open_file

    def spy(dir_fd: int, name: str) -> int | None:
        opened.append(name)
        return real(dir_fd, name)

    monkeypatch.setattr(cgroup_module, "_open_file", spy)
    return opened


@needs_root
async def test_a_real_cgroup_s_files_are_kept_open_and_read_anew_each_time(
    real_cgroup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On cgroup2 one pread a file a tick: no open after the first read, yet fresh values."""
    opened = count_file_opens(monkeypatch)
    probe = probe_for(real_cgroup, real_cgroup.name)
    first = await read_one(probe, CTX)
    present = first.inputs["files"]
    assert "cpu.stat" in present
    # every name looked for once, and cgroup.controllers (what says when missing ones appear)
    assert sorted(opened) == sorted([name for name, _ in CGROUP_FILES] + ["cgroup.controllers"])
    held = held_paths()
    assert {str(real_cgroup / name) for name in present} <= held
    # cgroup.controllers is kept only while something is missing (to see it appear)
    watching = 1 if first.output["missing"] else 0
    assert probe._directory.held_descriptors() == 1 + len(present) + watching
    opened.clear()
    later = await read_while_burning_cpu(probe, real_cgroup)  # kept descriptors follow it
    assert opened == []  # nothing missing appeared (cgroup.controllers did not change)
    assert later.inputs["files"] == present
    probe.close()
    assert not {path for path in held_paths() if path.startswith(str(real_cgroup))}


async def test_files_of_a_tree_on_a_regular_filesystem_are_opened_anew_each_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fixture tree replaces files by rename: a kept descriptor would read the old one."""
    opened = count_file_opens(monkeypatch)
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.write()
    probe = probe_for(cgroup.path)
    for usage in (5, 6):
        cgroup.cpu_stat["usage_usec"] = usage
        cgroup.write()
        assert (await read_one(probe, CTX)).output["cpu_stat"]["usage_usec"] == usage
    assert len(opened) == 2 * len(CGROUP_FILES)
    assert probe._directory.held_descriptors() == 1


def write_in_place(path: Path, text: str) -> None:
    """As the kernel's files change: the same inode, new contents."""
    with open(path, "r+" if path.exists() else "w") as handle:
        handle.truncate(0)
        handle.write(text)


async def test_kept_files_look_for_missing_ones_again_when_the_controllers_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A controller enabled later (memory, say): its files are read from the next tick on.

    This machine's cgroup2 has no controller to enable, so the kept-files path
    runs here on a tree written in place as kernfs would change it.
    """
    monkeypatch.setattr(cgroup_module, "is_cgroup2", lambda fd: True)
    path = tmp_path / "cell-1"
    path.mkdir()
    write_in_place(path / "cgroup.controllers", "cpu io\n")
    write_in_place(path / "cpu.stat", "usage_usec 10\nuser_usec 6\nsystem_usec 4\n")
    probe = probe_for(path)
    first = await read_one(probe, CTX)
    assert first.inputs["files"] == ["cpu.stat"]
    assert "memory.events" in first.output["missing"]
    assert probe._directory.held_descriptors() == 3  # the directory, cpu.stat, cgroup.controllers
    write_in_place(path / "cpu.stat", "usage_usec 25\nuser_usec 15\nsystem_usec 10\n")
    write_in_place(path / "memory.current", "4096\n")
    second = await read_one(probe, CTX)  # the kept descriptor: the new text, same file
    assert second.output["deltas"]["cpu_stat"]["usage_usec"] == 15
    assert second.inputs["files"] == ["cpu.stat"]  # controllers unchanged: not looked for
    write_in_place(path / "cgroup.controllers", "cpu io memory\n")
    third = await read_one(probe, CTX)
    assert third.inputs["files"] == ["cpu.stat", "memory.current"]
    assert third.output["memory_current"] == 4096
    assert "memory.current" not in third.output["missing"]
    assert third.output["deltas"]["reset"] is False  # the same cgroup: baselines kept
    probe.close()
    assert probe._directory.held_descriptors() == 0


@needs_root
async def test_kept_files_stay_within_the_room_the_open_file_limit_leaves(
    real_cgroup: Path,
) -> None:
    """Kept descriptors are an optimisation: without room a cgroup is read by opening."""
    budget = DescriptorBudget(limit=KEPT_PER_CELL)  # room for one cell's files
    shared = CgroupShared(BATCHER, budget)
    first = CgroupProbe(CgroupProbeConfig("a", real_cgroup), shared)
    second = CgroupProbe(CgroupProbeConfig("b", real_cgroup), shared)
    reading_a = await read_one(first, CTX)
    reading_b = await read_one(second, CTX)
    assert reading_a.output["cpu_stat"].keys() == reading_b.output["cpu_stat"].keys()
    assert reading_a.inputs["files"] == reading_b.inputs["files"]
    kept = 1 + len(reading_a.inputs["files"]) + (1 if reading_a.output["missing"] else 0)
    assert first._directory.held_descriptors() == kept
    assert second._directory.held_descriptors() == 1  # no room: opened at each read
    assert budget.used == KEPT_PER_CELL
    first.close()
    assert budget.used == 0
    await read_one(second, CTX)
    assert second._directory.held_descriptors() == kept  # the room given back is taken
    budget.limit = 0  # a reload added cells: their sockets need the room
    await read_one(second, CTX)
    assert second._directory.held_descriptors() == 1
    assert budget.used == 0
    second.close()


def test_the_kept_room_per_cell_is_what_a_cgroup_keeps() -> None:
    assert len(CGROUP_FILES) + 1 == KEPT_PER_CELL  # its files and cgroup.controllers


async def test_cgroups_are_opened_before_the_first_tick_and_not_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prober.prepare walks to every cell's directory; the first tick reads, walks none,
    and its readings are first readings (no baseline moved); a missing one is the tick's
    to report."""
    walked = count_path_walks(monkeypatch)
    for cell in ("a", "b"):
        FakeCgroup(tmp_path / cell).write()
    config = load_config(write_config(tmp_path / "c.toml", tmp_path, ["a", "b", "gone"]))
    sink = CapturingSink()
    prober = Prober(config, sink, SequenceRegistry())
    with trio.fail_after(10):
        await prober.prepare()
        assert sorted(walked) == sorted(tmp_path / cell for cell in ("a", "b", "gone"))
        assert {str(tmp_path / "a"), str(tmp_path / "b")} <= held_paths()
        assert sink.events == []
        await prober.tick()
    assert len(walked) == 4  # only the missing one is looked for again
    by_cell = {event.data["cellId"]: event for event in sink.events}
    assert by_cell["a"].data["output"]["deltas"] is None
    assert by_cell["a"].cellosseq == 1
    assert by_cell["gone"].kind == "probe_error"
    assert "does not exist" in by_cell["gone"].data["error"]["message"]
    for runner in prober.cells.values():
        for probe in runner.probes:
            probe.close()  # type: ignore[attr-defined]


async def test_a_cell_added_by_a_reload_has_its_cgroup_opened_before_its_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked = count_path_walks(monkeypatch)
    for cell in ("a", "b"):
        FakeCgroup(tmp_path / cell).write()
    config = load_config(write_config(tmp_path / "c.toml", tmp_path, ["a"]))
    prober = Prober(config, CapturingSink(), SequenceRegistry())
    prepared = trio.Event()
    real_prepare = prober.prepare

    async def prepare_then_tell(
        runners: list[Cell] | None = None, *, while_ticking: bool = False
    ) -> None:
        assert while_ticking  # probes that must not overlap a tick are left to it
        await real_prepare(runners, while_ticking=while_ticking)
        prepared.set()

    monkeypatch.setattr(prober, "prepare", prepare_then_tell)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(prober.run_services)
            prober.apply(load_config(write_config(tmp_path / "c.toml", tmp_path, ["a", "b"])))
            await prepared.wait()  # in the background, with no tick run
            assert walked == [tmp_path / "b"]  # the new cell only
            assert str(tmp_path / "b") in held_paths()
            nursery.cancel_scope.cancel()


async def test_a_kept_file_whose_controller_went_is_missing_from_the_next_reading_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kernfs says ENODEV when a kept file's controller is disabled (memory, say): the
    directory is looked at again, the file reported missing, the baselines kept.

    No controller can be disabled on this machine's cgroup2: the tree is changed in
    place and the read of the removed file says ENODEV as kernfs would.
    """
    monkeypatch.setattr(cgroup_module, "is_cgroup2", lambda fd: True)
    cgroup = FakeCgroup(tmp_path / "cell-1")
    cgroup.write()
    write_in_place(cgroup.path / "cgroup.controllers", "cpu memory pids\n")
    probe = probe_for(cgroup.path)
    first = await read_one(probe, CTX)
    assert first.output["missing"] == []
    # nothing missing: cgroup.controllers is not kept (nothing to watch for)
    assert probe._directory.held_descriptors() == 1 + len(CGROUP_FILES)
    removed = os.stat(cgroup.path / "memory.current")
    (cgroup.path / "memory.current").unlink()
    write_in_place(cgroup.path / "cgroup.controllers", "cpu pids\n")
    cgroup.cpu_stat["usage_usec"] += 20
    write_in_place(
        cgroup.path / "cpu.stat", "".join(f"{k} {v}\n" for k, v in cgroup.cpu_stat.items())
    )
    real_pread = os.pread

    def pread_as_kernfs(fd: int, size: int, offset: int) -> bytes:
        stat = os.fstat(fd)
        if (stat.st_dev, stat.st_ino) == (removed.st_dev, removed.st_ino):
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", pread_as_kernfs)  # as the probe calls it
    second = await read_one(probe, CTX)
    assert "memory.current" not in second.inputs["files"]
    assert second.output["missing"] == ["memory.current"]
    assert second.output["deltas"]["reset"] is False  # the same cgroup
    assert second.output["deltas"]["cpu_stat"]["usage_usec"] == 20
    # the others kept again, and cgroup.controllers now, to see memory come back
    assert probe._directory.held_descriptors() == 1 + len(CGROUP_FILES) - 1 + 1
    probe.close()


@needs_root
async def test_an_operator_may_have_cgroup_files_opened_at_each_read_instead(
    real_cgroup: Path, tmp_path: Path
) -> None:
    """``keep_cgroup_files = false``: no file kept (kernel memory over CPU); a reload
    to it lets kept ones go at the next read, and back again keeps them."""
    cell = real_cgroup / "a"
    cell.mkdir()
    try:
        path = write_config(tmp_path / "c.toml", real_cgroup, ["a"])
        keeping = load_config(path)
        text = path.read_text().replace("[daemon]\n", "[daemon]\nkeep_cgroup_files = false\n")
        path.write_text(text)
        not_keeping = load_config(path)
        assert not_keeping.daemon.keep_cgroup_files is False
        prober = Prober(not_keeping, CapturingSink(), SequenceRegistry())
        (probe,) = prober.cells["a"].probes
        assert isinstance(probe, CgroupProbe)
        with trio.fail_after(10):
            await prober.tick()
            assert probe._directory.held_descriptors() == 1  # the directory only
            prober.apply(keeping)  # the same cell: its probe (and directory) stay
            await prober.tick()
            assert probe._directory.held_descriptors() > 1 + 1
            prober.apply(not_keeping)
            await prober.tick()
            assert probe._directory.held_descriptors() == 1
            assert prober.services.kept_descriptors.used == 0
        probe.close()
    finally:
        cell.rmdir()


async def test_without_cgroup_controllers_only_the_missing_files_are_looked_for_each_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing says when a controller comes: each read looks for the missing names only
    (the kept ones are not opened again), and reads one the moment it appears."""
    monkeypatch.setattr(cgroup_module, "is_cgroup2", lambda fd: True)
    path = tmp_path / "cell-1"
    path.mkdir()
    write_in_place(path / "cpu.stat", "usage_usec 10\nuser_usec 6\nsystem_usec 4\n")
    probe = probe_for(path)
    first = await read_one(probe, CTX)
    missing = first.output["missing"]
    assert first.inputs["files"] == ["cpu.stat"]
    opened = count_file_opens(monkeypatch)
    await read_one(probe, CTX)
    assert opened == missing  # cpu.stat stays open: only the absent ones are tried
    write_in_place(path / "pids.current", "3\n")
    third = await read_one(probe, CTX)
    assert third.inputs["files"] == ["cpu.stat", "pids.current"]
    assert third.output["pids_current"] == 3
    probe.close()
