"""The allocator settings for a long-running threaded daemon (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from cellos_probed import allocator

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
