"""tap_link's traffic figures (IFLA_STATS64) and their deltas, through real TAPs, as root.

The test holds each TAP's descriptor as a VMM does and makes the traffic
itself. On the host's side of a TAP the kernel counts a frame the VMM
writes into its descriptor as received (``rx``; one no protocol takes is
also ``rx_dropped``), and a frame the host sends out of the TAP as
transmitted (``tx``) when the VMM reads it, or as ``tx_dropped`` when the
TAP's queue is full. IPv6 is off in the test's namespaces: its router
solicitations would move the counters at moments of their own.

The kernel announces a link's changes of state, not its traffic: these
readings see the traffic with no link change in between.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import trio

from cellos_probed.netns import NetnsPath, enter_netns
from cellos_probed.tail import format_event
from testbed.taps import (
    NETNS_DIR,
    attached_tap,
    create_tap,
    delete_tap,
    ip,
    link_details,
    network_namespace,
    tap_device,
    unique_name,
)
from tests.conftest import needs_root
from tests.probing import running
from tests.test_tap_link import STATS_KEYS, Cell, make_config, tick

pytestmark = needs_root

#: Firecracker's TAP flags include IFF_VNET_HDR: each frame in the descriptor
#: follows a virtio_net_hdr (10 bytes unless TUNSETVNETHDRSZ says otherwise)
VNET_HDR = bytes(10)
#: an EtherType no protocol of the host takes (IEEE 802 local experimental)
EXPERIMENTAL = b"\x88\xb5"


def frame(size: int) -> bytes:
    """An Ethernet frame of ``size`` bytes from the VM's address to the TAP's."""
    head = bytes.fromhex("02fc000000aa") + bytes.fromhex("02fc000000bb") + EXPERIMENTAL
    return head + b"x" * (size - len(head))


@contextmanager
def quiet_namespace(name: str) -> Iterator[Path]:
    """A network namespace in which the kernel itself sends nothing (no IPv6)."""
    with network_namespace(name) as path:
        ip("netns", "exec", name, "sysctl", "-q", "-w",
           "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")  # fmt: skip
        yield path


@contextmanager
def packet_socket(tap: str, ns: str) -> Iterator[socket.socket]:
    """An AF_PACKET socket bound to ``tap``: what it sends leaves through the TAP.

    Made on a thread that entered the namespace (a socket stays in the
    namespace it was made in), as ``testbed.taps.open_tap_fd`` does.
    """
    made: list[socket.socket] = []
    failure: list[BaseException] = []

    def make() -> None:
        try:
            enter_netns(NetnsPath(NETNS_DIR, NETNS_DIR / ns))
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC)
            sock.bind((tap, 0))
            made.append(sock)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=make, name=f"packet:{tap}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    with made[0] as sock:
        yield sock


def vm_sends(fd: int, sizes: list[int]) -> None:
    """The VM's frames, written into the TAP's descriptor: the host receives them."""
    for size in sizes:
        assert os.write(fd, VNET_HDR + frame(size)) == len(VNET_HDR) + size


async def vm_reads(fd: int, count: int) -> list[int]:
    """``count`` frames read from the descriptor as the VM would; their sizes."""
    sizes: list[int] = []
    while len(sizes) < count:
        await trio.lowlevel.wait_readable(fd)
        sizes.append(len(os.read(fd, 65536)) - len(VNET_HDR))
    return sizes


def iproute2_stats(tap: str, ns: str) -> dict[str, int]:
    """``ip -s -j link show``'s figures under the probe's names."""
    [link] = json.loads(ip("-s", "-j", "link", "show", tap, netns=ns))
    shown = link["stats64"]
    return {key: shown[key[:2]][key[3:]] for key in STATS_KEYS}


def minus(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in STATS_KEYS}


async def test_stats_are_iproute2s_after_traffic_both_ways() -> None:
    ns, tap = unique_name("sts"), unique_name("tap")
    with quiet_namespace(ns) as path, tap_device(tap, ns), trio.fail_after(20):
        ip("link", "set", tap, "txqueuelen", "4", netns=ns)  # a queue the test can fill
        with attached_tap(tap, ns) as fd, packet_socket(tap, ns) as host:
            os.set_blocking(fd, False)
            async with running(make_config([Cell("cell-1", tap, path)])) as prober:
                vm_sends(fd, [60, 100, 1514])
                for size in (70, 80, 90, 100, 110, 120, 130):  # 4 fit the queue, 3 are dropped
                    host.send(frame(size))
                assert await vm_reads(fd, 4) == [70, 80, 90, 100]
                # the traffic has stopped: iproute2 and the probe see the same figures
                expected = iproute2_stats(tap, ns)
                output = (await tick(prober))["cell-1"].data["output"]
    assert output["stats"] == expected
    assert expected == {
        "rx_bytes": 60 + 100 + 1514,
        "rx_packets": 3,
        "rx_errors": 0,
        "rx_dropped": 3,  # no protocol takes the experimental EtherType
        "tx_bytes": 70 + 80 + 90 + 100,
        "tx_packets": 4,
        "tx_errors": 0,
        "tx_dropped": 3,
    }
    assert output["deltas"] is None  # the cell's first reading


async def test_deltas_are_the_increase_since_the_previous_reading() -> None:
    ns, tap = unique_name("std"), unique_name("tap")
    with ExitStack() as stack, trio.fail_after(20):
        path = stack.enter_context(quiet_namespace(ns))
        stack.enter_context(tap_device(tap, ns))
        fd = stack.enter_context(attached_tap(tap, ns))
        host = stack.enter_context(packet_socket(tap, ns))
        os.set_blocking(fd, False)
        async with running(make_config([Cell("cell-1", tap, path)])) as prober:
            vm_sends(fd, [64])
            first = (await tick(prober))["cell-1"].data["output"]
            # traffic alone: the link's state does not change, the kernel announces nothing
            vm_sends(fd, [200, 300])
            host.send(frame(150))
            assert await vm_reads(fd, 1) == [150]
            second = (await tick(prober))["cell-1"].data["output"]
            assert second["stats"] == iproute2_stats(tap, ns)
            third = (await tick(prober))["cell-1"].data["output"]
    assert first["stats"]["rx_packets"] == 1
    assert first["deltas"] is None
    assert second["deltas"] == {"stats": minus(second["stats"], first["stats"]), "reset": False}
    assert second["deltas"]["stats"] == {
        **dict.fromkeys(STATS_KEYS, 0),
        "rx_bytes": 500,
        "rx_packets": 2,
        "rx_dropped": 2,
        "tx_bytes": 150,
        "tx_packets": 1,
    }
    assert third["stats"] == second["stats"]
    assert third["deltas"] == {"stats": dict.fromkeys(STATS_KEYS, 0), "reset": False}
    assert [out["transitions"] for out in (first, second, third)] == [[], [], []]


async def test_a_recreated_tap_resets_the_baseline_even_with_no_counter_lower() -> None:
    """A new ifindex is a new device: its counters are not an increase of the old one's."""
    ns, tap = unique_name("str"), unique_name("tap")
    with quiet_namespace(ns) as path, trio.fail_after(20):
        create_tap(tap, ns)
        try:
            async with running(make_config([Cell("cell-1", tap, path)])) as prober:
                idle = (await tick(prober))["cell-1"].data["output"]
                assert idle["stats"] == dict.fromkeys(STATS_KEYS, 0)
                delete_tap(tap, ns)
                create_tap(tap, ns)
                recreated = (await tick(prober))["cell-1"].data["output"]
                again = (await tick(prober))["cell-1"].data["output"]
        finally:
            delete_tap(tap, ns, missing_ok=True)
    assert recreated["ifindex"] != idle["ifindex"]
    assert recreated["stats"] == dict.fromkeys(STATS_KEYS, 0)  # no counter went down
    assert recreated["deltas"] == {"stats": dict.fromkeys(STATS_KEYS, 0), "reset": True}
    assert again["deltas"] == {"stats": dict.fromkeys(STATS_KEYS, 0), "reset": False}


async def test_a_tap_recreated_while_the_cell_could_not_read_it_resets_the_baseline() -> None:
    ns, tap = unique_name("stg"), unique_name("tap")
    with quiet_namespace(ns) as path, trio.fail_after(20):
        create_tap(tap, ns)
        try:
            async with running(make_config([Cell("cell-1", tap, path)])) as prober:
                with attached_tap(tap, ns) as fd:
                    vm_sends(fd, [100, 100, 100])
                    busy = (await tick(prober))["cell-1"].data["output"]
                delete_tap(tap, ns)
                gone = (await tick(prober))["cell-1"]
                create_tap(tap, ns)
                with attached_tap(tap, ns) as fd:
                    vm_sends(fd, [80])
                    recreated = (await tick(prober))["cell-1"].data["output"]
                    new_stats = iproute2_stats(tap, ns)
                    vm_sends(fd, [90])
                    after: dict[str, Any] = (await tick(prober))["cell-1"].data["output"]
                new_index = link_details(tap, ns)["ifindex"]
        finally:
            delete_tap(tap, ns, missing_ok=True)
    assert busy["stats"]["rx_packets"] == 3
    assert gone.type.endswith(".probe_error")
    assert recreated["ifindex"] == new_index != busy["ifindex"]
    # the new device's counters from zero, not their difference from the old one's
    assert recreated["stats"] == new_stats
    assert recreated["deltas"] == {"stats": new_stats, "reset": True}
    assert after["deltas"] == {"stats": minus(after["stats"], new_stats), "reset": False}
    assert (after["deltas"]["stats"]["rx_packets"], after["deltas"]["stats"]["rx_bytes"]) == (1, 90)


def test_tail_shows_the_traffic_since_the_previous_reading() -> None:
    def event(output: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "dev.cellos.events.cell.observability.host.v1.tap_link",
            "time": "2026-11-25T10:15:02.123Z",
            "cellosseq": 3,
            "data": {"cellId": "cell-1", "hostId": "host-a", "probeSource": "host.tap_link",
                     "output": output},
        }  # fmt: skip

    stats = {**dict.fromkeys(STATS_KEYS, 0), "rx_bytes": 1674, "rx_packets": 3, "tx_bytes": 340}
    state = {"operstate": "UP", "carrier": True, "carrier_changes": 2, "transitions": []}
    moved = {**dict.fromkeys(STATS_KEYS, 0), "rx_bytes": 500, "rx_packets": 2, "tx_dropped": 3}
    line = format_event(
        event({**state, "stats": stats, "deltas": {"stats": moved, "reset": False}})
    )
    assert line.endswith("#3 UP carrier changes 2 rx +500B/2p tx +0B/0p dropped +0/+3")
    first = format_event(event({**state, "stats": stats, "deltas": None}))
    assert first.endswith("#3 UP carrier changes 2 rx 1674B/3p tx 340B/0p")
    reset = format_event(
        event({**state, "stats": stats, "deltas": {"stats": stats, "reset": True}})
    )
    assert reset.endswith("#3 UP carrier changes 2 rx +1674B/3p tx +340B/0p RESET")
