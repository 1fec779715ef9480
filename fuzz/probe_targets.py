"""atheris targets for the nftables, Firecracker-metrics and API-answer parsers."""

from __future__ import annotations

from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    import h11

    from cellos_probed.probes import ProbeParseError
    from cellos_probed.probes.fc_metrics_parse import MetricsAccumulator
    from cellos_probed.probes.nftables_parse import cell_view, parse_table_listing, view_output


def nftables(data: bytes) -> None:
    try:
        snapshot = parse_table_listing(data, "inet", "cellos")
    except ProbeParseError:
        return
    view_output(cell_view(snapshot, tuple(snapshot.counters)[:2], None))


def fc_lines(data: bytes) -> None:
    accumulator = MetricsAccumulator(max_line=8192)
    # the same bytes in two chunkings: a line split anywhere is one line
    cut = len(data) // 2
    accumulator.feed(data[:cut])
    accumulator.feed(data[cut:])
    accumulator.take_reading()


def http_answers(data: bytes) -> None:
    """What the API client's HTTP engine makes of any bytes on the socket."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "localhost")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        for _ in range(64):
            event = conn.next_event()
            if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(
                event, h11.EndOfMessage | h11.ConnectionClosed
            ):
                return
    except h11.RemoteProtocolError:
        return  # fc_api turns this into a ProbeParseError


TARGETS: dict[str, Callable[[bytes], None]] = {
    "nftables": nftables,
    "fc_lines": fc_lines,
    "http_answers": http_answers,
}
