"""Network namespaces and TAP devices, made with iproute2, as a Firecracker host has them.

Every context manager here removes what it made, also when the body
raises. A TAP made with ``ip tuntap add`` has no carrier until a process
attaches to it through ``/dev/net/tun`` (``TUNSETIFF``), as a Firecracker
VMM does; :func:`attached_tap` is that process's side, and closing its
descriptor takes the carrier down again.

Namespaces are named as ``ip netns`` names them (files under
:data:`NETNS_DIR`); ``netns=None`` is the host's namespace. Needs root.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import struct
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from cellos_probed.netns import NetnsPath, enter_netns

NETNS_DIR: Final = Path("/var/run/netns")

# linux/if_tun.h
TUNSETIFF: Final = 0x400454CA
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
#: what Firecracker passes (src/vmm/src/devices/virtio/net/tap.rs)
FIRECRACKER_TAP_FLAGS: Final = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
#: struct ifreq: the name, then the flags (the rest of the union is unused here)
_IFREQ: Final = struct.Struct("16sH22x")

_names = itertools.count()


def unique_name(prefix: str) -> str:
    """A name no other run uses: ``prefix`` + pid + a counter (interface names: at most 15)."""
    name = f"{prefix}{os.getpid()}x{next(_names)}"
    if len(name) > 15:
        raise ValueError(f"{name!r} is longer than an interface name may be")
    return name


def ip(*args: str, netns: str | None = None, check: bool = True, stdin: str | None = None) -> str:
    """Run ``ip [-n netns] args...``; its stdout. A failure raises with ip's own message."""
    command = ["ip"] + (["-n", netns] if netns is not None else []) + list(args)
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result.stdout


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


@contextmanager
def network_namespace(name: str) -> Iterator[Path]:
    """A new network namespace named ``name``; yields its path. Deleted afterwards."""
    ip("netns", "add", name)
    try:
        yield netns_path(name)
    finally:
        ip("netns", "delete", name, check=False)


def create_tap(name: str, netns: str | None = None, *, up: bool = True) -> None:
    ip("tuntap", "add", "dev", name, "mode", "tap", netns=netns)
    if up:
        ip("link", "set", name, "up", netns=netns)


def delete_tap(name: str, netns: str | None = None, *, missing_ok: bool = False) -> None:
    ip("link", "delete", name, netns=netns, check=not missing_ok)


@contextmanager
def tap_device(name: str, netns: str | None = None, *, up: bool = True) -> Iterator[str]:
    """A persistent TAP (administratively up unless ``up=False``), deleted afterwards."""
    create_tap(name, netns, up=up)
    try:
        yield name
    finally:
        delete_tap(name, netns, missing_ok=True)


def set_link(name: str, state: str, netns: str | None = None) -> None:
    """``state`` is ``"up"`` or ``"down"`` (the administrative state)."""
    ip("link", "set", name, state, netns=netns)


def link_details(name: str, netns: str | None = None) -> dict[str, Any]:
    """``ip -j -d link show name``: iproute2's own view, to compare readings with."""
    links: list[dict[str, Any]] = json.loads(ip("-j", "-d", "link", "show", name, netns=netns))
    return links[0]


def open_tap_fd(name: str, netns: str | None = None) -> int:
    """Attach to TAP ``name`` as a VMM does; the returned descriptor holds the carrier up.

    /dev/net/tun resolves the name in the namespace of the thread that opens
    it, so the open happens on a short-lived thread that entered ``netns``;
    the descriptor stays bound to that namespace afterwards.
    """
    result: list[int] = []
    failure: list[BaseException] = []

    def attach() -> None:
        try:
            if netns is not None:
                enter_netns(NetnsPath(NETNS_DIR, netns_path(netns)))
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), FIRECRACKER_TAP_FLAGS))
            except BaseException:
                os.close(fd)
                raise
            result.append(fd)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=attach, name=f"tun-attach:{name}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


@contextmanager
def attached_tap(name: str, netns: str | None = None) -> Iterator[int]:
    """The TAP held open through /dev/net/tun (carrier up) until the block ends."""
    fd = open_tap_fd(name, netns)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def many_taps(netns: str, names: Sequence[str], *, up_every: int = 2) -> Iterator[list[str]]:
    """Many TAPs in one namespace through one ``ip -batch`` (every ``up_every``-th one up)."""
    commands = [f"tuntap add dev {name} mode tap" for name in names]
    commands += [f"link set {name} up" for name in names[::up_every]] if up_every else []
    try:
        ip("-batch", "-", netns=netns, stdin="\n".join(commands) + "\n")
        yield list(names)
    finally:
        ip(
            "-force",
            "-batch",
            "-",
            netns=netns,
            check=False,
            stdin="".join(f"link delete {name}\n" for name in names),
        )
