"""nftables tables as a Firecracker host has them, made with the ``nft`` CLI, and traffic to count.

A cell's table holds named counters and per-cell chains whose rules count
ICMP on the loopback device, so ``ping 127.0.0.1`` inside the namespace
moves every counter by an exact amount (:func:`ping`: each echo request and
each reply is one 84-byte IPv4 packet). Every context manager removes what
it made, also when the body raises. The tests use the CLI to set up state
and to take the reference reading; the daemon itself never runs ``nft``.

``netns`` is a name as ``ip netns`` knows it (``None``: the host's). Needs root.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from testbed.taps import ip, network_namespace

#: an ICMP echo of ``ping``'s default 56 data bytes: 20 (IPv4) + 8 (ICMP) + 56
ECHO_PACKET_BYTES: Final = 84


def nft(*args: str, netns: str | None = None, stdin: str | None = None, check: bool = True) -> str:
    """Run ``nft args...`` (inside ``netns``); its stdout. A failure raises with nft's message."""
    command = (["ip", "netns", "exec", netns] if netns is not None else []) + ["nft", *args]
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result.stdout


def nft_items(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    """``nft -j args...``: the items of its ``nftables`` list, metainfo left out."""
    items: list[dict[str, Any]] = json.loads(nft("-j", *args, netns=netns))["nftables"]
    return [item for item in items if "metainfo" not in item]


def load_ruleset(text: str, netns: str | None = None) -> None:
    """``nft -f -``: one transaction, all or nothing."""
    nft("-f", "-", netns=netns, stdin=text)


def delete_table(family: str, table: str, netns: str | None = None) -> None:
    nft("delete", "table", family, table, netns=netns, check=False)


def tables(netns: str | None = None) -> list[str]:
    """``family name`` of every table, as ``nft list tables`` prints them."""
    lines = nft("list", "tables", netns=netns).splitlines()
    return [line.removeprefix("table ").strip() for line in lines if line.startswith("table ")]


@dataclass(frozen=True)
class CellRules:
    """One cell's share of a table: named counters and an input chain of commented rules.

    The chain ``<cell>-in`` counts, on ``lo``: echo requests, echo replies
    (each with a comment), every ICMP packet into the named counter
    ``<cell>-rx``, and one rule without a comment; the output chain
    ``<cell>-out`` counts every ICMP packet leaving into ``<cell>-tx``.
    """

    cell: str
    #: the comments of the input chain's rules that have one, in order
    comments: tuple[str, ...] = ("echo requests", "echo replies")

    @property
    def rx(self) -> str:
        return f"{self.cell}-rx"

    @property
    def tx(self) -> str:
        return f"{self.cell}-tx"

    @property
    def chain(self) -> str:
        return f"{self.cell}-in"

    def text(self) -> str:
        return (
            f"  counter {self.rx} {{ }}\n"
            f"  counter {self.tx} {{ }}\n"
            f"  chain {self.chain} {{\n"
            "    type filter hook input priority 0; policy accept;\n"
            f'    iifname "lo" icmp type echo-request counter comment "{self.comments[0]}"\n'
            f'    iifname "lo" icmp type echo-reply counter comment "{self.comments[1]}"\n'
            f'    iifname "lo" meta l4proto icmp counter name "{self.rx}"\n'
            '    iifname "lo" meta l4proto icmp counter\n'
            "  }\n"
            f"  chain {self.cell}-out {{\n"
            "    type filter hook output priority 0; policy accept;\n"
            f'    oifname "lo" meta l4proto icmp counter name "{self.tx}"\n'
            "  }\n"
        )


@dataclass(frozen=True)
class TableSpec:
    """A table: the cells' rules plus any extra bare named counters."""

    family: str
    name: str
    cells: Sequence[CellRules] = ()
    extra_counters: Sequence[str] = field(default_factory=tuple)

    def text(self) -> str:
        body = "".join(cell.text() for cell in self.cells)
        body += "".join(f"  counter {name} {{ }}\n" for name in self.extra_counters)
        return f"table {self.family} {self.name} {{\n{body}}}\n"

    def replacement_text(self) -> str:
        """Delete and re-add in one transaction, as a ruleset reload does (``add`` first,
        so the delete never fails on an absent table)."""
        return (
            f"add table {self.family} {self.name}\n"
            f"delete table {self.family} {self.name}\n" + self.text()
        )


@contextmanager
def nft_table(spec: TableSpec, netns: str | None = None) -> Iterator[TableSpec]:
    """The table loaded (inside ``netns``); deleted afterwards."""
    load_ruleset(spec.text(), netns)
    try:
        yield spec
    finally:
        delete_table(spec.family, spec.name, netns)


def reload_table(spec: TableSpec, netns: str | None = None) -> None:
    """Replace the table with a fresh copy (``nft -f``): every counter restarts at zero."""
    load_ruleset(spec.replacement_text(), netns)


@contextmanager
def namespace_with_loopback(name: str) -> Iterator[str]:
    """A new network namespace whose ``lo`` is up; yields its path. Deleted afterwards."""
    with network_namespace(name) as path:
        ip("link", "set", "lo", "up", netns=name)
        yield str(path)


def ping(netns: str, count: int, interval: float = 0.02) -> None:
    """``count`` ICMP echo requests to 127.0.0.1 inside ``netns``; returns once all are answered."""
    subprocess.run(
        ["ip", "netns", "exec", netns, "ping", "-q", "-n", "-c", str(count),
         "-i", str(interval), "-W", "2", "127.0.0.1"],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def counter_figures(family: str, table: str, netns: str | None = None) -> dict[str, dict[str, int]]:
    """``nft -j list counters table``: ``{name: {"packets", "bytes"}}``."""
    return {
        item["counter"]["name"]: {
            "packets": item["counter"]["packets"],
            "bytes": item["counter"]["bytes"],
        }
        for item in nft_items("list", "counters", "table", family, table, netns=netns)
        if "counter" in item
    }


def chain_rule_figures(
    family: str, table: str, chain: str, netns: str | None = None
) -> list[dict[str, Any]]:
    """``nft -j list chain``: each rule's handle, comment and counter (named ones resolved)."""
    named = counter_figures(family, table, netns)
    rules = []
    for item in nft_items("list", "chain", family, table, chain, netns=netns):
        rule = item.get("rule")
        if rule is None:
            continue
        for expression in rule["expr"]:
            if "counter" in expression:
                counter = expression["counter"]
                figures = named[counter] if isinstance(counter, str) else counter
                rules.append(
                    {
                        "handle": rule["handle"],
                        "comment": rule.get("comment"),
                        "packets": figures["packets"],
                        "bytes": figures["bytes"],
                    }
                )
                break
    return rules


def namespaces() -> list[str]:
    """The names ``ip netns list`` shows."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
