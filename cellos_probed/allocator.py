"""The heap of a long-running threaded daemon: glibc's allocator and Python's collector.

glibc's malloc settings (two arenas, a fixed mmap threshold, 64 MiB of freed
heap top kept) are the systemd unit's ``GLIBC_TUNABLES``: glibc reads them
as the process starts. What stays here must be done while the daemon runs:
handing back what a burst left (``trim_if_holding``), and keeping the cyclic
collector off the cells' long-lived objects and out of the tick (frozen once
the cells are built, the young generation collected at each tick's end).
Figures and rejected alternatives: docs/performance.md, "Allocator and collector".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Final

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.malloc_trim  # noqa: B018 - glibc only: musl and others have no malloc_trim
except (OSError, AttributeError):
    _libc = None


#: allocations between collections of the youngest generation (Python's default: 700);
#: a tick makes and frees ~100,000 dicts, which reference counting alone frees
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


#: free memory held beyond this is given back: twice the heap top the unit's
#: glibc.malloc.trim_threshold keeps, which one tick at a thousand cells refills
IDLE_BYTES_WORTH_TRIMMING: Final = 128 * 1024 * 1024


def trim_if_holding(more_than: int = IDLE_BYTES_WORTH_TRIMMING) -> bool:
    """Trim only when the allocator holds more than ``more_than`` bytes free.

    In steady state the free memory is the next tick's: trimming it would
    only have it faulted in again (and left RSS higher after each trim).
    After a burst (an outbox filled during a NATS outage, then drained) the
    free memory is far more: that goes back.
    """
    held = free_bytes_held()
    if held is not None and held <= more_than:
        return False
    return trim()
