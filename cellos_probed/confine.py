"""Open configured paths without ever leaving their root.

The config loader already refuses paths that are not under their ``[paths]``
root, but a path that is fine on paper can still escape at open time
through a symlink planted in a watched directory (a cell's supervisor, or a
compromised jailer, may own those directories). So every open walks the path
one component at a time from a descriptor of the root, each step with
``O_NOFOLLOW``: a symlink anywhere below the root is refused, not followed.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from pathlib import Path


class EscapeError(OSError):
    """A component of the path is a symlink: following it could leave the root."""


@functools.lru_cache(maxsize=65536)
def _relative_parts(root: Path, path: Path) -> tuple[str, ...]:
    # cached: the same few thousand configured paths are opened every tick
    relative = path.relative_to(root)  # ValueError if not under root: a config bug
    parts = [part for part in relative.parts if part not in ("", ".")]
    if ".." in parts:
        raise EscapeError(errno.EXDEV, f"'..' in a confined path: {path}")
    return tuple(parts)


def open_beneath(root: Path, path: Path, flags: int, *, directory: bool = False) -> int:
    """``os.open(path, flags)`` but refusing any symlink between ``root`` and ``path``.

    Raises ``FileNotFoundError``, ``PermissionError`` and friends as ``open``
    would, and :class:`EscapeError` for a symlink below the root.
    """
    parts = _relative_parts(root, path)
    final_flags = flags | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    if not parts:
        return os.open(root, final_flags)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            step = final_flags if last else os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            try:
                next_fd = os.open(part, step | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                # a symlink: ELOOP for the last component; ENOTDIR for a
                # directory step (O_DIRECTORY | O_NOFOLLOW on a symlink)
                if exc.errno == errno.ELOOP or (
                    exc.errno == errno.ENOTDIR and _is_symlink(fd, part)
                ):
                    raise EscapeError(
                        errno.ELOOP, f"refusing to follow a symlink at {part!r}"
                    ) from None
                raise
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
