"""atheris targets for the nftables, Firecracker-metrics and API-answer parsers."""

from __future__ import annotations

from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from cellos_probed.probes import ProbeParseError
    from cellos_probed.probes.fc_http import parse_response
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
    """What the API client's answer parser makes of any bytes on the socket."""
    for at_eof in (False, True):
        try:
            parse_response(data, at_eof=at_eof)
        except ProbeParseError:
            pass  # the documented refusal


TARGETS: dict[str, Callable[[bytes], None]] = {
    "nftables": nftables,
    "fc_lines": fc_lines,
    "http_answers": http_answers,
}
