"""Many VMs' API exchanges in one blocking loop: requests out, answers in as they come.

A tick asks every VM for a flush (and now and then ``GET /``). A trio task
and cancel scope per VM per request cost ~0.5 ms of the trio thread each,
half a core at a thousand VMs; here one worker thread sends every request,
then waits on one epoll for whichever answer comes next. A VM that does not
answer by the deadline keeps only its own exchange waiting, and its result
is left unset, which the daemon reports as a timeout; answers that did
arrive by then are still taken, however busy the daemon itself was.

A late answer is not a broken connection: the connection is kept and the
answer owed is read (and dropped) first in the next round, so a VMM that is
merely slow costs no reconnect, no ``GET /`` and no lost line; only after
MAX_OWED_ROUNDS rounds without it is the connection given up.
"""

from __future__ import annotations

import select
import time
from collections.abc import Sequence
from typing import Final, Protocol

from cellos_probed.probes import ProbeError, ProbeIoError
from cellos_probed.probes.fc_api import ApiConnection, ConnectionLost
from cellos_probed.probes.fc_http import ApiResponse

#: Rounds a connection may end with an answer outstanding before it is closed.
MAX_OWED_ROUNDS: Final = 3
#: After the deadline, passes over the answers already there (one may come in pieces).
LAST_CALL_PASSES: Final = 3
#: ... for at most this long: at two thousand VMs on a busy host, taking every
#: answer that had arrived kept the first round 0.37 s past its deadline, and
#: the tick past its period (measured). An answer not taken by then is a
#: timeout. Not much shorter: a VMM whose answer is left waiting is asked
#: late the next round too (its owed answer is read first), and with 0.03 s
#: nearly every VMM timed out at 2,000 (measured).
LAST_CALL_SECONDS: Final = 0.15


class Exchange(Protocol):
    """One VM's part of a round; called from the round's thread only."""

    connection: ApiConnection

    def begin(self) -> bytes | None:
        """The first request, or None if there is nothing to ask."""
        ...

    def answered(self, response: ApiResponse, *, last_call: bool) -> bytes | None:
        """The next request, or None: done. ``last_call``: the deadline has passed,
        so no further request will be sent (finish with what is known, or stay unset)."""
        ...

    def failed(self, error: ProbeError) -> None: ...


def run_round(exchanges: Sequence[Exchange], deadline: float) -> None:
    """Drive every exchange until done or ``deadline`` (``time.monotonic``); blocking."""
    poller = select.epoll()
    #: fd -> (exchange, the request in flight (or to send once the owed answer is in), attempt)
    waiting: dict[int, tuple[Exchange, bytes, int]] = {}

    def fail(exchange: Exchange, error: ProbeError) -> None:
        exchange.connection.close()  # never reuse a connection in an unknown state
        exchange.failed(error)

    def start(exchange: Exchange, request: bytes, attempt: int = 1) -> None:
        connection = exchange.connection
        try:
            connection.open()
            if connection.owed:  # the previous round's answer comes first
                fd = connection.fileno()
                waiting[fd] = (exchange, request, attempt)
                poller.register(fd, select.EPOLLIN)
                return
            connection.send(request)
        except ConnectionLost as exc:
            connection.close()
            if attempt == 1:  # the VMM closed the kept-alive connection: a fresh one, once
                start(exchange, request, 2)
            else:
                fail(exchange, ProbeIoError(f"API socket closed the connection: {exc}"))
            return
        except ProbeError as error:
            fail(exchange, error)
            return
        fd = connection.fileno()
        waiting[fd] = (exchange, request, attempt)
        poller.register(fd, select.EPOLLIN)

    def on_readable(fd: int, last_call: bool = False) -> None:
        exchange, request, attempt = waiting[fd]
        connection = exchange.connection
        try:
            response = connection.receive()
        except ConnectionLost as exc:
            del waiting[fd]
            poller.unregister(fd)
            connection.close()
            if last_call:
                return  # too late to ask again: a timeout
            if attempt == 1:
                start(exchange, request, 2)
            else:
                fail(exchange, ProbeIoError(f"API socket closed the connection: {exc}"))
            return
        except ProbeError as error:
            del waiting[fd]
            poller.unregister(fd)
            fail(exchange, error)
            return
        if response is None:
            return
        del waiting[fd]
        poller.unregister(fd)
        if not response.keep_alive:
            connection.close()
        if connection.owed:  # a late answer to an earlier round: dropped, now ask ours
            connection.owed = 0
            if not last_call:
                start(exchange, request, attempt)
            return
        try:
            follow_up = exchange.answered(response, last_call=last_call)
        except ProbeError as error:
            fail(exchange, error)
            return
        if follow_up is not None and not last_call:
            start(exchange, follow_up)

    try:
        for exchange in exchanges:
            try:
                request = exchange.begin()
            except ProbeError as error:
                fail(exchange, error)
                continue
            if request is not None:
                start(exchange, request)
        now = time.monotonic()
        while waiting and now < deadline:
            for fd, _ in poller.poll(deadline - now):
                if fd in waiting:
                    on_readable(fd)
                if time.monotonic() >= deadline:  # a poll's worth can take long to handle
                    break
            now = time.monotonic()
        # The deadline is for the VMMs, not for us: answers that are already
        # here (the daemon was busy, not the VMM) are taken, nothing more asked,
        # for as long as LAST_CALL_SECONDS allows.
        stop = time.monotonic() + LAST_CALL_SECONDS
        for _ in range(LAST_CALL_PASSES):
            ready = [fd for fd, _ in poller.poll(0) if fd in waiting]
            if not ready:
                break
            for fd in ready:
                if time.monotonic() >= stop:
                    break
                on_readable(fd, last_call=True)
    finally:
        for exchange, _, _ in waiting.values():  # unanswered: its result stays unset (a timeout)
            connection = exchange.connection
            connection.owed += 1
            if connection.owed > MAX_OWED_ROUNDS:
                connection.close()  # a wedged VMM: a fresh connection next time
        poller.close()
