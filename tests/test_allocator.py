"""The heap of a long-running threaded daemon: the unit's glibc tunables, trim, the collector."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cellos_probed import allocator
from testbed.unit_env import environment_like_the_unit, tunable_values


def fresh_python(code: str, *args: str, unit_tunables: bool) -> subprocess.CompletedProcess[str]:
    """``code`` run in a new interpreter, with or without the unit's GLIBC_TUNABLES.

    glibc reads its tunables once, when a process starts: only a new process shows them.
    """
    if unit_tunables:
        env = environment_like_the_unit()
    else:
        env = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="GLIBC_TUNABLES and malloc_trim are glibc's"
)

#: prints the process's resident bytes (``rss()``) where a snippet needs them
RSS = (
    "def rss():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmRSS:'):\n"
    "            return int(line.split()[1]) * 1024\n"
)


def dynamic_loader() -> Path:
    """The dynamic loader this interpreter was started by (it lists glibc's tunables)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        found = re.search(r"(/\S*/ld-linux[^/\s]*\.so[.\d]*)$", line)
        if found:
            return Path(found.group(1))
    raise AssertionError("no ld-linux mapped in this process")


@glibc_only
def test_every_tunable_the_unit_sets_is_one_this_glibc_knows() -> None:
    # glibc ignores a tunable it does not know, silently: a misspelt name is no setting
    listed = subprocess.run(
        [str(dynamic_loader()), "--list-tunables"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    known = {line.split(":", 1)[0] for line in listed.splitlines()}
    assert set(tunable_values()) <= known
    assert set(tunable_values()) == {
        "glibc.malloc.arena_max", "glibc.malloc.mmap_threshold",
        "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
    }  # fmt: skip


@glibc_only
def test_the_units_tunables_cap_malloc_arenas_at_two() -> None:
    # many threads allocating at once: each would get an arena of its own
    code = (
        "import ctypes, threading\n"
        "start = threading.Barrier(12)\n"
        "def work():\n"
        "    start.wait()\n"
        "    blobs = [bytes(4096) * 4 for _ in range(2000)]\n"
        "threads = [threading.Thread(target=work) for _ in range(12)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "ctypes.CDLL('libc.so.6').malloc_stats()\n"
    )

    def arenas(unit_tunables: bool) -> int:
        return fresh_python(code, unit_tunables=unit_tunables).stderr.count("Arena ")

    assert 1 <= arenas(True) <= 2
    assert arenas(False) > 2  # what the cap prevents


@glibc_only
def test_the_units_tunables_keep_big_blocks_mapped_after_a_bigger_one_was_freed() -> None:
    # glibc's default raises the mmap threshold (128 KiB) when a mapped block is
    # freed: later big blocks then come from the heap and fragment it. Fixed at
    # 64 KiB, blocks of 100 KiB get mappings of their own once the heap's top
    # (up to top_pad spare) has no room left for them.
    code = (
        "from cellos_probed import allocator\n"
        "big = bytearray(4 << 20); del big\n"
        "held = [bytearray(100 << 10) for _ in range(200)]\n"
        "print(allocator.heap_info().hblkhd)\n"
    )

    def mapped_bytes(unit_tunables: bool) -> int:
        return int(fresh_python(code, unit_tunables=unit_tunables).stdout)

    top_spare = tunable_values()["glibc.malloc.top_pad"] + (1 << 20)
    assert mapped_bytes(True) >= 200 * (100 << 10) - top_spare
    assert mapped_bytes(False) < 2 << 20  # what the fixed threshold prevents


@glibc_only
def test_the_units_tunables_keep_the_heap_top_a_tick_freed_for_the_next() -> None:
    # a tick's payloads are freed together at the heap's top: handed back at
    # once (glibc's default), the next tick faults every page in again
    code = (
        "from cellos_probed import allocator\n"
        "payloads = [bytearray(13_000) for _ in range(2000)]\n"
        "del payloads\n"
        "print(allocator.free_bytes_held())\n"
    )

    def free_bytes_kept(unit_tunables: bool) -> int:
        return int(fresh_python(code, unit_tunables=unit_tunables).stdout)

    assert free_bytes_kept(True) >= 20_000_000
    assert free_bytes_kept(False) < 2_000_000


def test_a_burst_is_twice_the_heap_top_the_unit_keeps() -> None:
    # trim_if_holding must leave a tick's kept top alone: its limit follows the unit
    kept_top = tunable_values()["glibc.malloc.trim_threshold"]
    assert 2 * kept_top == allocator.IDLE_BYTES_WORTH_TRIMMING


@glibc_only
def test_trim_hands_the_kept_heap_top_back() -> None:
    code = (
        RSS + "from cellos_probed import allocator\n"
        "payloads = [bytearray(13_000) for _ in range(3000)]\n"  # ~39 MB on the heap
        "del payloads\n"
        "before = rss()\n"
        "first = allocator.trim()\n"
        "print(first, before - rss(), allocator.free_bytes_held())\n"
    )
    first, released, held = fresh_python(code, unit_tunables=True).stdout.split()
    assert first == "True"
    assert int(released) > 30_000_000
    assert int(held) < 1_000_000


@glibc_only
def test_memory_a_burst_left_goes_back_and_a_ticks_worth_stays() -> None:
    # a burst (an outbox filled while NATS was away) freed with holes in the
    # heap: more than the limit is held, so it is handed back; a tick's worth is not
    code = (
        RSS + "import sys\n"
        "from cellos_probed import allocator\n"
        "burst = [bytearray(13_000) for _ in range(int(sys.argv[1]))]\n"
        "pins = burst[::50]\n"  # live blocks keep the freed ones from being the heap's top
        "del burst\n"
        "held, before = allocator.free_bytes_held(), rss()\n"
        "print(held, allocator.trim_if_holding(), before - rss())\n"
    )

    def run(blocks: int) -> tuple[int, bool, int]:
        out = fresh_python(code, str(blocks), unit_tunables=True).stdout
        held, trimmed, released = out.split()
        return int(held), trimmed == "True", int(released)

    held, trimmed, released = run(20_000)  # ~260 MB, freed
    assert held > allocator.IDLE_BYTES_WORTH_TRIMMING
    assert trimmed
    assert released > 100_000_000  # resident memory really went back
    held, trimmed, released = run(1_000)  # ~13 MB: the next tick's
    assert held < allocator.IDLE_BYTES_WORTH_TRIMMING
    assert not trimmed
    assert abs(released) < 2_000_000


def test_settling_freezes_what_lives_and_thaws_it_again() -> None:
    import gc

    try:
        kept = [{"cell": i} for i in range(1000)]
        frozen = allocator.settle_long_lived()
        assert frozen >= len(kept)
        assert gc.get_freeze_count() == frozen
        # a cycle made after settling is still collected
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
        # settling again thaws first: what died meanwhile is not kept frozen
        del kept
        assert allocator.settle_long_lived() < frozen
    finally:
        gc.unfreeze()


def test_the_young_generation_is_collected_less_often() -> None:
    import gc

    before = gc.get_threshold()
    try:
        allocator.tune_collector()
        assert gc.get_threshold() == (allocator.YOUNG_COLLECTION_EVERY, *before[1:])
    finally:
        gc.set_threshold(*before)


def test_collections_by_ticks_take_the_generations_in_turn_and_free_cycles() -> None:
    import gc
    import weakref

    before = gc.get_threshold()
    seen: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    class Node:
        pass

    gc.callbacks.append(record)
    try:
        allocator.collect_by_ticks()
        assert gc.get_threshold() == (allocator.BURST_COLLECTION_EVERY, *before[1:])
        generations = [allocator.collect_after_tick(tick) for tick in (1, 2, 10, 11, 100)]
        assert generations == [0, 0, 1, 0, 2]
        assert seen == generations  # exactly one collection each, of that generation
        # a cycle made during a tick is gone at the tick's end
        node = Node()
        node.self = node  # type: ignore[attr-defined]
        alive = weakref.ref(node)
        del node
        assert alive() is not None
        allocator.collect_after_tick(3)
        assert alive() is None
    finally:
        gc.callbacks.remove(record)
        gc.set_threshold(*before)
