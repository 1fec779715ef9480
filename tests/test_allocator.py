"""The allocator settings for a long-running threaded daemon (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from cellos_probed import allocator


def fresh_python(code: str, *args: str) -> str:
    """``code`` run in a new interpreter (allocator settings are per process); its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout


glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt and malloc_trim are glibc's"
)


@glibc_only
def test_arenas_are_capped_before_threads_start() -> None:
    # in a fresh process: many threads allocating stay within the cap
    code = (
        "import threading\n"
        "from cellos_probed import allocator\n"
        "assert allocator.limit_arenas(2)\n"
        "def work():\n"
        "    blobs = [bytes(4096) * 4 for _ in range(2000)]\n"
        "threads = [threading.Thread(target=work) for _ in range(12)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "import ctypes\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.malloc_stats()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    arenas = result.stderr.count("Arena ")
    assert 1 <= arenas <= 2, result.stderr


@glibc_only
def test_trim_hands_freed_memory_back() -> None:
    blobs = [bytearray(200_000) for _ in range(200)]  # ~40 MB, mmap'd or heap
    del blobs
    assert isinstance(allocator.trim(), bool)


@glibc_only
def test_big_blocks_stay_mapped_after_a_bigger_one_was_freed() -> None:
    # glibc's default raises the mmap threshold when a mapped block is freed:
    # later big blocks then come from the heap and fragment it
    code = (
        "import sys\n"
        "from cellos_probed import allocator\n"
        "if sys.argv[1] == 'fixed':\n"
        "    assert allocator.fix_mmap_threshold()\n"
        "big = bytearray(4 << 20); del big\n"
        "held = [bytearray(600 << 10) for _ in range(20)]\n"
        "print(allocator.heap_info().hblkhd)\n"
    )

    def mapped_bytes(mode: str) -> int:
        return int(fresh_python(code, mode))

    assert mapped_bytes("fixed") >= 20 * 600 << 10
    assert mapped_bytes("default") < 600 << 10  # what the fixed threshold prevents


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


@glibc_only
def test_the_heap_top_freed_by_a_tick_is_kept_for_the_next() -> None:
    # a tick's payloads are freed together at the heap's top: handed back at
    # once (glibc's default), the next tick faults every page in again
    code = (
        "import sys\n"
        "from cellos_probed import allocator\n"
        "if sys.argv[1] == 'kept':\n"
        "    assert allocator.keep_heap_top()\n"
        "payloads = [bytearray(13_000) for _ in range(2000)]\n"
        "del payloads\n"
        "print(allocator.free_bytes_held())\n"
    )

    def free_bytes_kept(mode: str) -> int:
        return int(fresh_python(code, mode))

    assert free_bytes_kept("kept") >= 20_000_000
    assert free_bytes_kept("default") < 2_000_000


@glibc_only
def test_memory_a_burst_left_goes_back_and_a_ticks_worth_stays() -> None:
    # a burst (an outbox filled while NATS was away) freed with holes in the
    # heap: more than the limit is held, so it is handed back; a tick's worth is not
    code = (
        "import sys\n"
        "from cellos_probed import allocator\n"
        "allocator.configure()\n"
        "burst = [bytearray(13_000) for _ in range(int(sys.argv[1]))]\n"
        "pins = burst[::50]\n"  # live blocks keep the freed ones from being the heap's top
        "del burst\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "held, before = allocator.free_bytes_held(), rss()\n"
        "print(held, allocator.trim_if_holding(), before - rss())\n"
    )

    def run(blocks: int) -> tuple[int, bool, int]:
        held, trimmed, released = fresh_python(code, str(blocks)).split()
        return int(held), trimmed == "True", int(released)

    held, trimmed, released = run(20_000)  # ~260 MB, freed
    assert held > allocator.IDLE_BYTES_WORTH_TRIMMING
    assert trimmed
    assert released > 100_000_000  # resident memory really went back
    held, trimmed, released = run(1_000)  # ~13 MB: the next tick's
    assert held < allocator.IDLE_BYTES_WORTH_TRIMMING
    assert not trimmed
    assert abs(released) < 2_000_000


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
