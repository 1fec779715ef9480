"""Where cgroup v2 lives on this host.

A pure v2 host mounts it at ``/sys/fs/cgroup``; a hybrid host (like a
systemd "unified" layout) at ``/sys/fs/cgroup/unified``. Read the mount
table instead of guessing.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Final


def parse_mountinfo_cgroup2(text: str) -> Path | None:
    """The first cgroup2 mount point in ``/proc/self/mountinfo`` text."""
    for line in text.splitlines():
        # fields: id parent major:minor root mountpoint options [optional...] - fstype source super
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype = right.split(" ", 1)[0]
        fields = left.split(" ")
        if fstype == "cgroup2" and len(fields) >= 5:
            return Path(_unescape(fields[4]))
    return None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal \NNN
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1 : i + 4]
        if field[i] == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            return parse_mountinfo_cgroup2(handle.read())
    except OSError:
        return None


#: ``CGROUP2_SUPER_MAGIC`` from ``linux/magic.h``: what ``fstatfs`` says of a cgroup2 file
CGROUP2_SUPER_MAGIC: Final = 0x63677270
_libc = ctypes.CDLL(None, use_errno=True)


def is_cgroup2(fd: int) -> bool:
    """Whether ``fd`` is on a cgroup2 filesystem (kernfs), from ``fstatfs``.

    Python has no ``os.fstatfs``; ``f_type`` is the first field of
    ``struct statfs`` (a ``long`` on 64-bit Linux).
    """
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if _libc.fstatfs(fd, buffer) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    return ctypes.c_long.from_buffer(buffer).value == CGROUP2_SUPER_MAGIC
