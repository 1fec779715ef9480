"""Pure functions over libnftables JSON: a table's counters and rules, cells' views, deltas.

libnftables answers a request with one JSON document per ``list`` command,
each on its own line (``{"nftables": [{"metainfo": ...}, {"table": ...},
{"counter": ...}, {"chain": ...}, {"rule": ...}]}``); see
``tests/fixtures/nftables/`` for real output. :func:`parse_table_listing`
turns that into a :class:`TableSnapshot`, once per table per tick; every
cell reading the table then takes its own slice with :func:`cell_view`.

Identities matter as much as values: a counter or rule whose handle changed,
or a table whose handle changed, was recreated, so its counters restarted
from zero even when they are already higher than the previous reading.

Errors name what was malformed, never the content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from cellos_probed.readings import ProbeParseError


class NamedCounter(NamedTuple):
    # a tuple, not a dataclass: 2,000 of them are made every tick
    handle: int
    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class RuleCounter:
    """A rule with a counter statement; a rule without one has no figures and is not kept."""

    handle: int
    comment: str | None
    packets: int
    bytes: int


@dataclass(slots=True)
class TableSnapshot:
    """What one query found in one table.

    ``generation`` identifies this incarnation of the table (the namespace
    and the table's handle). ``chains`` is empty unless the listing had rules.
    """

    family: str
    table: str
    generation: tuple[Any, ...] = ()
    counters: dict[str, NamedCounter] = field(default_factory=dict)
    chains: dict[str, list[RuleCounter]] = field(default_factory=dict)


def _integer(value: Any, what: str) -> int:
    # bool is an int subclass; nft never writes one where a number belongs
    if type(value) is not int or value < 0:
        raise ProbeParseError(f"{what} is not a non-negative integer")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProbeParseError(f"{what} is not a JSON object")
    return value


def _documents(text: str | bytes) -> list[list[Any]]:
    """Each ``{"nftables": [...]}`` document's item list, in order."""
    documents = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            document = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ProbeParseError("libnftables output is not JSON") from None
        items = _object(document, "libnftables output").get("nftables")
        if not isinstance(items, list):
            raise ProbeParseError("libnftables output has no 'nftables' list")
        documents.append(items)
    if not documents:
        raise ProbeParseError("libnftables output is empty")
    return documents


def _named_counter(body: dict[str, Any]) -> tuple[str, NamedCounter]:
    name, handle = body.get("name"), body.get("handle")
    packets, octets = body.get("packets"), body.get("bytes")
    # the common case in one test; the checks below only run to say what is wrong
    if (
        type(name) is str
        and type(handle) is int
        and type(packets) is int
        and type(octets) is int
        and min(handle, packets, octets) >= 0
    ):
        return name, NamedCounter(handle, packets, octets)
    if not isinstance(name, str):
        raise ProbeParseError("counter name is not a string")
    return name, NamedCounter(
        _integer(handle, f"counter {name}: handle"),
        _integer(packets, f"counter {name}: packets"),
        _integer(octets, f"counter {name}: bytes"),
    )


def _rule_counter(rule: dict[str, Any], named: dict[str, NamedCounter]) -> RuleCounter | None:
    handle = _integer(rule.get("handle"), "rule handle")
    expressions = rule.get("expr")
    if not isinstance(expressions, list):
        raise ProbeParseError(f"rule {handle}: 'expr' is not a list")
    comment = rule.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise ProbeParseError(f"rule {handle}: comment is not a string")
    for expression in expressions:
        if not isinstance(expression, dict) or "counter" not in expression:
            continue
        statement = expression["counter"]
        if isinstance(statement, str):  # `counter name "x"`: the named counter's figures
            target = named.get(statement)
            if target is None:
                raise ProbeParseError(f"rule {handle}: refers to an unlisted counter")
            return RuleCounter(handle, comment, target.packets, target.bytes)
        statement = _object(statement, f"rule {handle}: counter")
        packets = _integer(statement.get("packets"), f"rule {handle}: packets")
        octets = _integer(statement.get("bytes"), f"rule {handle}: bytes")
        return RuleCounter(handle, comment, packets, octets)
    return None


def parse_table_listing(
    text: str | bytes, family: str, table: str, *, namespace: Any = None
) -> TableSnapshot:
    """One table's named counters and (when listed) rule counters from libnftables JSON.

    ``text`` holds the documents of ``list tables`` + ``list counters table``
    or of ``list table``; items of other tables or families are skipped.
    ``namespace`` (the namespace's identity) joins the table handle in
    ``generation``.
    """
    snapshot = TableSnapshot(family, table)
    table_handle: int | None = None
    rules: list[dict[str, Any]] = []
    counters = snapshot.counters
    for items in _documents(text):
        for item in items:
            if type(item) is not dict or len(item) != 1:
                raise ProbeParseError("libnftables output item is not a one-key object")
            body = item.get("counter")
            if type(body) is dict:  # the bulk of every listing: one test per counter
                if body.get("table") == table and body.get("family") == family:
                    name, counter = _named_counter(body)
                    counters[name] = counter
                continue
            ((kind, body),) = item.items()
            if kind == "metainfo":
                continue
            body = _object(body, kind)
            if body.get("family") != family:
                continue
            if kind == "table":
                if body.get("name") == table:
                    table_handle = _integer(body.get("handle"), "table handle")
                continue
            if body.get("table") != table:
                continue
            if kind == "chain":
                chain = body.get("name")
                if not isinstance(chain, str):
                    raise ProbeParseError("chain name is not a string")
                snapshot.chains.setdefault(chain, [])
            elif kind == "rule":
                rules.append(body)
    if table_handle is None:
        raise ProbeParseError(f"table {family} {table} is not in the listing")
    # rules come after the counters they name in nft's order, but resolve once all are known
    for rule in rules:
        chain = rule.get("chain")
        if not isinstance(chain, str):
            raise ProbeParseError("rule chain is not a string")
        counted = _rule_counter(rule, snapshot.counters)
        if counted is not None:
            snapshot.chains.setdefault(chain, []).append(counted)
    snapshot.generation = (namespace, table_handle)
    return snapshot


@dataclass(slots=True)
class CellView:
    """One cell's slice of a snapshot, with the identities its deltas are checked against."""

    counters: dict[str, NamedCounter]
    rules: list[RuleCounter] | None
    missing: list[dict[str, str]]
    generation: tuple[Any, ...]


def cell_view(snapshot: TableSnapshot, counters: tuple[str, ...], chain: str | None) -> CellView:
    """The configured counters and chain; what the table lacks is listed in ``missing``."""
    found: dict[str, NamedCounter] = {}
    missing: list[dict[str, str]] = []
    for name in counters:
        counter = snapshot.counters.get(name)
        if counter is None:
            missing.append({"kind": "counter", "name": name})
        else:
            found[name] = counter
    rules: list[RuleCounter] | None = None
    if chain is not None:
        rules = snapshot.chains.get(chain)
        if rules is None:
            rules = []
            missing.append({"kind": "chain", "name": chain})
    return CellView(found, rules, missing, snapshot.generation)


def view_output(view: CellView) -> dict[str, Any]:
    """``output`` without ``deltas``, as DESIGN.md names its keys."""
    output: dict[str, Any] = {
        "counters": {
            name: {"packets": counter.packets, "bytes": counter.bytes}
            for name, counter in view.counters.items()
        }
    }
    if view.rules is not None:
        output["rules"] = [
            {"handle": r.handle, "comment": r.comment, "packets": r.packets, "bytes": r.bytes}
            for r in view.rules
        ]
    output["missing"] = view.missing
    return output


def _as_figures(counter: NamedCounter | RuleCounter) -> dict[str, int]:
    return {"packets": counter.packets, "bytes": counter.bytes}


def view_deltas(previous: CellView | None, current: CellView) -> dict[str, Any] | None:
    """Increase since this cell's ``previous`` view; ``None`` on the first reading.

    ``reset`` is true when the table was recreated (another generation), a
    counter or rule was recreated (another handle under the same name), or
    any figure went down: every baseline then restarts at zero, so the
    deltas are the current values. A counter or rule new since the previous
    reading also counts from zero; one that disappeared is simply absent.
    """
    if previous is None:
        return None
    # one pass computing increases and noticing a reset; a reset (rare) redoes it from zero
    reset = previous.generation != current.generation
    before = previous.counters
    counters: dict[str, dict[str, int]] = {}
    for name, now in current.counters.items():
        old = before.get(name)
        if old is None:
            counters[name] = {"packets": now.packets, "bytes": now.bytes}
            continue
        if old.handle != now.handle or now.packets < old.packets or now.bytes < old.bytes:
            reset = True
        counters[name] = {"packets": now.packets - old.packets, "bytes": now.bytes - old.bytes}
    rules: dict[str, dict[str, int]] = {}
    if current.rules:
        before_rules = {rule.handle: rule for rule in previous.rules or ()}
        for rule in current.rules:
            was = before_rules.get(rule.handle)
            if was is None:
                rules[str(rule.handle)] = _as_figures(rule)
                continue
            if rule.packets < was.packets or rule.bytes < was.bytes:
                reset = True
            rules[str(rule.handle)] = {
                "packets": rule.packets - was.packets,
                "bytes": rule.bytes - was.bytes,
            }
    if reset:
        counters = {name: _as_figures(now) for name, now in current.counters.items()}
        rules = {str(rule.handle): _as_figures(rule) for rule in current.rules or ()}
    return {"counters": counters, "rules": rules, "reset": reset}
