"""sd_notify(3) over ``$NOTIFY_SOCKET``, with no dependency.

One datagram per notification, newline-separated ``KEY=VALUE``. A path
starting with ``@`` is in the abstract namespace. Silent (and free) when
not started by systemd. The watchdog is honoured only when
``WATCHDOG_PID`` is ours, and pinged only from the tick loop after a tick
completed, so a wedged loop stops the pings and systemd restarts the unit.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("cellos_probed.systemd")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address.startswith("/"):
            self._address = address
        elif address.startswith("@"):
            self._address = "\0" + address[1:]
        self._socket: socket.socket | None = None
        self._failed = False
        self.watchdog_seconds: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6
        self._last_ping = float("-inf")
        self.sent: int = 0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> None:
        if self._address is None:
            return
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
            self.sent += 1
        except OSError as exc:
            if not self._failed:  # say it once; systemd may simply be gone
                log.warning("sd_notify failed", error=exc.strerror)
                self._failed = True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str = "stopping: publishing what was read") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def tick_completed(self, status: str | None = None) -> bool:
        """Ping the watchdog (and refresh STATUS) after a tick; True if a ping went out.

        Pings go at most every quarter of the watchdog interval: often enough
        that the gap stays under half of it while a tick is shorter than a
        quarter, rarely enough not to flood PID 1.
        """
        if self.watchdog_seconds is None:
            return False
        now = time.monotonic()
        if now - self._last_ping < self.watchdog_seconds / 4:
            return False
        self._last_ping = now
        fields = ["WATCHDOG=1"]
        if status is not None:
            fields.append(f"STATUS={status}")
        self.notify(*fields)
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
