"""The pure nftables parser and deltas, on real ``nft -j`` output saved under fixtures/nftables/.

The fixtures come from one namespace: table ``inet cellos`` holding two
cells' rules (``testbed.nft.CellRules``) and a spare counter, after three
pings (each cell's named counters at 6 packets / 504 bytes); then the same
table after a reload (``nft -f`` replacing it: a new table handle) and one
more ping. ``list_counters.json`` is the probe's own counters-only request
(``list tables inet`` + ``list counters table inet cellos``) answered by
``nft -j -f -``; it lists another inet table too.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from cellos_probed.probes import ProbeParseError
from cellos_probed.probes.nftables import libnftables_error, list_request
from cellos_probed.probes.nftables_parse import (
    NamedCounter,
    RuleCounter,
    cell_view,
    parse_table_listing,
    view_deltas,
    view_output,
)

FIXTURES = Path(__file__).parent / "fixtures" / "nftables"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_full_table_listing_gives_named_counters_and_rule_counters() -> None:
    snapshot = parse_table_listing(fixture("list_table.json"), "inet", "cellos", namespace="ns")
    assert snapshot.generation == ("ns", 1)
    assert snapshot.counters == {
        "cell-1-rx": NamedCounter(5, 6, 504),
        "cell-1-tx": NamedCounter(6, 6, 504),
        "cell-2-rx": NamedCounter(7, 6, 504),
        "cell-2-tx": NamedCounter(8, 6, 504),
        "spare": NamedCounter(9, 0, 0),
    }
    assert snapshot.chains["cell-1-in"] == [
        RuleCounter(10, "echo requests", 3, 252),
        RuleCounter(11, "echo replies", 3, 252),
        RuleCounter(12, None, 6, 504),  # `counter name "cell-1-rx"`: the named counter's figures
        RuleCounter(13, None, 6, 504),
    ]
    assert snapshot.chains["cell-1-out"] == [RuleCounter(14, None, 6, 504)]
    assert sorted(snapshot.chains) == ["cell-1-in", "cell-1-out", "cell-2-in", "cell-2-out"]


def test_counters_listing_skips_other_tables_and_has_no_chains() -> None:
    snapshot = parse_table_listing(fixture("list_counters.json"), "inet", "cellos")
    assert snapshot.generation == (None, 1)
    assert snapshot.counters["cell-2-tx"] == NamedCounter(8, 6, 504)
    assert len(snapshot.counters) == 5
    assert snapshot.chains == {}


def test_the_fixture_request_is_the_probes_own() -> None:
    assert orjson.loads(list_request("inet", "cellos", with_rules=False)) == {
        "nftables": [
            {"list": {"tables": {"family": "inet"}}},
            {"list": {"counters": {"family": "inet", "table": "cellos"}}},
        ]
    }
    assert orjson.loads(list_request("inet", "cellos", with_rules=True)) == {
        "nftables": [{"list": {"table": {"family": "inet", "name": "cellos"}}}]
    }


def test_cell_view_reports_configured_counters_and_chain_and_names_what_is_missing() -> None:
    snapshot = parse_table_listing(fixture("list_table.json"), "inet", "cellos")
    view = cell_view(snapshot, ("cell-1-rx", "nope", "cell-1-tx"), "cell-1-in")
    assert view_output(view) == {
        "counters": {
            "cell-1-rx": {"packets": 6, "bytes": 504},
            "cell-1-tx": {"packets": 6, "bytes": 504},
        },
        "rules": [
            {"handle": 10, "comment": "echo requests", "packets": 3, "bytes": 252},
            {"handle": 11, "comment": "echo replies", "packets": 3, "bytes": 252},
            {"handle": 12, "comment": None, "packets": 6, "bytes": 504},
            {"handle": 13, "comment": None, "packets": 6, "bytes": 504},
        ],
        "missing": [{"kind": "counter", "name": "nope"}],
    }
    absent = cell_view(snapshot, ("spare",), "cell-9-in")
    assert view_output(absent) == {
        "counters": {"spare": {"packets": 0, "bytes": 0}},
        "rules": [],
        "missing": [{"kind": "chain", "name": "cell-9-in"}],
    }
    assert "rules" not in view_output(cell_view(snapshot, ("spare",), None))


def test_deltas_first_reading_is_null_then_increases() -> None:
    first = cell_view(
        parse_table_listing(fixture("list_table.json"), "inet", "cellos", namespace="ns"),
        ("cell-1-rx",),
        "cell-1-in",
    )
    assert view_deltas(None, first) is None
    same = view_deltas(first, first)
    assert same == {
        "counters": {"cell-1-rx": {"packets": 0, "bytes": 0}},
        "rules": {str(h): {"packets": 0, "bytes": 0} for h in (10, 11, 12, 13)},
        "reset": False,
    }


def _bumped_listing(packets: int, octets: int) -> str:
    """list_table.json with cell-1-rx and rule 10 raised by (packets, bytes)."""
    document = orjson.loads(fixture("list_table.json"))
    for item in document["nftables"]:
        counter = item.get("counter")
        if counter is not None and counter["name"] == "cell-1-rx":
            counter["packets"] += packets
            counter["bytes"] += octets
        rule = item.get("rule")
        if rule is not None and rule["handle"] == 10:
            rule["expr"][-1]["counter"]["packets"] += packets
            rule["expr"][-1]["counter"]["bytes"] += octets
    return orjson.dumps(document).decode()


def test_deltas_are_the_increase_since_the_previous_view() -> None:
    before = cell_view(parse_table_listing(fixture("list_table.json"), "inet", "cellos"),
                       ("cell-1-rx",), "cell-1-in")  # fmt: skip
    after = cell_view(parse_table_listing(_bumped_listing(2, 168), "inet", "cellos"),
                      ("cell-1-rx",), "cell-1-in")  # fmt: skip
    deltas = view_deltas(before, after)
    assert deltas is not None
    assert deltas["reset"] is False
    assert deltas["counters"] == {"cell-1-rx": {"packets": 2, "bytes": 168}}
    assert deltas["rules"]["10"] == {"packets": 2, "bytes": 168}
    assert deltas["rules"]["12"] == {"packets": 2, "bytes": 168}  # the named counter's rule
    assert deltas["rules"]["11"] == {"packets": 0, "bytes": 0}


def test_a_reloaded_table_resets_the_baseline() -> None:
    original = parse_table_listing(fixture("list_table.json"), "inet", "cellos", namespace="ns")
    before = cell_view(original, ("cell-1-rx", "cell-1-tx"), "cell-1-in")
    reloaded = parse_table_listing(fixture("list_table_reloaded.json"), "inet", "cellos",
                                   namespace="ns")  # fmt: skip
    assert reloaded.generation == ("ns", 4)
    after = cell_view(reloaded, ("cell-1-rx", "cell-1-tx"), "cell-1-in")
    deltas = view_deltas(before, after)
    assert deltas == {
        "counters": {
            "cell-1-rx": {"packets": 2, "bytes": 168},
            "cell-1-tx": {"packets": 2, "bytes": 168},
        },
        "rules": {
            "10": {"packets": 1, "bytes": 84},
            "11": {"packets": 1, "bytes": 84},
            "12": {"packets": 2, "bytes": 168},
            "13": {"packets": 2, "bytes": 168},
        },
        "reset": True,
    }


def test_a_new_table_handle_resets_even_when_figures_went_up() -> None:
    before = cell_view(parse_table_listing(fixture("list_table.json"), "inet", "cellos"),
                       ("cell-1-rx",), None)  # fmt: skip
    raised = _bumped_listing(100, 8400).replace('"handle":1}', '"handle":2}', 1)
    after = cell_view(parse_table_listing(raised, "inet", "cellos"), ("cell-1-rx",), None)
    assert after.generation == (None, 2)
    assert view_deltas(before, after) == {
        "counters": {"cell-1-rx": {"packets": 106, "bytes": 8904}},
        "rules": {},
        "reset": True,
    }


def test_a_recreated_counter_resets_and_a_new_one_counts_from_zero() -> None:
    snapshot = parse_table_listing(fixture("list_table.json"), "inet", "cellos")
    before = cell_view(snapshot, ("cell-1-rx", "later"), None)
    assert before.missing == [{"kind": "counter", "name": "later"}]
    snapshot.counters["later"] = NamedCounter(40, 1, 84)
    grown = cell_view(snapshot, ("cell-1-rx", "later"), None)
    assert view_deltas(before, grown) == {
        "counters": {
            "cell-1-rx": {"packets": 0, "bytes": 0},
            "later": {"packets": 1, "bytes": 84},
        },
        "rules": {},
        "reset": False,
    }
    snapshot.counters["cell-1-rx"] = NamedCounter(41, 7, 588)  # deleted and re-added
    recreated = cell_view(snapshot, ("cell-1-rx", "later"), None)
    deltas = view_deltas(grown, recreated)
    assert deltas is not None
    assert deltas["reset"] is True
    assert deltas["counters"]["cell-1-rx"] == {"packets": 7, "bytes": 588}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "libnftables output is empty"),
        ("not json\n", "libnftables output is not JSON"),
        ('{"other": []}\n', "libnftables output has no 'nftables' list"),
        ('{"nftables": [{"table": {"family": "inet", "name": "t", "handle": 1}},'
         ' {"counter": {"family": "inet", "table": "t", "name": "c", "handle": 2,'
         ' "packets": -1, "bytes": 0}}]}', "counter c: packets is not a non-negative integer"),
        ('{"nftables": [{"table": {"family": "inet", "name": "t", "handle": 1}},'
         ' {"counter": {"family": "inet", "table": "t", "name": "c", "handle": 2,'
         ' "packets": true, "bytes": 0}}]}', "counter c: packets is not a non-negative integer"),
        ('{"nftables": [{"table": {"family": "inet", "name": "t", "handle": 1}},'
         ' {"rule": {"family": "inet", "table": "t", "chain": "x", "handle": 3,'
         ' "expr": [{"counter": "ghost"}]}}]}', "rule 3: refers to an unlisted counter"),
        ('{"nftables": [{"table": {"family": "inet", "name": "u", "handle": 1}}]}',
         "table inet t is not in the listing"),
        ('{"nftables": ["x"]}', "libnftables output item is not a one-key object"),
    ],
)  # fmt: skip
def test_malformed_output_is_a_parse_error_naming_what(text: str, message: str) -> None:
    with pytest.raises(ProbeParseError) as caught:
        parse_table_listing(text, "inet", "t")
    assert caught.value.message == message


def test_libnftables_errors_are_one_short_line() -> None:
    where = "network namespace /var/run/netns/x"
    missing = libnftables_error(fixture("list_table_missing.stderr"), "inet", "absent", where)
    assert missing.kind == "io"
    assert missing.message == f"table inet absent does not exist in {where}"
    denied = libnftables_error(
        "netlink: Error: cache initialization failed: Operation not permitted\n", "inet", "t", where
    )
    assert denied.message == f"reading nftables in {where} needs CAP_NET_ADMIN (EPERM)"
    other = libnftables_error("internal:0:0-0: Error: Could not process rule: Bad thing\n\n"
                              "more\n", "inet", "t", where)  # fmt: skip
    assert other.message == "libnftables: Error: Could not process rule: Bad thing"
