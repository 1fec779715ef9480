"""Shared by the fc_metrics tests: a short jail root, configs, a prober, raw HTTP."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import orjson
import trio

from cellos_probed.config import Config, parse_config
from cellos_probed.daemon import Prober
from cellos_probed.probes import CapturingSink
from cellos_probed.probes.fc_metrics import FcMetricsProbe
from testbed.fc_emulator import jail_paths
from testbed.fc_emulator.schema import is_gauge, kind_of_key

#: the host id of the configs made here
HOST = "host-a"


def short_root() -> Iterator[Path]:
    """A jail root short enough for Unix socket paths (108 bytes), removed afterwards.

    Test modules wrap it in their own ``fc_root`` fixture.
    """
    root = Path(tempfile.mkdtemp(prefix="fc", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fc_config(
    root: Path,
    cells: list[str],
    *,
    tick: float = 1.0,
    timeout: float | None = None,
    transport: str = "fifo",
    defaults: str = "",
    cell_table: str = "",
) -> Config:
    """``defaults``: the ``[probes.fc_metrics]`` table's lines; ``cell_table``: lines
    added to every cell's ``[cell.fc_metrics]``."""
    text = f'[daemon]\ntick_seconds = {tick}\nhost_id = "{HOST}"\n'
    if timeout is not None:
        text += f"probe_timeout_seconds = {timeout}\n"
    text += f'[paths]\njail_root = "{root}"\n'
    if defaults:
        text += f"[probes.fc_metrics]\n{defaults}"
    for cell in cells:
        api, metrics = jail_paths(root, cell, transport=transport)
        text += f'[[cell]]\nid = "{cell}"\nrun_id = "run-{cell}"\n'
        text += f'spec_signature_hash = "sha256:{cell}"\n'
        text += f'[cell.fc_metrics]\napi_socket = "{api}"\nmetrics_path = "{metrics}"\n'
        text += cell_table
    return parse_config(text)


def fc_probe(prober: Prober, cell: str) -> FcMetricsProbe:
    probe = prober.cells[cell].probes[0]
    assert isinstance(probe, FcMetricsProbe)
    return probe


def events_of(prober: Prober, cell: str) -> list[dict[str, Any]]:
    """The cell's events as a subscriber decodes them (the sums are JSON fragments)."""
    sink = prober.sink
    assert isinstance(sink, CapturingSink)
    return [
        {"type": event.type.rsplit(".", 1)[1], **orjson.loads(event.to_json())["data"]}
        for event in sink.events
        if event.data.get("cellId") == cell
    ]


def last_output(prober: Prober, cell: str) -> dict[str, Any]:
    event = events_of(prober, cell)[-1]
    assert event["type"] == "fc_metrics", event.get("error")
    output: dict[str, Any] = event["output"]
    return output


def counters_only(totals: dict[str, Any]) -> dict[tuple[str, ...], int]:
    """Every counter leaf of a nested line shape, by path (an absent ``sum_us`` is 0)."""
    leaves: dict[tuple[str, ...], int] = {}
    for key, section in totals.items():
        for name, value in section.items():
            if isinstance(value, dict):
                leaves[(key, name, "sum_us")] = value.get("sum_us", 0)
            elif not is_gauge(kind_of_key(key), name):
                leaves[(key, name)] = value
    return leaves


def minus(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Counters of ``after`` less ``before``; gauges as ``after`` has them."""
    out: dict[str, Any] = {}
    for key, section in after.items():
        out[key] = {}
        for name, value in section.items():
            earlier = before.get(key, {}).get(name)
            if isinstance(value, dict):
                out[key][name] = {**value, "sum_us": value["sum_us"] - earlier["sum_us"]}
            elif is_gauge(kind_of_key(key), name):
                out[key][name] = value
            else:
                out[key][name] = value - earlier
    return out


def published(tree: dict[str, Any], sections: Collection[str] | None = None) -> dict[str, Any]:
    """What a reading publishes of sums in the line's nested shape (the emulator's
    ``emitted_totals()``, say): only ``sections`` (None: all), no leaf whose value is
    0, no object left empty."""

    def kept(value: Any) -> Any:
        if isinstance(value, dict):
            inner = {key: kept(item) for key, item in value.items()}
            return {key: item for key, item in inner.items() if item is not None} or None
        return None if value == 0 else value

    out = {key: kept(value) for key, value in tree.items() if sections is None or key in sections}
    return {key: value for key, value in out.items() if value is not None}


async def raw_request(socket_path: Path, request: bytes) -> bytes:
    """One request over a fresh connection; the whole response, read by its framing."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(socket_path))
        await sock.send(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += await sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += await sock.recv(65536)
        return data
