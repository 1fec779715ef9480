"""A cell's namespace path stays under ``[paths] netns_root`` when it is opened, as root.

The loader refuses a path that leads out of the root through a symlink
(test_config), but the tree can change after load: a symlink planted later,
anywhere below the root, must be refused when the namespace is looked at or
entered, never followed into a namespace outside the root.

Each test bind-mounts real namespaces (``ip netns add``) onto files under a
temporary root and removes every mount, namespace, TAP and table it made,
also on failure.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from cellos_probed.config import parse_config
from cellos_probed.daemon import Prober
from cellos_probed.probes import CapturingSink, SequenceRegistry
from testbed.nft import TableSpec, namespaces, nft_table, tables
from testbed.taps import ip, netns_path, network_namespace, tap_device, unique_name
from tests.conftest import needs_root

pytestmark = needs_root
PID = str(os.getpid())


@pytest.fixture(autouse=True)
def leaves_nothing_behind() -> Iterator[None]:
    host_tables = tables()
    yield
    assert [name for name in namespaces() if PID in name] == []
    assert tables() == host_tables
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert PID not in links
    with open("/proc/self/mountinfo") as mounts:
        assert f"cellos-netns-{PID}" not in mounts.read()


@contextmanager
def bound(name: str, target: Path) -> Iterator[Path]:
    """Namespace ``name`` bind-mounted on ``target`` (as ``ip netns add`` does under /run)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch()
    subprocess.run(["mount", "--bind", str(netns_path(name)), str(target)], check=True)
    try:
        yield target
    finally:
        # the test may have unmounted it already, to plant its symlink
        subprocess.run(["umount", str(target)], capture_output=True, check=False)


def unmount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)
    target.unlink()


@contextmanager
def namespace_with(name: str, tap: str, address: str, table: TableSpec) -> Iterator[None]:
    """A namespace holding a TAP with ``address`` and ``table``; all removed afterwards."""
    with network_namespace(name), tap_device(tap, name), nft_table(table, name):
        ip("link", "set", tap, "address", address, netns=name)
        yield


INSIDE_ADDRESS, OUTSIDE_ADDRESS = "02:fc:00:00:0e:01", "02:fc:00:00:0e:02"


def config_text(root: Path, tap: str, table: str) -> str:
    return (
        f'[paths]\nnetns_root = "{root}"\n'
        '[[cell]]\nid = "cell-1"\nrun_id = "r"\nspec_signature_hash = "h"\n'
        'netns = "vm/net"\n'
        f'[cell.tap_link]\ninterface = "{tap}"\n'
        f'[cell.nftables]\nfamily = "inet"\ntable = "{table}"\n'
        'counters = ["inside", "outside"]\n'
    )


async def tick(prober: Prober) -> dict[str, dict[str, Any]]:
    """One tick's events of the cell, by probe (``tap_link``, ``nftables`` or the error's)."""
    sink = prober.sink
    assert isinstance(sink, CapturingSink)
    before = len(sink.events)
    await prober.tick(prober.ticks.begun)  # a new index: nftables lists the table again
    return {
        event.data["probeSource"].removeprefix("host."): {"kind": event.kind, **event.data}
        for event in sink.events[before:]
    }


@pytest.mark.parametrize("planted", ["directory", "file"])
async def test_a_symlink_planted_after_load_is_refused_not_followed(
    tmp_path: Path, planted: str
) -> None:
    """``vm`` (a directory in the middle of the path) or ``vm/net`` (the namespace file
    itself) becomes a symlink to a namespace outside the root after the config loaded."""
    base = tmp_path / f"cellos-netns-{PID}"
    root, outside = base / "root", base / "outside"
    tap, table = unique_name("tcf"), f"cellos{PID}"
    inside_ns, outside_ns = unique_name("nci"), unique_name("nco")
    with ExitStack() as stack:
        for ns, address, counter in (
            (inside_ns, INSIDE_ADDRESS, "inside"),
            (outside_ns, OUTSIDE_ADDRESS, "outside"),
        ):
            spec = TableSpec("inet", table, extra_counters=(counter,))
            stack.enter_context(namespace_with(ns, tap, address, spec))
        inside = stack.enter_context(bound(inside_ns, root / "vm" / "net"))
        stack.enter_context(bound(outside_ns, outside / "net"))
        config = parse_config(config_text(root, tap, table))
        sink = CapturingSink()
        prober = Prober(config, sink, SequenceRegistry())
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(prober.run_services)
                try:
                    before = await tick(prober)
                    assert before["tap_link"]["output"]["address"] == INSIDE_ADDRESS
                    assert list(before["nftables"]["output"]["counters"]) == ["inside"]

                    unmount(inside)
                    if planted == "directory":
                        inside.parent.rmdir()
                        os.symlink(outside, inside.parent)
                    else:
                        os.symlink(outside / "net", inside)
                    after = [await tick(prober) for _ in range(2)]
                finally:
                    prober.services.nft_tables.stop()
                    nursery.cancel_scope.cancel()

    path = root / "vm" / "net"
    for events in after:
        assert set(events) == {"tap_link", "nftables"}
        for probe, event in events.items():
            assert event["kind"] == "probe_error", (probe, event)
            assert event["error"] == {
                "kind": "io",
                "message": f"network namespace path {path} goes through a symlink; refusing it",
            }
    # the namespace outside was never read: every reading is of the one inside
    readings = {e.kind: e.data["output"] for e in sink.events if e.kind != "probe_error"}
    assert len(sink.events) == 2 + 2 * 2  # the first tick's two readings, then errors only
    assert readings["tap_link"]["address"] == INSIDE_ADDRESS
    assert list(readings["nftables"]["counters"]) == ["inside"]


def release_readers(fifo: Path) -> None:
    """Open ``fifo`` for writing once, so that a reader blocked opening it goes on."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody is opening it, as it should be
        return
    os.close(fd)


async def test_a_fifo_at_the_namespace_path_is_not_a_namespace_and_blocks_nothing(
    tmp_path: Path,
) -> None:
    """Looking at the namespace means opening it now: a FIFO planted there must not block."""
    root = tmp_path / "root"
    root.mkdir()
    fifo = root / "vm"
    os.mkfifo(fifo)
    tap, table = unique_name("tcf"), f"cellos{PID}"
    config = parse_config(
        "[daemon]\ntick_seconds = 2.0\nprobe_timeout_seconds = 1.0\n"
        + config_text(root, tap, table).replace('"vm/net"', '"vm"')
    )
    prober = Prober(config, CapturingSink(), SequenceRegistry())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(prober.run_services)
            try:
                events = await tick(prober)
            finally:
                release_readers(fifo)  # lets a thread blocked opening it finish
                prober.services.nft_tables.stop()
                nursery.cancel_scope.cancel()
    error = {"kind": "io", "message": f"not a network namespace: {fifo}"}
    assert {probe: event["error"] for probe, event in events.items()} == {
        "tap_link": error,
        "nftables": error,
    }
