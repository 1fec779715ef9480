"""Firecracker metrics lines summed in C (``_fc_sum.c``), and what a reading publishes of
the sums; tests/fc_sum_reference.py is the spec."""

from collections.abc import Callable, Container
from typing import Any

def add_text(layout: bytes, totals: bytes, line: bytes, /) -> tuple[bytes, int, int] | None:
    """One metrics line added into totals kept as their JSON text, text to text.

    ``totals`` is ``orjson.dumps(t)`` of totals whose sections are non-empty
    dicts of ints or of non-empty dicts of ints, ``layout`` one byte per integer
    leaf in order, non-zero for a gauge. For a line in Firecracker's compact form
    shaped exactly as ``t`` and no sum beyond -2**63 .. 2**64 - 1: the text of the
    merged totals, the line's ``utc_timestamp_ms`` and ``logger.missed_metrics_count``
    (0 without one). Otherwise None.
    """

def merge_into(
    gauge_cache: dict[str, dict[str, bool]],
    is_gauge: Callable[[str, str], object],
    agg_gauges: Container[object],
    cache_limit: int,
    total: dict[str, Any],
    new: dict[str, Any],
    /,
) -> None:
    """One parsed line (or sum of lines) ``new`` added into ``total``, in place.

    ``gauge_cache``, ``is_gauge``, ``agg_gauges`` and ``cache_limit`` are
    fc_metrics_parse's ``_section_gauges``, ``is_gauge``, ``_AGG_GAUGES`` and
    ``_GAUGE_CACHE_LIMIT``; ``total`` and ``new`` must be exact dicts (TypeError
    otherwise).
    """

def trim(text: bytes, sections: tuple[bytes, ...] | None, /) -> bytes:
    """What a reading publishes of a delta or the totals, text to text.

    ``text`` is ``orjson.dumps`` of a dict; ``sections`` None, or the names of the
    top-level members to keep, each as JSON writes it between its quotes. The text
    without any leaf whose value is the integer 0 and any object left empty, at any
    depth (``text`` itself when nothing goes). ValueError when ``text`` is not an
    object in compact JSON.
    """
