"""glibc's allocator, told what a long-running threaded daemon needs. No-ops elsewhere.

Readings of a thousand cells pass through several threads a tick (worker
threads, namespace threads, the NATS thread). glibc gives each thread that
allocates its own arena (up to eight per core), and memory freed in one
arena is not reused by another: resident memory then creeps up over hours
though nothing is held. Two arenas, and handing freed pages back to the
kernel now and then (``malloc_trim``), keep it flat; the cost is a little
contention on allocation and a few milliseconds a minute.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Final

#: mallopt's parameter number for the arena limit (malloc.h: M_ARENA_MAX)
M_ARENA_MAX: Final = -8
ARENAS: Final = 2

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


def trim() -> bool:
    """Give freed heap pages back to the kernel; True if any were."""
    if _libc is None:
        return False
    return bool(_libc.malloc_trim(0))
