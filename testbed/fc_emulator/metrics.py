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
        #: counter sums carried by fully written lines (aggregates included)
        self.emitted: dict[Leaf, int] = defaultdict(int)
        #: counter deltas serialised into lines that were not written whole
        self.lost: dict[Leaf, int] = defaultdict(int)
        #: gauge values of the newest fully written line
        self.emitted_gauges: dict[Leaf, int] = {}
        self.lines_written = 0
        self.lines_failed = 0

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

    def build_line(self, utc_timestamp_ms: int) -> tuple[dict[str, Any], dict[Leaf, int]]:
        """The line a flush serialises now, and the counter deltas it carries.

        Nothing is committed here: :meth:`commit` advances the baselines of
        the counters whose values were actually written.
        """
        line: dict[str, Any] = {"utc_timestamp_ms": utc_timestamp_ms}
        deltas: dict[Leaf, int] = {}
        aggregate: dict[str, dict[Leaf, int]] = {}
        gauges = self.gauges
        for key, kind, names in self.layout:
            is_aggregate = key in self._aggregate_keys
            sums = aggregate.setdefault(kind, defaultdict(int)) if kind in AGGREGATES else None
            section: dict[str, Any] = {}
            for name in names:
                if name.endswith("_agg"):
                    agg: dict[str, int] = {}
                    for sub in AGG_FIELDS:
                        leaf: Leaf = (key, name, sub)
                        if sub != "sum_us":
                            agg[sub] = 0 if is_aggregate else gauges[leaf]
                            continue
                        value = self._counter(leaf, kind, name, sub, is_aggregate, sums, deltas)
                        agg[sub] = value
                    section[name] = agg
                elif is_gauge(kind, name):
                    section[name] = gauges[(key, name, None)]
                else:
                    section[name] = self._counter(
                        (key, name, None), kind, name, None, is_aggregate, sums, deltas
                    )
            line[key] = section
        return line, deltas

    def _counter(
        self,
        leaf: Leaf,
        kind: str,
        name: str,
        sub: str | None,
        is_aggregate: bool,
        sums: dict[Leaf, int] | None,
        deltas: dict[Leaf, int],
    ) -> int:
        if is_aggregate:
            assert sums is not None
            value = sums[(kind, name, sub)]
        else:
            value = self.current[leaf] - self.previous[leaf]
            if sums is not None:  # fetch_diff() into the aggregate, baseline untouched
                sums[(kind, name, sub)] += value
        deltas[leaf] = value
        return value

    def commit(self, deltas: dict[Leaf, int], written: set[Leaf] | None, whole: bool) -> None:
        """Advance the baselines of the counters written (``None``: all of them).

        ``whole``: the line reached the reader complete; else what it carried is lost.
        """
        into = self.emitted if whole else self.lost
        for leaf, value in deltas.items():
            if leaf not in self.previous:
                continue  # an aggregate: accounted through its devices below
            if written is not None and leaf not in written:
                continue
            self.previous[leaf] += value
            into[leaf] += value
            aggregate = self._aggregate_of.get(leaf[0])
            if aggregate is not None:  # the aggregate carries (or loses) what its devices do
                into[(aggregate, leaf[1], leaf[2])] += value
        if whole:
            self.lines_written += 1
            self.emitted_gauges = dict(self.gauges)
        else:
            self.lines_failed += 1

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
