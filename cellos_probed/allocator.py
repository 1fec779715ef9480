"""The heap of a long-running threaded daemon: glibc's allocator and Python's collector.

Readings of a thousand cells pass through several threads a tick (worker
threads, namespace threads, the NATS thread). glibc gives each thread that
allocates its own arena (up to eight per core), and memory freed in one
arena is not reused by another: resident memory then creeps up over hours
though nothing is held. Two arenas keep it flat; the cost is a little
contention on allocation.

glibc also raises its mmap threshold each time a large mmap'd block is
freed (up to 32 MiB): after the first big publish buffer, every later one
comes from the heap, and a tick's megabytes of payloads and buffers leave
it fragmented, so resident memory swung by 40 MiB between trims at a
thousand cells. A fixed threshold keeps big buffers in their own mappings,
returned whole when freed (measured: the swings went, RSS stayed on a
plateau; bench/results/scale-soak.md).

A tick's events (13 KB each for a Firecracker reading, a thousand of
them held until published) are freed together at the heap's top, and glibc
handed that back to the kernel at once (past 128 KiB): the next tick took
it again page by page, each page faulted in and zeroed. Serialising one
such event cost 6.5 us instead of 0.8 (measured). The top is kept up to
TRIM_THRESHOLD_BYTES; a check a minute hands back what a burst left
(``trim_if_holding``).

Python's cyclic collector walks every container object it tracks: at a
thousand cells that is ~160,000 long-lived ones (each cell's tasks, cancel
scopes, connections, baselines), walked again and again while a tick makes
and frees a hundred thousand short-lived dicts, which reference counting
alone frees. perf put 14 % of the daemon's CPU in the collector. So once the
cells' state is built (after the first tick, and again after a reload),
what exists is moved out of the collector's sight (``gc.freeze``), and the
youngest generation is collected every 10,000 allocations rather than 700.
Cycles still get collected; only the long-lived objects are not re-walked.
(100,000, above a tick's peak of live young objects, saved ~4 % of CPU,
but a 10-minute soak then crept +18 % with no plateau where 10,000 stays
flat: measured, not yet explained; cyclic garbage held ten times longer is
the suspect.)

Even so, two or three young collections fell inside every tick at a
thousand cells, each walking the tick's live readings and events (~6 ms
of CPU a tick, measured with ``gc.callbacks``), and found nothing to free:
the tick's objects die by reference counting. The daemon therefore
collects the young generation once per tick, at its end, when the tick's
objects are gone (``collect_after_tick``); the automatic threshold is then
raised to catch only a burst between ticks. Cyclic garbage still lives at
most one tick.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Final

#: mallopt's parameter number for the arena limit (malloc.h: M_ARENA_MAX)
M_ARENA_MAX: Final = -8
#: mallopt's parameter numbers (malloc.h): heap top kept on free, padding on growth, mmap threshold
M_TRIM_THRESHOLD: Final = -1
M_TOP_PAD: Final = -2
M_MMAP_THRESHOLD: Final = -3
ARENAS: Final = 2
#: blocks at least this big get a mapping of their own; setting it stops the dynamic raise
MMAP_THRESHOLD_BYTES: Final = 64 * 1024
#: free memory at the heap's top kept rather than handed back at once (glibc: 128 KiB)
TRIM_THRESHOLD_BYTES: Final = 64 * 1024 * 1024
#: extra asked of the kernel each time the heap grows (glibc: 128 KiB)
TOP_PAD_BYTES: Final = 8 * 1024 * 1024

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.mallopt  # noqa: B018 - glibc only: musl and others have no mallopt
    _libc.malloc_trim  # noqa: B018
except (OSError, AttributeError):
    _libc = None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas; call before threads start. False if not glibc."""
    if _libc is None:
        return False
    return bool(_libc.mallopt(M_ARENA_MAX, arenas))


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve blocks of ``threshold`` bytes or more by mmap, always. False if not glibc."""
    if _libc is None:
        return False
    return bool(_libc.mallopt(M_MMAP_THRESHOLD, threshold))


def keep_heap_top(threshold: int = TRIM_THRESHOLD_BYTES, pad: int = TOP_PAD_BYTES) -> bool:
    """Keep up to ``threshold`` bytes freed at the heap's top (``trim`` returns them)."""
    if _libc is None:
        return False
    return bool(_libc.mallopt(M_TRIM_THRESHOLD, threshold)) and bool(_libc.mallopt(M_TOP_PAD, pad))


def configure() -> bool:
    """What a long-running daemon wants of the allocator; before any thread starts."""
    tune_collector()
    return limit_arenas() and fix_mmap_threshold() and keep_heap_top()


#: free memory held beyond this (twice what one tick at a thousand cells frees) is given back
IDLE_BYTES_WORTH_TRIMMING: Final = 2 * TRIM_THRESHOLD_BYTES

#: allocations between collections of the youngest generation (Python's default: 700)
YOUNG_COLLECTION_EVERY: Final = 10_000


def tune_collector(young: int = YOUNG_COLLECTION_EVERY) -> None:
    """Collect the youngest generation less often; the older ones as Python does."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)


#: with collections at each tick's end, the automatic one only catches a burst between ticks
BURST_COLLECTION_EVERY: Final = 200_000
#: ticks between collections of the middle and of the oldest generation
MIDDLE_EVERY_TICKS: Final = 10
OLDEST_EVERY_TICKS: Final = 100


def collect_by_ticks() -> None:
    """The tick loop collects from now on (collect_after_tick); the threshold is a backstop."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(BURST_COLLECTION_EVERY, middle, old)


def collect_after_tick(tick: int) -> int:
    """The young generation at the end of tick ``tick`` (the middle one every tenth
    tick, all of them every hundredth); the generation collected."""
    generation = 2 if tick % OLDEST_EVERY_TICKS == 0 else 1 if tick % MIDDLE_EVERY_TICKS == 0 else 0
    gc.collect(generation)
    return generation


def settle_long_lived() -> int:
    """Collect, then keep what survives out of later collections; the objects kept.

    Objects frozen earlier are thawed first, so state dropped since (a cell
    a reload removed) is collected rather than kept forever.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def trim() -> bool:
    """Give freed heap pages back to the kernel; True if any were."""
    if _libc is None:
        return False
    return bool(_libc.malloc_trim(0))


class HeapInfo(ctypes.Structure):
    """glibc's ``struct mallinfo2``: what the allocator holds, in bytes."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


_mallinfo2 = getattr(_libc, "mallinfo2", None)  # glibc 2.33 and later
if _mallinfo2 is not None:
    _mallinfo2.restype = HeapInfo


def heap_info() -> HeapInfo | None:
    """What the allocator holds now (``hblkhd``: mapped, ``fordblks``: free); None off glibc."""
    return None if _mallinfo2 is None else _mallinfo2()


def free_bytes_held() -> int | None:
    """Bytes the allocator holds free (not handed back); None where glibc cannot say."""
    info = heap_info()
    return None if info is None else int(info.fordblks)


def trim_if_holding(more_than: int = IDLE_BYTES_WORTH_TRIMMING) -> bool:
    """Trim only when the allocator holds more than ``more_than`` bytes free.

    In steady state the free memory is the next tick's: trimming it only to
    fault it in again cost CPU and shuffled the heap (RSS settled higher
    after each trim, measured). After a burst (an outbox filled during a
    NATS outage, then drained) the free memory is far more: that goes back.
    """
    held = free_bytes_held()
    if held is not None and held <= more_than:
        return False
    return trim()
