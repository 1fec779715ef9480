"""The specification of summing Firecracker metrics lines, and of what a reading
publishes of the sums, in Python.

Production does both in C (``cellos_probed/probes/_fc_sum.c``): ``merge_into``
over objects and ``add_text`` over totals kept as JSON text, held by
tests/test_fc_sum.py to :func:`merge_into_reference` (``add_text``: this on the
parsed totals and line, serialised); ``trim`` over a delta's or the totals' JSON
text, held to :func:`trim_reference` (on the parsed text, serialised). Nothing in
production runs this.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any, Final

from cellos_probed.probes.fc_metrics_parse import TIMESTAMP_KEY


def merge_into_reference(
    gauge_cache: dict[Any, Any],
    is_gauge: Callable[[str, str], object],
    agg_gauges: Container[object],
    cache_limit: int,
    total: dict[Any, Any],
    new: dict[Any, Any],
) -> None:
    """Add one line (or one sum of lines) ``new`` into ``total``, in place.

    Counters add; gauges (``is_gauge``, its answers cached per section in
    ``gauge_cache`` while it has fewer than ``cache_limit`` sections; the
    ``agg_gauges`` subs of an ``*_agg`` object) and anything not an exact int
    take ``new``'s value. ``utc_timestamp_ms`` is not summed. ``total`` takes
    copies of the sections (and their agg objects) it did not have, so ``new``
    is never changed by a later merge into ``total``.
    """
    for section, values in new.items():
        if section == TIMESTAMP_KEY:
            continue
        before = total.get(section)
        if type(values) is dict:
            if type(before) is dict:
                _merge_section(
                    gauge_cache, is_gauge, agg_gauges, cache_limit, section, before, values
                )
            else:
                total[section] = {
                    field: dict(value) if type(value) is dict else value
                    for field, value in values.items()
                }
        else:
            total[section] = values


def _merge_section(
    gauge_cache: dict[Any, Any],
    is_gauge: Callable[[str, str], object],
    agg_gauges: Container[object],
    cache_limit: int,
    section: Any,
    out: dict[Any, Any],
    new: dict[Any, Any],
) -> None:
    gauges = gauge_cache.get(section)
    if gauges is None:
        gauges = {}
        if len(gauge_cache) < cache_limit:
            gauge_cache[section] = gauges
    for field, value in new.items():
        before = out.get(field)
        kind = type(value)
        if kind is int:
            if type(before) is int:
                gauge = gauges.get(field)
                if gauge is None:
                    gauge = gauges[field] = is_gauge(section, field)
                if not gauge:
                    value = before + value
            out[field] = value
        elif kind is dict:
            if type(before) is dict:
                for sub, number in value.items():
                    earlier = before.get(sub)
                    if type(number) is int and type(earlier) is int and sub not in agg_gauges:
                        before[sub] = earlier + number
                    else:
                        before[sub] = number
            else:
                out[field] = dict(value)
        else:
            out[field] = value


#: what :func:`_without_zeros` gives for a value left out
_LEFT_OUT: Final = object()


def trim_reference(tree: dict[Any, Any], sections: Container[Any] | None) -> dict[Any, Any]:
    """What a reading publishes of a delta or the totals ``tree`` (a new dict).

    Only the top-level members named in ``sections`` (None: all); at every
    depth, no leaf whose value is the integer 0 (a consumer reads an absent
    leaf as 0: counters and gauges alike) and no object left empty by that (or
    empty already). ``tree`` itself stays, however empty. Lists are values,
    kept whole.
    """
    out: dict[Any, Any] = {}
    for key, value in tree.items():
        if sections is not None and key not in sections:
            continue
        kept = _without_zeros(value)
        if kept is not _LEFT_OUT:
            out[key] = kept
    return out


def _without_zeros(value: Any) -> Any:
    if type(value) is dict:
        kept = {}
        for key, item in value.items():
            inner = _without_zeros(item)
            if inner is not _LEFT_OUT:
                kept[key] = inner
        return kept or _LEFT_OUT
    if type(value) is int and value == 0:
        return _LEFT_OUT
    return value
