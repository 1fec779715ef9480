"""The fast path for summing Firecracker metrics lines: a line's shape, learnt once. Pure.

Every line one VMM writes has the same keys in the same order; only the
numbers change. Walking ~300 leaves of a parsed line in Python to add them
up was the largest cost of the daemon at a thousand VMs, so the first line
of a shape is parsed and walked once (by the caller's general path) to learn
its :class:`LineShape`: the text between the numbers, which leaf each number
is, which leaves are gauges, and a ``%d`` template that renders the sums as
JSON. Every later line with the same text between its numbers is then one
regular-expression split, one ``int`` per number, one C-level addition of
two lists and one template fill.

A line is taken by the fast path only if the text around its numbers is
byte for byte the text the shape was learnt from, and a shape is learnt only
when the numbers found in the text are exactly the leaves found by parsing
it, in order; anything else (a string or fractional leaf, a number inside a
key, a new device) goes through the general path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from operator import add
from typing import Any, Final

import orjson

#: A JSON integer value (after ``"key":``, before ``,`` or ``}``), captured; JSON
#: has no leading zeros, so neither does this.
_NUMBER: Final = re.compile(rb"(?<=:)(0|[1-9][0-9]*)(?=[,}])")
#: The general path's parser takes integers up to 64 bits, no more.
_MAX_INT: Final = 2**64 - 1
#: Shapes with more leaves than this are left to the general path.
MAX_LEAVES: Final = 20_000

Leaf = tuple[str, str | None, str | None]


class LineShape:
    """One VMM's line layout: the text around the numbers and what each number is."""

    __slots__ = ("gauge_indexes", "leaves", "missed_index", "pieces", "template", "timestamp_index")

    def __init__(
        self,
        pieces: list[bytes],
        leaves: list[Leaf],
        timestamp_index: int,
        gauge_indexes: list[int],
        template: bytes,
        missed_index: int,
    ) -> None:
        self.pieces = pieces
        self.leaves = leaves
        self.timestamp_index = timestamp_index
        self.gauge_indexes = gauge_indexes
        #: the sums as JSON (timestamp left out), one ``%d`` per leaf in order
        self.template = template
        #: where ``logger.missed_metrics_count`` is, or -1
        self.missed_index = missed_index

    def values(self, line: bytes) -> list[int] | None:
        """The line's numbers in leaf order, or None if the line is not of this shape."""
        parts = _NUMBER.split(line)
        if parts[0::2] != self.pieces:
            return None
        numbers = list(map(int, parts[1::2]))
        if max(numbers) > _MAX_INT:
            return None  # the general path refuses it; so must this one
        return numbers

    def add(self, total: list[int], new: list[int]) -> list[int]:
        """``total`` plus ``new``: counters add, gauges (and the timestamp) take ``new``."""
        out = list(map(add, total, new))
        for index in self.gauge_indexes:
            out[index] = new[index]
        return out

    def render(self, values: list[int]) -> bytes:
        """The sums as a JSON object, keys in the line's order, without the timestamp.

        A sum beyond 64 bits is rendered as 2**64 - 1 (as the general path does).
        """
        numbers = values[: self.timestamp_index] + values[self.timestamp_index + 1 :]
        if numbers and max(numbers) > _MAX_INT:
            numbers = [min(number, _MAX_INT) for number in numbers]
        return self.template % tuple(numbers)

    def as_dict(self, values: list[int]) -> dict[str, Any]:
        """The sums as the general path keeps them (when a reading mixes shapes)."""
        parsed: dict[str, Any] = orjson.loads(self.render(values))
        return parsed

    def flatten(self, sums: dict[str, Any]) -> list[int] | None:
        """``sums`` (no timestamp) in this shape's leaf order, or None if laid out otherwise."""
        out: list[int] = []
        expected = [leaf for i, leaf in enumerate(self.leaves) if i != self.timestamp_index]
        found: list[Leaf] = []
        if not _walk(sums, found, out) or found != expected:
            return None
        out.insert(self.timestamp_index, 0)
        return out


def learn_shape(
    line: bytes, parsed: dict[str, Any], is_gauge: Callable[[str, str, str | None], bool]
) -> LineShape | None:
    """The shape of ``line`` (whose parse, timestamp included, is ``parsed``), if it has one."""
    parts = _NUMBER.split(line)
    numbers = list(map(int, parts[1::2]))
    if not numbers or len(numbers) > MAX_LEAVES:
        return None
    leaves: list[Leaf] = []
    values: list[int] = []
    if not _walk(parsed, leaves, values) or values != numbers:
        return None  # a non-integer leaf, or the text's numbers are not the leaves
    timestamp = ("utc_timestamp_ms", None, None)
    if leaves.count(timestamp) != 1:
        return None
    timestamp_index = leaves.index(timestamp)
    # the timestamp "takes the newest" too: it is never rendered, only kept small
    gauges = [
        i
        for i, (section, field, sub) in enumerate(leaves)
        if field is None or is_gauge(section, field, sub)
    ]
    without_timestamp = {k: v for k, v in parsed.items() if k != "utc_timestamp_ms"}
    template = _template(without_timestamp)
    missed = ("logger", "missed_metrics_count", None)
    return LineShape(
        parts[0::2],
        leaves,
        timestamp_index,
        gauges,
        template,
        leaves.index(missed) if missed in leaves else -1,
    )


def _walk(tree: dict[str, Any], leaves: list[Leaf], values: list[int]) -> bool:
    """Leaves of a line (section / field / aggregate sub-key), in order; False if not all ints."""
    for section, content in tree.items():
        if type(content) is int:
            leaves.append((section, None, None))
            values.append(content)
            continue
        if type(content) is not dict:
            return False
        for field, value in content.items():
            if type(value) is int:
                leaves.append((section, field, None))
                values.append(value)
            elif type(value) is dict:
                for sub, number in value.items():
                    if type(number) is not int:
                        return False
                    leaves.append((section, field, sub))
                    values.append(number)
            else:
                return False
    return True


def _template(tree: dict[str, Any]) -> bytes:
    """``tree`` as compact JSON with ``%d`` for every integer (``%`` in keys escaped)."""

    def key(name: str) -> bytes:
        return orjson.dumps(name).replace(b"%", b"%%") + b":"

    def render(node: Any) -> bytes:
        if type(node) is dict:
            return b"{" + b",".join(key(k) + render(v) for k, v in node.items()) + b"}"
        return b"%d"

    return render(tree)
