"""The round of API exchanges: what a deadline means."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from cellos_probed.probes import ProbeError
from cellos_probed.probes.fc_api import ApiConnection
from cellos_probed.probes.fc_exchange import LAST_CALL_SECONDS, run_round
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


class Slow(Flush):
    """An answer that takes the round's thread ``seconds`` to handle (a busy host)."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        super().__init__(sock)
        self.seconds = seconds

    def answered(self, response: ApiResponse, *, last_call: bool = False) -> bytes | None:
        time.sleep(self.seconds)
        return super().answered(response, last_call=last_call)


@contextmanager
def answered_slowly(count: int, seconds: float = 0.005) -> Iterator[list[Slow]]:
    """``count`` exchanges whose VMMs have all answered, each ``seconds`` to handle."""
    pairs = [socket.socketpair() for _ in range(count)]
    try:
        exchanges = []
        for ours, vmm in pairs:
            vmm.sendall(NO_CONTENT)
            exchanges.append(Slow(ours, seconds))
        yield exchanges
    finally:
        for ours, vmm in pairs:
            ours.close()
            vmm.close()


def test_answers_are_taken_past_the_deadline_only_for_the_last_call_s_time() -> None:
    """Every VMM answered in time, but handling each takes 5 ms: the round takes
    what it can in LAST_CALL_SECONDS and hands back; the rest are owed (timeouts)."""
    with answered_slowly(40) as exchanges:
        started = time.monotonic()
        run_round(exchanges, deadline=started - 1.0)
        took = time.monotonic() - started
        taken = [e for e in exchanges if e.answers]
        assert took < LAST_CALL_SECONDS + 0.05  # not 40 x 5 ms
        assert 1 <= len(taken) <= LAST_CALL_SECONDS / 0.005 + 1
        assert all(e.answers == [(204, True)] for e in taken)
        assert all(e.connection.owed == 1 for e in exchanges if not e.answers)


def test_a_busy_round_stops_handling_answers_at_its_deadline() -> None:
    """Answers keep coming while the thread is busy: the round stops at its deadline
    (and the last call's time), not when the last answer is handled."""
    with answered_slowly(60) as exchanges:
        started = time.monotonic()
        run_round(exchanges, deadline=started + 0.05)
        took = time.monotonic() - started
        assert took < 0.05 + LAST_CALL_SECONDS + 0.05  # not 60 x 5 ms = 0.3 s
        assert 0 < sum(1 for e in exchanges if e.answers) < len(exchanges)
