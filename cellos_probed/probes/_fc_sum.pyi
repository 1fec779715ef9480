"""Firecracker metrics lines summed in C (``_fc_sum.c``)."""

from collections.abc import Callable, Container
from typing import Any

def merge_into(
    gauge_cache: dict[str, dict[str, bool]],
    is_gauge: Callable[[str, str], object],
    agg_gauges: Container[object],
    cache_limit: int,
    total: dict[str, Any],
    new: dict[str, Any],
    /,
) -> None:
    """``fc_metrics_parse.merge_into_reference(total, new)``, with its globals passed in.

    ``gauge_cache``, ``is_gauge``, ``agg_gauges`` and ``cache_limit`` are
    ``_section_gauges``, ``is_gauge``, ``_AGG_GAUGES`` and ``_GAUGE_CACHE_LIMIT``;
    ``total`` and ``new`` must be exact dicts (TypeError otherwise).
    """

def add_line(
    gauge_cache: dict[str, dict[str, bool]],
    is_gauge: Callable[[str, str], object],
    agg_gauges: Container[object],
    cache_limit: int,
    total: dict[str, Any],
    line: bytes,
    /,
) -> tuple[int, int] | None:
    """One metrics line's text added into ``total``, if it is shaped exactly as ``total``.

    For a line in Firecracker's compact form (no whitespace, integers as orjson
    reads them into ints) whose sections, fields and agg keys are ``total``'s, in
    ``total``'s order, where ``total`` holds exact dicts of exact ints (and agg
    dicts of them): the effect of ``found = orjson.loads(line);
    found.pop("utc_timestamp_ms"); merge_into(total, found)``, and
    ``(utc_timestamp_ms, logger.missed_metrics_count or 0)``. Any other line:
    None, ``total`` untouched. ``total`` must be an exact dict and ``line`` bytes
    (TypeError otherwise); an error from ``is_gauge`` propagates with ``total``
    as ``merge_into`` would leave it (the fields before the failing one merged).
    """

def add_text(layout: bytes, totals: bytes, line: bytes, /) -> tuple[bytes, int, int] | None:
    """One metrics line added into totals kept as their JSON text, text to text.

    ``totals`` is ``orjson.dumps(t)`` of totals whose sections are non-empty
    dicts of ints or of non-empty dicts of ints, ``layout`` one byte per integer
    leaf in order, non-zero for a gauge. For a line in Firecracker's compact form
    shaped exactly as ``t`` and no sum beyond -2**63 .. 2**64 - 1: the text of the
    merged totals, the line's ``utc_timestamp_ms`` and ``logger.missed_metrics_count``
    (0 without one). Otherwise None.
    """
