"""One Firecracker process's metrics: counters with delta-on-flush, gauges, accounting.

``SharedIncMetric`` keeps ``(current, previous)``: a line carries
``current - previous`` and the baseline advances for each counter whose
value was written (reference section 4). ``SharedStoreMetric`` fields
(gauges) are emitted as they are and never reset. Aggregates (``net``,
``block``, ``pmem``) are the sum of the per-device deltas of the same line,
with ``min_us``/``max_us`` always 0.

Besides what Firecracker itself keeps, the model keeps the truth a test
compares the probe against: what every fully written line carried
(``emitted``), what was serialised into lines that never made it out
(``lost``), and what is still pending.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Any, Final

from testbed.fc_emulator.schema import (
    AGG_FIELDS,
    AGGREGATES,
    RELEASE_VERSION,
    VHOST_USER,
    fixed_sections,
    is_gauge,
    section_order,
)

#: (section key, field, ``min_us``/``max_us``/``sum_us`` or None)
Leaf = tuple[str, str, str | None]

#: One token of a compact JSON line: an object opening, a number leaf, or a closing brace.
_TOKEN: Final = re.compile(r'"(\w+)":(\{|-?\d+)|\}')


def _counter_entry(leaf: Leaf, kind: str, is_aggregate: bool, summed: bool) -> tuple[str, Any]:
    """A counter's entry in the line plan: an aggregate's own sum, or a device's delta."""
    sum_key = (kind, leaf[1], leaf[2])
    if is_aggregate:
        return ("aggregate", (leaf, sum_key))
    return ("counter", (leaf, sum_key if summed else None))


class VmMetrics:
    """The metrics of one Firecracker process (a restart gets a new one)."""

    def __init__(
        self,
        *,
        version: str = RELEASE_VERSION,
        nets: tuple[str, ...] = ("eth0",),
        blocks: tuple[str, ...] = ("rootfs",),
        pmems: tuple[str, ...] = (),
        vhost_user_blocks: tuple[str, ...] = (),
    ) -> None:
        fields = fixed_sections(version)
        fields["vhost_user"] = VHOST_USER
        self.order = section_order(
            nets=nets, blocks=blocks, pmems=pmems, vhost_user_blocks=vhost_user_blocks
        )
        self._device_kinds = {"net": nets, "block": blocks, "pmem": pmems}
        #: (section key, kind, fields) in output order
        self.layout = [(key, kind, fields[kind]) for key, kind in self.order]
        self.current: dict[Leaf, int] = {}
        self.previous: dict[Leaf, int] = {}
        self.gauges: dict[Leaf, int] = {}
        self._aggregate_keys = {key for key, kind in self.order if AGGREGATES.get(kind) == key}
        #: per-device section -> its aggregate section (``net_eth0`` -> ``net``)
        self._aggregate_of = {
            key: kind for key, kind in self.order if kind in AGGREGATES and key != kind
        }
        for key, kind, names in self.layout:
            for name in names:
                for sub in AGG_FIELDS if name.endswith("_agg") else (None,):
                    leaf = (key, name, sub)
                    if is_gauge(kind, name, sub):
                        self.gauges[leaf] = 0
                    elif key not in self._aggregate_keys:
                        self.current[leaf] = 0
                        self.previous[leaf] = 0
        self._plan = self._line_plan()
        #: counter sums carried by fully written lines (aggregates included)
        self.emitted: dict[Leaf, int] = defaultdict(int)
        #: counter deltas serialised into lines that were not written whole
        self.lost: dict[Leaf, int] = defaultdict(int)
        #: gauge values of the newest fully written line
        self.emitted_gauges: dict[Leaf, int] = {}
        #: lines a reader got whole, and lines that will never reach one
        self.lines_written = 0
        self.lines_lost = 0

    # -- activity ------------------------------------------------------------------------

    def add(self, section: str, field: str, amount: int = 1) -> None:
        self.current[(section, field, None)] += amount

    def observe_latency(self, section: str, field: str, micros: int) -> None:
        """A latency sample into ``<field>`` (an ``_agg``): lifetime min/max, summed ``sum_us``."""
        self.current[(section, field, "sum_us")] += micros
        low = (section, field, "min_us")
        # the quirk of LatencyAggregateMetrics: a stored min of 0 is always replaced
        if self.gauges[low] == 0 or micros < self.gauges[low]:
            self.gauges[low] = micros
        high = (section, field, "max_us")
        self.gauges[high] = max(self.gauges[high], micros)

    def set_gauge(self, section: str, field: str, value: int) -> None:
        self.gauges[(section, field, None)] = value

    def bump_everything(self, rng: random.Random) -> None:
        """Move every counter and gauge but the logger's own bookkeeping (tests compare
        field by field; ``logger.missed_metrics_count`` must count real misses only)."""
        for leaf in self.current:
            if leaf[2] is None and leaf[0] != "logger":
                self.current[leaf] += rng.randint(0, 5000)
        for key, kind, names in self.layout:
            if key in self._aggregate_keys:
                continue
            for name in names:
                if name.endswith("_agg"):
                    for _ in range(rng.randint(0, 3)):
                        self.observe_latency(key, name, rng.randint(1, 100_000))
                elif is_gauge(kind, name):
                    self.gauges[(key, name, None)] = rng.randint(0, 1_000_000)

    def synthetic_activity(self, rng: random.Random, seconds: float) -> None:
        """A light, plausible load for ``seconds`` of guest time (demo, benchmark)."""
        scale = max(1, int(seconds * 100))
        for key, kind, _ in self.layout:
            if kind == "net" and key != "net":
                packets = rng.randint(0, scale)
                self.add(key, "rx_packets_count", packets)
                self.add(key, "rx_bytes_count", packets * 1512)
                self.add(key, "tx_packets_count", packets // 2)
                self.add(key, "tx_bytes_count", packets * 300)
                self.observe_latency(key, "tap_write_agg", rng.randint(5, 50))
            elif kind == "block" and key != "block":
                reads = rng.randint(0, scale)
                self.add(key, "read_count", reads)
                self.add(key, "read_bytes", reads * 4096)
                self.observe_latency(key, "read_agg", rng.randint(20, 400))
        self.add("vcpu", "exit_mmio_write", rng.randint(0, scale * 3))
        self.add("interrupts", "triggers", rng.randint(0, scale * 2))

    # -- a line ----------------------------------------------------------------------------

    def _line_plan(self) -> list[tuple[str, list[tuple[str, Any]]]]:
        """How each section's fields are made, worked out once (a line is ~300 leaves).

        Per field: ``("gauge", leaf)``, ``("counter", (leaf, sums key or None))``,
        ``("aggregate", sums key)`` or ``("agg", [(sub, kind of sub, its entry)])``
        for a latency aggregate's ``min_us``/``max_us``/``sum_us``.
        """
        plan: list[tuple[str, list[tuple[str, Any]]]] = []
        for key, kind, names in self.layout:
            is_aggregate = key in self._aggregate_keys
            summed = kind in AGGREGATES
            fields: list[tuple[str, Any]] = []
            for name in names:
                if name.endswith("_agg"):
                    subs: list[tuple[str, tuple[str, Any]]] = []
                    for sub in AGG_FIELDS:
                        leaf: Leaf = (key, name, sub)
                        if sub != "sum_us":
                            subs.append((sub, ("zero", None) if is_aggregate else ("gauge", leaf)))
                        else:
                            subs.append((sub, _counter_entry(leaf, kind, is_aggregate, summed)))
                    fields.append((name, ("agg", subs)))
                elif is_gauge(kind, name):
                    fields.append((name, ("gauge", (key, name, None))))
                else:
                    fields.append(
                        (name, _counter_entry((key, name, None), kind, is_aggregate, summed))
                    )
            plan.append((key, fields))
        return plan

    def build_line(self, utc_timestamp_ms: int) -> tuple[dict[str, Any], dict[Leaf, int]]:
        """The line a flush serialises now, and the counter deltas it carries.

        Nothing is committed here: :meth:`commit` advances the baselines of
        the counters whose values were actually written. Device sections
        come before their aggregate in the layout, so an aggregate's sum is
        complete when its section is made.
        """
        line: dict[str, Any] = {"utc_timestamp_ms": utc_timestamp_ms}
        deltas: dict[Leaf, int] = {}
        sums: dict[tuple[str, str, str | None], int] = defaultdict(int)
        gauges, current, previous = self.gauges, self.current, self.previous

        def value_of(how: str, what: Any) -> int:
            if how == "counter":
                leaf, sum_key = what
                value = deltas[leaf] = current[leaf] - previous[leaf]
                if sum_key is not None:  # fetch_diff() into the aggregate, baseline untouched
                    sums[sum_key] += value
                return value
            if how == "gauge":
                return gauges[what]
            if how == "aggregate":
                leaf, sum_key = what
                value = deltas[leaf] = sums[sum_key]
                return value
            if how == "agg":
                return {sub: value_of(*entry) for sub, entry in what}  # type: ignore[return-value]
            return 0

        for key, fields in self._plan:
            section: dict[str, Any] = {}
            for name, (how, what) in fields:
                if how == "counter":  # the common case, inline: ~300 leaves a line
                    leaf, sum_key = what
                    value = deltas[leaf] = current[leaf] - previous[leaf]
                    if sum_key is not None:
                        sums[sum_key] += value
                    section[name] = value
                elif how == "gauge":
                    section[name] = gauges[what]
                else:
                    section[name] = value_of(how, what)
            line[key] = section
        return line, deltas

    def advance(self, deltas: dict[Leaf, int], written: set[Leaf] | None) -> dict[Leaf, int]:
        """Advance the baselines of the counters written (``None``: all); what the line carries.

        ``SharedIncMetric::serialize`` stores its new baseline once its value
        is in the writer, whether or not the line ever reaches a reader.
        """
        carried: dict[Leaf, int] = {}
        previous = self.previous
        for leaf, value in deltas.items():
            # a zero moves nothing (most of a line's ~300 counters, every flush)
            if not value or leaf not in previous:
                continue  # (an aggregate: accounted through its devices in settle)
            if written is not None and leaf not in written:
                continue
            previous[leaf] += value
            carried[leaf] = value
        return carried

    def settle(self, carried: dict[Leaf, int], gauges: dict[Leaf, int], whole: bool) -> None:
        """A line's fate: ``whole``, a reader has it (with these gauges); else it is lost."""
        into = self.emitted if whole else self.lost
        aggregate_of = self._aggregate_of
        for leaf, value in carried.items():
            into[leaf] += value
            aggregate = aggregate_of.get(leaf[0])
            if aggregate is not None:  # the aggregate carries (or loses) what its devices do
                into[(aggregate, leaf[1], leaf[2])] += value
        if whole:
            self.lines_written += 1
            self.emitted_gauges = dict(gauges)
        else:
            self.lines_lost += 1

    def commit(self, deltas: dict[Leaf, int], written: set[Leaf] | None, whole: bool) -> None:
        """:meth:`advance` and :meth:`settle` at once: a line whose fate is known now."""
        self.settle(self.advance(deltas, written), self.gauges, whole)

    # -- what tests compare ------------------------------------------------------------------

    def nested(self, counters: dict[Leaf, int], gauges: dict[Leaf, int]) -> dict[str, Any]:
        """Leaves in the line's nested shape, every field present."""
        out: dict[str, Any] = {}
        for key, kind, names in self.layout:
            section: dict[str, Any] = {}
            for name in names:
                if name.endswith("_agg"):
                    section[name] = {
                        sub: (
                            gauges.get((key, name, sub), 0)
                            if sub != "sum_us"
                            else counters.get((key, name, sub), 0)
                        )
                        for sub in AGG_FIELDS
                    }
                elif is_gauge(kind, name):
                    section[name] = gauges.get((key, name, None), 0)
                else:
                    section[name] = counters.get((key, name, None), 0)
            out[key] = section
        return out

    def true_counts(self) -> dict[str, Any]:
        """Everything that happened in this process, as a reader of every line would sum it."""
        counters = dict(self.current)
        for (key, name, sub), value in self.current.items():
            kind = self._kind_of(key)
            if kind in AGGREGATES and key != kind:
                counters[(kind, name, sub)] = counters.get((kind, name, sub), 0) + value
        gauges = {
            leaf: (0 if leaf[0] in self._aggregate_keys else value)
            for leaf, value in self.gauges.items()
        }
        return self.nested(counters, gauges)

    def emitted_totals(self) -> dict[str, Any]:
        """The sums of every fully written line; gauges as the newest such line had them."""
        return self.nested(self.emitted, self.emitted_gauges)

    def lost_totals(self) -> dict[str, Any]:
        return self.nested(self.lost, {})

    def _kind_of(self, key: str) -> str:
        for section, kind in self.order:
            if section == key:
                return kind
        raise KeyError(key)


def leaves_in_prefix(prefix: str) -> set[Leaf]:
    """The leaves whose values lie wholly inside ``prefix`` of a compact line.

    Used when a write failed mid-line: serialisation stopped there, so only
    these counters had their baselines advanced.
    """
    found: set[Leaf] = set()
    stack: list[str] = []
    for match in _TOKEN.finditer(prefix):
        name, value = match.group(1), match.group(2)
        if name is None:  # a closing brace
            if stack:
                stack.pop()
        elif value == "{":
            stack.append(name)
        elif len(stack) == 1:
            found.add((stack[0], name, None))
        elif len(stack) == 2:
            found.add((stack[0], stack[1], name))
    return found
