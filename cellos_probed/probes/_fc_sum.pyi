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
