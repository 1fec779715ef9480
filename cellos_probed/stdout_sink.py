"""Events as JSON lines on stdout: the ``once`` command's sink."""

from __future__ import annotations

import sys
from typing import TextIO

from cellos_probed.cloudevent import CloudEvent


class StdoutSink:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout

    async def emit(self, event: CloudEvent) -> None:
        # one short write per event; `once` prints a handful of lines and exits
        self._stream.write(event.to_json().decode() + "\n")
        self._stream.flush()
