"""``cellos-probed tail``: the operator's window on the event stream.

``format_event`` is pure: one readable line per event with the few
figures that matter for its probe.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import orjson
import trio

from cellos_probed.config import NatsSettings
from cellos_probed.nats_bridge import ReceivedMessage, open_subscription
from cellos_probed.verify import Completeness


def _get(tree: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _cgroup_figures(output: dict[str, Any]) -> list[str]:
    figures = []
    trigger = output.get("trigger")
    if trigger is not None and trigger != "tick":  # read at once, on the kernel's signal
        figures.append(f"on {trigger}")
    populated = _get(output, "cgroup_events", "populated")
    if populated is not None:
        figures.append(f"populated {populated}")
    usage = _get(output, "deltas", "cpu_stat", "usage_usec")
    if usage is not None:
        figures.append(f"cpu +{usage / 1000:.1f}ms")
    elif _get(output, "cpu_stat", "usage_usec") is not None:
        figures.append(f"cpu {output['cpu_stat']['usage_usec'] / 1e6:.2f}s")
    if isinstance(output.get("memory_current"), int):
        figures.append(f"mem {output['memory_current'] / 2**20:.1f}MiB")
    for name in ("oom", "oom_kill", "max"):
        value = _get(output, "memory_events", name)
        if value:
            figures.append(f"{name}={value}")
    if isinstance(output.get("pids_current"), int):
        figures.append(f"pids {output['pids_current']}")
    some = _get(output, "cpu_pressure", "some", "avg10")
    if some is not None:
        figures.append(f"psi.cpu {some:.2f}")
    if _get(output, "deltas", "reset"):
        figures.append("RESET")
    if output.get("missing"):
        figures.append(f"missing {len(output['missing'])}")
    if output.get("final"):
        figures.append("FINAL")
    return figures


def _tap_figures(output: dict[str, Any]) -> list[str]:
    figures = [
        f"{output.get('operstate', '?')}",
        "carrier" if output.get("carrier") else "no-carrier",
        f"changes {output.get('carrier_changes', '?')}",
    ]
    if output.get("transitions"):
        figures.append(f"transitions {len(output['transitions'])}")
    # the traffic since the previous reading; the counters themselves on a cell's first
    moved = _get(output, "deltas", "stats")
    counters = moved if isinstance(moved, dict) else output.get("stats")
    if isinstance(counters, dict):
        sign = "+" if counters is moved else ""
        for way in ("rx", "tx"):
            figures.append(
                f"{way} {sign}{counters.get(f'{way}_bytes')}B/{counters.get(f'{way}_packets')}p"
            )
        dropped = [counters.get(f"{way}_dropped") for way in ("rx", "tx")]
        if counters is moved and any(dropped):
            figures.append(f"dropped +{dropped[0]}/+{dropped[1]}")
    if _get(output, "deltas", "reset"):
        figures.append("RESET")
    return figures


def _nft_figures(output: dict[str, Any]) -> list[str]:
    figures = []
    for name, counter in (output.get("counters") or {}).items():
        delta = _get(output, "deltas", "counters", name, "bytes")
        extra = f" (+{delta})" if delta is not None else ""
        figures.append(f"{name} {counter.get('packets')}p/{counter.get('bytes')}B{extra}")
    if output.get("rules"):
        figures.append(f"rules {len(output['rules'])}")
    if output.get("missing"):
        figures.append(f"missing {len(output['missing'])}")
    return figures


def _fc_figures(output: dict[str, Any]) -> list[str]:
    figures = [
        f"{_get(output, 'instance', 'state') or '?'}",
        f"lines {output.get('lines', 0)}",
    ]
    if output.get("torn_lines"):
        figures.append(f"torn {output['torn_lines']}")
    for key, value in (output.get("delta") or {}).items():
        if key.startswith("net_") and isinstance(value, dict):
            rx, tx = value.get("rx_bytes_count", 0), value.get("tx_bytes_count", 0)
            figures.append(f"{key} rx+{rx}B tx+{tx}B")
    missed = _get(output, "delta", "logger", "missed_metrics_count")
    if missed:
        figures.append(f"LOST {missed} lines")
    return figures


_FIGURES = {
    "cgroup": _cgroup_figures,
    "tap_link": _tap_figures,
    "nftables": _nft_figures,
    "fc_metrics": _fc_figures,
}


def format_event(event: dict[str, Any]) -> str:
    """``time host cell probe #cellosseq figures...``."""
    kind = str(event.get("type", "")).rsplit(".", 1)[-1]
    data = event.get("data") or {}
    host = data.get("hostId") or "-"
    cell = data.get("cellId") or "-"
    probe = str(data.get("probeSource", kind)).removeprefix("host.")
    seq = f"#{event['cellosseq']}" if "cellosseq" in event else ""
    head = f"{event.get('time', '?')} {host:<12} {cell:<16} {probe:<10} {seq:>6}"
    if kind == "probe_error":
        error = data.get("error") or {}
        return f"{head} ERROR {error.get('kind')}: {error.get('message')}"
    if kind == "gap":
        return (
            f"{head} GAP dropped {data.get('dropped')} "
            f"seq {data.get('firstSequence')}..{data.get('lastSequence')} ({data.get('reason')})"
        )
    output = data.get("output")
    if not isinstance(output, dict):
        return f"{head} {kind}"
    figures = _FIGURES.get(kind, lambda _: [])(output)
    return f"{head} {' '.join(figures)}".rstrip()


def tail_subject(prefix: str, host: str | None, cell: str | None, probe: str | None) -> str:
    """``<prefix>.<kind>.<hostId>.<cellId>``, each filter a token, the rest wildcards
    (with a filter, a host's ``agent`` events, one token shorter, are not shown)."""
    if not (host or cell or probe):
        return f"{prefix}.>"
    return f"{prefix}.{probe or '*'}.{host or '*'}.{cell or '*'}"


async def run_tail(
    servers: Sequence[str],
    subject: str,
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    limit: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Print events on ``subject`` until cancelled (or ``limit`` events)."""
    stream = out or sys.stdout
    seen = 0
    async with open_subscription(servers, subject) as messages:
        if on_ready is not None:
            on_ready()
        async for message in messages:
            if as_json:
                stream.write(message.data.decode("utf-8", "replace") + "\n")
            else:
                try:
                    line = format_event(orjson.loads(message.data))
                except orjson.JSONDecodeError:
                    line = f"(not a JSON event on {message.subject}, {len(message.data)} bytes)"
                stream.write(line + "\n")
            stream.flush()
            seen += 1
            if limit is not None and seen >= limit:
                break
    return seen


async def run_verify(
    servers: Sequence[str],
    subject: str,
    *,
    stream: str | None = None,
    duration: float = 10.0,
    settings: NatsSettings | None = None,
    stop: trio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
    probe: str | None = None,
) -> Completeness:
    """Listen ``duration`` seconds or until ``stop`` is set (or read ``stream`` whole)
    and account for every ``cellosseq`` the server sent before the end (of ``probe``
    only, if given: subscribe ``subject`` to every kind, its errors and gaps too)."""
    completeness = Completeness(from_start=stream is not None, probe=probe)
    stop = stop if stop is not None else trio.Event()

    def account(message: ReceivedMessage) -> None:
        try:
            completeness.add(orjson.loads(message.data))
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
            completeness.other += 1

    async with open_subscription(
        servers, subject, stream=stream, settings=settings, stop=stop
    ) as messages:
        if on_ready is not None:
            on_ready()
        with trio.move_on_after(duration):
            async for message in messages:
                account(message)
        # the channel ends once what the server sent before the stop is in
        stop.set()
        async for message in messages:
            account(message)
    return completeness
