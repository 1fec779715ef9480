"""The tap_link probe against real namespaces and TAPs, as root.

Each test makes its own namespaces and TAPs (names carry this process's
pid) and removes them, also on failure. Between readings the tests await
the watcher having seen the kernel's notification, never a sleep.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.config import Config, parse_config
from cellos_probed.daemon import DaemonHandle, Prober, run_daemon
from cellos_probed.netns import NamespaceError, NetnsPath
from cellos_probed.probes import CapturingSink
from cellos_probed.probes.tap_link import LinkWatcher, LinkWatchers
from testbed.taps import (
    NETNS_DIR,
    attached_tap,
    create_tap,
    delete_tap,
    ip,
    link_details,
    many_taps,
    network_namespace,
    open_tap_fd,
    set_link,
    tap_device,
    unique_name,
)
from tests.conftest import needs_root
from tests.probing import running
from tests.test_daemon import RunnableSink

pytestmark = needs_root
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TAP_TYPE = "dev.cellos.events.cell.observability.host.v1.tap_link"
ERROR_TYPE = "dev.cellos.events.cell.observability.host.v1.probe_error"
STATS_KEYS = (
    "rx_bytes", "rx_packets", "rx_errors", "rx_dropped",
    "tx_bytes", "tx_packets", "tx_errors", "tx_dropped",
)  # fmt: skip


@dataclass
class Cell:
    id: str
    interface: str
    netns: Path | None = None


def make_config(cells: list[Cell], *, tick: float = 1.0, netns_root: str | None = None) -> Config:
    text = f"[daemon]\ntick_seconds = {tick}\n"
    if netns_root is not None:
        text += f'[paths]\nnetns_root = "{netns_root}"\n'
    for cell in cells:
        text += f'[[cell]]\nid = "{cell.id}"\nrun_id = "run-{cell.id}"\n'
        text += f'spec_signature_hash = "sha256:{cell.id}"\n'
        if cell.netns is not None:
            text += f'netns = "{cell.netns}"\n'
        text += f'[cell.tap_link]\ninterface = "{cell.interface}"\n'
    return parse_config(text)


async def tick(prober: Prober) -> dict[str, CloudEvent]:
    sink = prober.sink
    assert isinstance(sink, CapturingSink)
    before = len(sink.events)
    await prober.tick()
    return {event.data["cellId"]: event for event in sink.events[before:]}


def states(output: dict[str, Any]) -> list[tuple[bool, str, bool]]:
    return [(t["carrier"], t["operstate"], t["admin_up"]) for t in output["transitions"]]


def link_state(output: dict[str, Any]) -> dict[str, Any]:
    """The output but what moves between readings (transitions, counters and their deltas)."""
    return {
        key: value for key, value in output.items() if key not in ("transitions", "stats", "deltas")
    }


def carrier_flips(readings: list[dict[str, Any]], initial: bool) -> int:
    flips, carrier = 0, initial
    for output in readings:
        for transition in output["transitions"]:
            if transition["carrier"] != carrier:
                flips, carrier = flips + 1, transition["carrier"]
    return flips


async def watcher_of(prober: Prober, netns: Path | None) -> LinkWatcher:
    root = prober.config.paths.netns_root
    return await prober.services.link_watchers.watcher(
        None if netns is None else NetnsPath(root, netns)
    )


def link_is(
    watcher: LinkWatcher, name: str, *, operstate: str, admin_up: bool = True
) -> Callable[[], bool]:
    def check() -> bool:
        link = watcher.link(name)
        return link is not None and link.operstate == operstate and link.admin_up == admin_up

    return check


async def test_carrier_follows_a_process_attaching_through_dev_net_tun() -> None:
    ns, tap = unique_name("ctl"), unique_name("tap")
    with network_namespace(ns) as path, tap_device(tap, ns), trio.fail_after(20):
        async with running(make_config([Cell("cell-1", tap, path)])) as prober:
            first = (await tick(prober))["cell-1"]
            assert first.type == TAP_TYPE
            assert first.data["inputs"] == {"interface": tap, "netns": str(path)}
            details = link_details(tap, ns)
            assert first.data["output"] == {
                "ifindex": details["ifindex"],
                "operstate": "DOWN",
                "carrier": False,
                "carrier_changes": 1,
                "flags": ["UP", "BROADCAST", "MULTICAST"],
                "admin_up": True,
                "mtu": 1500,
                "address": details["address"],
                "transitions": [],
                "stats": dict.fromkeys(STATS_KEYS, 0),  # nothing passed without a carrier
                "deltas": None,
            }
            watcher = await watcher_of(prober, path)
            attached_at = datetime.now(UTC)
            with attached_tap(tap, ns):
                await watcher.wait_until(link_is(watcher, tap, operstate="UP"))
                second = (await tick(prober))["cell-1"].data["output"]
            assert link_state(second) == {
                **link_state(first.data["output"]),
                "operstate": "UP",
                "carrier": True,
                "carrier_changes": 2,
                "flags": ["UP", "BROADCAST", "RUNNING", "MULTICAST", "LOWER_UP"],
            }
            assert states(second) == [(True, "UP", True)]
            at = second["transitions"][0]["at"]
            assert RFC3339_MS.fullmatch(at)
            assert at >= attached_at.strftime("%Y-%m-%dT%H:%M:%S")

            # closed: the carrier drops at once, operstate follows when linkwatch runs
            await watcher.wait_until(link_is(watcher, tap, operstate="DOWN"))
            third = (await tick(prober))["cell-1"].data["output"]
            assert (third["carrier"], third["operstate"], third["carrier_changes"]) == (
                False,
                "DOWN",
                3,
            )
            assert third["flags"] == ["UP", "BROADCAST", "MULTICAST"]
            assert states(third) == [(False, "UP", True), (False, "DOWN", True)]
            # every carrier change the kernel counted is in the transitions
            readings = [first.data["output"], second, third]
            flips = carrier_flips(readings, initial=False)
            assert flips == third["carrier_changes"] - first.data["output"]["carrier_changes"]


async def test_a_flap_between_two_readings_is_in_the_next_readings_transitions() -> None:
    ns, tap = unique_name("ctl"), unique_name("tap")
    with network_namespace(ns) as path, tap_device(tap, ns), trio.fail_after(20):
        vmm = [open_tap_fd(tap, ns)]  # the VMM's descriptor; closed whatever happens
        try:
            async with running(make_config([Cell("cell-1", tap, path)])) as prober:
                watcher = await watcher_of(prober, path)
                await watcher.wait_until(link_is(watcher, tap, operstate="UP"))
                before = (await tick(prober))["cell-1"].data["output"]
                assert (before["carrier"], before["operstate"]) == (True, "UP")

                # administratively down and up again, both before the next tick
                set_link(tap, "down", ns)
                set_link(tap, "up", ns)
                seen = len(watcher.transitions_since(tap, 0))
                await watcher.wait_until(
                    lambda: (
                        len(watcher.transitions_since(tap, 0)) >= seen + 2
                        and link_is(watcher, tap, operstate="UP")()
                    )
                )
                after = (await tick(prober))["cell-1"].data["output"]
                # the state looks unchanged; the transitions tell what happened in between
                assert link_state(after) == link_state(before)
                assert states(after) == [(True, "DOWN", False), (True, "UP", True)]
                first_at, second_at = (t["at"] for t in after["transitions"])
                assert first_at <= second_at

                # the carrier flaps too: the VMM closes the TAP and opens it again at once
                os.close(vmm.pop())
                vmm.append(open_tap_fd(tap, ns))
                await watcher.wait_until(
                    lambda: (
                        (link := watcher.link(tap)) is not None
                        and link.carrier_changes == before["carrier_changes"] + 2
                        and link.operstate == "UP"
                    )
                )
                flapped = (await tick(prober))["cell-1"].data["output"]
                assert (flapped["carrier"], flapped["operstate"]) == (True, "UP")
                assert flapped["carrier_changes"] == before["carrier_changes"] + 2
                assert carrier_flips([flapped], initial=True) == 2
                assert flapped["transitions"][0]["carrier"] is False
        finally:
            for fd in vmm:
                os.close(fd)


async def test_cells_in_two_namespaces_and_the_host_read_in_one_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ns_a, ns_b = unique_name("cla"), unique_name("clb")
    shared_name = unique_name("tap")  # the same name in both namespaces
    host_tap = unique_name("tah")
    with ExitStack() as stack:
        path_a = stack.enter_context(network_namespace(ns_a))
        path_b = stack.enter_context(network_namespace(ns_b))
        stack.enter_context(tap_device(shared_name, ns_a))
        stack.enter_context(tap_device(shared_name, ns_b))
        stack.enter_context(tap_device(host_tap))
        ip("link", "set", shared_name, "address", "02:fc:00:00:0a:01", netns=ns_a)
        ip("link", "set", shared_name, "address", "02:fc:00:00:0b:01", netns=ns_b)
        ip("link", "set", host_tap, "address", "02:fc:00:00:0c:01")
        stack.enter_context(attached_tap(shared_name, ns_b))
        config = make_config(
            [
                Cell("cell-a", shared_name, path_a),
                Cell("cell-b", shared_name, path_b),
                Cell("cell-host", host_tap),
            ]
        )

        def no_fork() -> int:
            raise AssertionError("a process was forked")

        with trio.fail_after(20):
            async with running(config) as prober:
                watcher_b = await watcher_of(prober, path_b)
                await watcher_b.wait_until(link_is(watcher_b, shared_name, operstate="UP"))
                monkeypatch.setattr(os, "fork", no_fork)
                readings = [await tick(prober) for _ in range(3)]
                monkeypatch.undo()
                watchers = [await watcher_of(prober, p) for p in (path_a, path_b, None)]

    for events in readings:
        assert sorted(events) == ["cell-a", "cell-b", "cell-host"]
        assert {e.type for e in events.values()} == {TAP_TYPE}
        outputs = {cell: event.data["output"] for cell, event in events.items()}
        assert outputs["cell-a"]["address"] == "02:fc:00:00:0a:01"
        assert outputs["cell-b"]["address"] == "02:fc:00:00:0b:01"
        assert outputs["cell-host"]["address"] == "02:fc:00:00:0c:01"
        assert [outputs[c]["carrier"] for c in ("cell-a", "cell-b", "cell-host")] == [
            False,
            True,
            False,
        ]
        assert events["cell-host"].data["inputs"] == {"interface": host_tap, "netns": None}
    # one dump per namespace at start, then one per namespace and tick (the counters)
    assert [w.dumps for w in watchers] == [4, 4, 4]
    assert len({id(w) for w in watchers}) == 3


async def test_missing_namespace_non_namespace_and_missing_interface_are_each_cells_own(
    tmp_path: Path,
) -> None:
    ns, tap = unique_name("clm"), unique_name("tap")
    not_a_namespace = Path("/var/run/netns") / unique_name("file")
    missing = Path("/var/run/netns") / unique_name("gone")
    with network_namespace(ns) as path, tap_device(tap, ns), trio.fail_after(20):
        not_a_namespace.write_text("")
        try:
            config = make_config(
                [
                    Cell("good", tap, path),
                    Cell("no-netns", tap, missing),
                    Cell("not-netns", tap, not_a_namespace),
                    Cell("no-tap", "tap-nowhere", path),
                ]
            )
            async with running(config) as prober:
                for _ in range(2):  # the second tick answers from the remembered failure
                    events = await tick(prober)
                    assert events["good"].type == TAP_TYPE
                    errors = {
                        cell: events[cell].data["error"]
                        for cell in ("no-netns", "not-netns", "no-tap")
                    }
                    assert {cell: events[cell].type for cell in errors} == dict.fromkeys(
                        errors, ERROR_TYPE
                    )
                    assert errors == {
                        "no-netns": {
                            "kind": "io",
                            "message": f"network namespace does not exist: {missing}",
                        },
                        "not-netns": {
                            "kind": "io",
                            "message": f"not a network namespace: {not_a_namespace}",
                        },
                        "no-tap": {
                            "kind": "io",
                            "message": f"interface tap-nowhere does not exist in "
                            f"network namespace {path}",
                        },
                    }
                    assert events["no-netns"].data["inputs"] == {
                        "interface": tap,
                        "netns": str(missing),
                    }
        finally:
            not_a_namespace.unlink()


async def test_tap_deleted_and_recreated_while_the_daemon_runs() -> None:
    ns, tap, neighbour = unique_name("cld"), unique_name("tap"), unique_name("tan")
    with network_namespace(ns) as path, tap_device(neighbour, ns), trio.fail_after(30):
        create_tap(tap, ns)
        try:
            old_index = link_details(tap, ns)["ifindex"]
            config = make_config(
                [Cell("cell-1", tap, path), Cell("cell-2", neighbour, path)], tick=0.1
            )
            sink = RunnableSink()
            async with trio.open_nursery() as nursery:
                handle: DaemonHandle = await nursery.start(
                    lambda task_status: run_daemon(
                        config, sink, handle_signals=False, task_status=task_status
                    )
                )

                def last(cell: str) -> CloudEvent | None:
                    events = sink.of(cell)
                    return events[-1] if events else None

                def last_is(cell: str, kind: str) -> bool:
                    event = last(cell)
                    return event is not None and event.type.endswith(kind)

                await sink.wait_until(lambda: last_is("cell-1", ".tap_link"))
                assert last("cell-1").data["output"]["ifindex"] == old_index  # type: ignore[union-attr]

                delete_tap(tap, ns)  # the cell stopped
                await sink.wait_until(lambda: last_is("cell-1", ".probe_error"))
                error = last("cell-1")
                assert error is not None
                assert error.data["error"] == {
                    "kind": "io",
                    "message": f"interface {tap} does not exist in network namespace {path}",
                }

                create_tap(tap, ns)  # the cell started again
                new_index = link_details(tap, ns)["ifindex"]
                await sink.wait_until(lambda: last_is("cell-1", ".tap_link"))
                reading = last("cell-1")
                assert reading is not None
                assert reading.data["output"]["ifindex"] == new_index != old_index
                # the link's appearance is reported as a change
                assert reading.data["output"]["transitions"][-1]["admin_up"] is True
                handle.stop()
            # the neighbour in the same namespace never noticed
            assert {e.type for e in sink.of("cell-2")} == {TAP_TYPE}
            sequences = [(e.cellosseq or 0) for e in sink.of("cell-1")]
            assert sequences == list(range(1, len(sequences) + 1))
        finally:
            delete_tap(tap, ns, missing_ok=True)


async def test_a_namespace_recreated_at_the_same_path_is_followed() -> None:
    ns, tap = unique_name("clr"), unique_name("tap")
    with trio.fail_after(20):
        with network_namespace(ns) as path:
            config = make_config([Cell("cell-1", tap, path)])
            async with running(config) as prober:
                with tap_device(tap, ns):
                    ip("link", "set", tap, "address", "02:fc:00:00:01:01", netns=ns)
                    first = (await tick(prober))["cell-1"]
                    assert first.data["output"]["address"] == "02:fc:00:00:01:01"
                ip("netns", "delete", ns)
                gone = (await tick(prober))["cell-1"]
                assert gone.data["error"]["message"] == f"network namespace does not exist: {path}"
                ip("netns", "add", ns)  # another namespace at the same path
                with tap_device(tap, ns):
                    ip("link", "set", tap, "address", "02:fc:00:00:02:02", netns=ns)
                    again = (await tick(prober))["cell-1"]
                assert again.data["output"]["address"] == "02:fc:00:00:02:02"


async def test_the_daemons_watchers_look_at_a_namespace_once_a_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looked: list[str] = []
    real = NetnsPath.identity

    def counting(netns: NetnsPath) -> tuple[int, int]:
        looked.append(str(netns))
        return real(netns)

    monkeypatch.setattr(NetnsPath, "identity", counting)
    ns, ticks = unique_name("clt"), [1]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            watchers = LinkWatchers(lambda: nursery, tick=lambda: ticks[0])
            with network_namespace(ns) as path:
                netns = NetnsPath(NETNS_DIR, path)
                for _ in range(50):  # a tick's cells of one namespace, read in turn
                    await watchers.watcher(netns)
                assert looked == [str(path)]
                ticks[0] += 1
                await watchers.watcher(netns)
                assert looked == [str(path), str(path)]
            ticks[0] += 1  # the next tick sees the namespace gone
            with pytest.raises(NamespaceError, match="does not exist"):
                await watchers.watcher(netns)
            assert watchers._looked_at == {}  # nothing kept for a path that is gone
            nursery.cancel_scope.cancel()


async def test_a_watcher_no_cell_reads_any_more_takes_what_it_kept_with_it() -> None:
    ns = unique_name("cle")
    with trio.fail_after(20), network_namespace(ns) as path:
        async with trio.open_nursery() as nursery:
            watchers = LinkWatchers(lambda: nursery, tick=lambda: 1, idle_seconds=0.2)
            netns = NetnsPath(NETNS_DIR, path)
            watcher = await watchers.watcher(netns)
            assert set(watchers._looked_at) == {netns}
            await watcher.stopped.wait()  # expired, unused
            assert watchers._watchers == {}
            assert watchers._looked_at == {}
            nursery.cancel_scope.cancel()


async def test_a_namespaces_cells_are_read_together_and_fail_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cellos_probed.probes.tap_link import TapLinkProbe

    ns = unique_name("clb")
    taps = [unique_name("tap") for _ in range(3)]
    real = TapLinkProbe.reading_from

    def broken_for_the_second(probe: TapLinkProbe, watcher: LinkWatcher) -> Any:
        if probe._config.interface == taps[1]:
            raise RuntimeError("a bug")
        return real(probe, watcher)

    with trio.fail_after(20):
        with network_namespace(ns) as path:
            cells = [Cell(f"cell-{i}", tap, path) for i, tap in enumerate(taps)]
            async with running(make_config(cells)) as prober:
                with ExitStack() as stack:
                    for tap in taps:
                        stack.enter_context(tap_device(tap, ns))
                    monkeypatch.setattr(TapLinkProbe, "reading_from", broken_for_the_second)
                    read = await tick(prober)
                    monkeypatch.undo()
                    # an unexpected error costs its own cell only
                    assert read["cell-1"].data["error"] == {
                        "kind": "io",
                        "message": "unexpected RuntimeError",
                    }
                    assert read["cell-0"].kind == read["cell-2"].kind == "tap_link"
                ip("netns", "delete", ns)
                gone = await tick(prober)
                # the namespace's error is every cell's, each its own event
                assert {cell: event.data["error"]["message"] for cell, event in gone.items()} == {
                    f"cell-{i}": f"network namespace does not exist: {path}" for i in range(3)
                }


async def test_a_socket_overrun_is_repaired_by_a_dump() -> None:
    ns = unique_name("clo")
    names = [f"t{i}" for i in range(200)]
    with network_namespace(ns) as path, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            # a tiny receive queue (the kernel's minimum) overflows on a burst of changes
            watchers = LinkWatchers(lambda: nursery, receive_buffer=1)
            watcher = await watchers.watcher(NetnsPath(NETNS_DIR, path))
            # created while the trio thread is busy here, so nothing is read meanwhile
            with many_taps(ns, names, up_every=1):
                await watcher.wait_until(lambda: watcher.dumps >= 2 and not watcher.resync_pending)
                assert watcher.overruns >= 1
                expected = {"lo", *names}
                await watcher.wait_until(lambda: set(watcher.by_name) == expected)
                link = watcher.link("t7")
                assert link is not None
                assert (link.admin_up, link.carrier, link.operstate) == (True, False, "DOWN")
            nursery.cancel_scope.cancel()


def test_nothing_is_left_behind() -> None:
    pid = str(os.getpid())
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert pid not in namespaces
    assert pid not in links
