"""The round of API exchanges: what a deadline means."""

from __future__ import annotations

import socket
import time

from cellos_probed.probes import ProbeError
from cellos_probed.probes.fc_api import ApiConnection
from cellos_probed.probes.fc_exchange import run_round
from cellos_probed.probes.fc_http import FLUSH_REQUEST, INSTANCE_REQUEST, ApiResponse

NO_CONTENT = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n"


class Flush:
    """Asks for a flush, then (``then_instance``) for ``GET /``."""

    def __init__(self, sock: socket.socket, then_instance: bool = False) -> None:
        self.connection = ApiConnection("/nonexistent")
        sock.setblocking(False)
        self.connection.sock = sock
        self.then_instance = then_instance
        self.answers: list[tuple[int, bool]] = []
        self.error: ProbeError | None = None

    def begin(self) -> bytes | None:
        return FLUSH_REQUEST

    def answered(self, response: ApiResponse, *, last_call: bool = False) -> bytes | None:
        self.answers.append((response.status_code, last_call))
        if self.then_instance and len(self.answers) == 1:
            return INSTANCE_REQUEST
        return None

    def failed(self, error: ProbeError) -> None:
        self.error = error


def test_an_answer_already_there_at_the_deadline_is_taken_not_timed_out() -> None:
    ours, vmm = socket.socketpair()
    with ours, vmm:
        vmm.sendall(NO_CONTENT)  # the VMM answered in time; the daemon was busy elsewhere
        exchange = Flush(ours)
        run_round([exchange], deadline=time.monotonic() - 1.0)
        assert exchange.answers == [(204, True)]
        assert exchange.connection.owed == 0
        assert vmm.recv(4096) == FLUSH_REQUEST


def test_after_the_deadline_nothing_more_is_asked_and_silence_is_owed() -> None:
    ours, vmm = socket.socketpair()
    quiet_ours, quiet_vmm = socket.socketpair()
    with ours, vmm, quiet_ours, quiet_vmm:
        vmm.sendall(NO_CONTENT)
        follows_up = Flush(ours, then_instance=True)
        silent = Flush(quiet_ours)
        run_round([follows_up, silent], deadline=time.monotonic() + 0.2)
        # in time: the flush answered, GET / asked and never answered
        assert follows_up.answers == [(204, False)]
        assert vmm.recv(4096) == FLUSH_REQUEST + INSTANCE_REQUEST
        assert follows_up.connection.owed == 1  # its GET / is still owed
        assert silent.answers == []
        assert silent.connection.owed == 1
        assert silent.connection.sock is not None  # kept for the late answer
