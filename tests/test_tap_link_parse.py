"""The rtnetlink parser on real kernel bytes, checked against pyroute2's decoder and iproute2.

``tests/data/rtnl_*.bin`` were captured from this kernel (6.18): a link
dump of a fresh namespace holding ``lo`` and a TAP ``tap-cell-1`` (MAC
02:fc:00:00:00:07, MTU 1400, admin up, no process attached), and the
RTM_NEWLINK notification sent when a process attached to that TAP through
/dev/net/tun; no frame had passed, so every counter is 0. The live tests
capture fresh bytes from the host namespace.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from cellos_probed.config import TapLinkProbeConfig
from cellos_probed.probes import ProbeParseError, rtnl
from cellos_probed.probes.rtnl import (
    STATS_KEYS,
    LinkInfo,
    LinkStats,
    flag_names,
    iter_messages,
    link_dump_request,
    parse_error_code,
    parse_link,
)
from cellos_probed.probes.tap_link import LinkWatcher, LinkWatchers, TapLinkProbe, stats_deltas

DATA = Path(__file__).parent / "data"
DUMP = (DATA / "rtnl_dump_lo_tap.bin").read_bytes()
ATTACH_EVENT = (DATA / "rtnl_newlink_tap_attach.bin").read_bytes()
NLM_F_MULTI = 0x2
IDLE: LinkStats = (0, 0, 0, 0, 0, 0, 0, 0)

LO = LinkInfo(
    index=1,
    name="lo",
    flags=0x8,  # LOOPBACK, not up in a fresh namespace
    operstate="DOWN",
    carrier=True,
    carrier_changes=0,
    mtu=65536,
    address="00:00:00:00:00:00",
)
TAP_DOWN = LinkInfo(
    index=2,
    name="tap-cell-1",
    flags=0x1003,
    operstate="DOWN",
    carrier=False,
    carrier_changes=1,
    mtu=1400,
    address="02:fc:00:00:00:07",
)
TAP_UP = LinkInfo(
    index=2,
    name="tap-cell-1",
    flags=0x11043,
    operstate="UP",
    carrier=True,
    carrier_changes=2,
    mtu=1400,
    address="02:fc:00:00:00:07",
)


def test_a_captured_dump_parses_to_each_link_and_done() -> None:
    messages = list(iter_messages(DUMP))
    assert [(m.type, m.flags, m.seq) for m in messages] == [
        (rtnl.RTM_NEWLINK, NLM_F_MULTI, 7),
        (rtnl.RTM_NEWLINK, NLM_F_MULTI, 7),
        (rtnl.NLMSG_DONE, NLM_F_MULTI, 7),
    ]
    assert parse_link(messages[0].payload) == (LO, IDLE)
    assert parse_link(messages[1].payload) == (TAP_DOWN, IDLE)


def test_the_attach_notification_says_carrier_up() -> None:
    [message] = list(iter_messages(ATTACH_EVENT))
    assert (message.type, message.flags, message.seq) == (rtnl.RTM_NEWLINK, 0, 0)
    link, stats = parse_link(message.payload)
    assert (link, stats) == (TAP_UP, IDLE)
    assert link.output() == {
        "ifindex": 2,
        "operstate": "UP",
        "carrier": True,
        "carrier_changes": 2,
        "flags": ["UP", "BROADCAST", "RUNNING", "MULTICAST", "LOWER_UP"],
        "admin_up": True,
        "mtu": 1400,
        "address": "02:fc:00:00:00:07",
    }
    assert link.state == (True, "UP", True)


def pyroute2_view(payload: bytes) -> tuple[object, ...]:
    """The same fields through pyroute2's generic decoder (the reference)."""
    message = ifinfmsg(payload)
    message.decode()
    stats = message.get_attr("IFLA_STATS64")
    return (
        message["index"],
        message.get_attr("IFLA_IFNAME"),
        message["flags"],
        message.get_attr("IFLA_OPERSTATE"),
        bool(message.get_attr("IFLA_CARRIER")),
        message.get_attr("IFLA_CARRIER_CHANGES"),
        message.get_attr("IFLA_MTU"),
        message.get_attr("IFLA_ADDRESS"),
        {key: stats[key] for key in STATS_KEYS},
    )


def our_view(parsed: tuple[LinkInfo, LinkStats | None]) -> tuple[object, ...]:
    link, stats = parsed
    assert stats is not None
    return (
        link.index,
        link.name,
        link.flags,
        link.operstate,
        link.carrier,
        link.carrier_changes,
        link.mtu,
        link.address,
        dict(zip(STATS_KEYS, stats, strict=True)),
    )


def whole_messages(data: bytes) -> list[tuple[int, bytes]]:
    """(type, header and payload) of each message: what pyroute2 decodes."""
    out, offset = [], 0
    while offset < len(data):
        length, msg_type = struct.unpack_from("=IH", data, offset)
        out.append((msg_type, data[offset : offset + length]))
        offset += (length + 3) & ~3
    return out


def test_parser_agrees_with_pyroute2_on_the_captured_bytes() -> None:
    links = [m for m in iter_messages(DUMP + ATTACH_EVENT) if m.type == rtnl.RTM_NEWLINK]
    references = [raw for kind, raw in whole_messages(DUMP + ATTACH_EVENT) if kind == 16]
    assert len(links) == len(references) == 3
    for message, raw in zip(links, references, strict=True):
        assert our_view(parse_link(message.payload)) == pyroute2_view(raw)


def capture_host_dump() -> bytes:
    """A fresh RTM_GETLINK dump of this process's namespace (no privilege needed)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sock:
        sock.bind((0, 0))
        sock.send(link_dump_request(42))
        chunks = []
        while True:
            data = sock.recv(65536)
            chunks.append(data)
            if any(m.type == rtnl.NLMSG_DONE for m in iter_messages(data)):
                return b"".join(chunks)


def test_a_live_dump_agrees_with_pyroute2_and_iproute2() -> None:
    data = capture_host_dump()
    parsed = [parse_link(m.payload) for m in iter_messages(data) if m.type == rtnl.RTM_NEWLINK]
    references = [raw for kind, raw in whole_messages(data) if kind == rtnl.RTM_NEWLINK]
    assert [our_view(one) for one in parsed] == [pyroute2_view(raw) for raw in references]
    links = [link for link, _ in parsed]
    shown = json.loads(
        subprocess.run(
            ["ip", "-j", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
    )
    ours = {(link.index, link.name, link.mtu, link.address, link.operstate) for link in links}
    theirs = {
        (item["ifindex"], item["ifname"], item["mtu"], item["address"], item["operstate"])
        for item in shown
    }
    assert ours == theirs


def test_attribute_numbers_are_pyroute2s() -> None:
    positions = {name: code for code, (name, _) in enumerate(ifinfmsg.nla_map)}
    assert positions["IFLA_ADDRESS"] == rtnl.IFLA_ADDRESS
    assert positions["IFLA_IFNAME"] == rtnl.IFLA_IFNAME
    assert positions["IFLA_MTU"] == rtnl.IFLA_MTU
    assert positions["IFLA_OPERSTATE"] == rtnl.IFLA_OPERSTATE
    assert positions["IFLA_CARRIER"] == rtnl.IFLA_CARRIER
    assert positions["IFLA_CARRIER_CHANGES"] == rtnl.IFLA_CARRIER_CHANGES
    assert positions["IFLA_STATS64"] == rtnl.IFLA_STATS64


def test_flag_names_in_bit_order() -> None:
    assert flag_names(0x11043) == ("UP", "BROADCAST", "RUNNING", "MULTICAST", "LOWER_UP")
    assert flag_names(0x1002) == ("BROADCAST", "MULTICAST")
    assert flag_names(0) == ()


def test_dump_request_bytes() -> None:
    request = link_dump_request(9)
    # nlmsghdr: 32 bytes, RTM_GETLINK, NLM_F_REQUEST|NLM_F_DUMP, seq 9, pid 0; ifinfomsg zeroed
    assert request == struct.pack("=IHHII", 32, 18, 0x301, 9, 0) + bytes(16)


def test_error_code() -> None:
    payload = memoryview(struct.pack("=i", -16) + bytes(16))
    assert parse_error_code(payload) == 16


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (DUMP[:100], "netlink message length 1468 at offset 0 is invalid"),
        (struct.pack("=IHHII", 8, 16, 0, 0, 0), "netlink message length 8 at offset 0 is invalid"),
        (ATTACH_EVENT + b"\x01\x02", "netlink datagram has 2 trailing bytes"),
    ],
)
def test_broken_datagrams_are_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(ProbeParseError) as caught:
        list(iter_messages(data))
    assert caught.value.message == message


def test_broken_link_payloads_are_parse_errors() -> None:
    [message] = list(iter_messages(ATTACH_EVENT))
    with pytest.raises(ProbeParseError, match="ifinfomsg of 10 bytes is too short"):
        parse_link(message.payload[:10])
    broken = bytearray(message.payload)
    struct.pack_into("=H", broken, 16, 2)  # the first attribute claims 2 bytes
    with pytest.raises(ProbeParseError, match="link 2: attribute length 2 is invalid"):
        parse_link(memoryview(broken))


def renumbered(data: bytes, seq: int) -> bytes:
    """``data`` with every message's sequence number set to ``seq``."""
    out, offset = bytearray(data), 0
    while offset < len(out):
        (length,) = struct.unpack_from("=I", out, offset)
        struct.pack_into("=I", out, offset + 8, seq)
        offset += (length + 3) & ~3
    return bytes(out)


def as_dellink(event: bytes) -> bytes:
    out = bytearray(event)
    struct.pack_into("=H", out, 4, rtnl.RTM_DELLINK)
    return bytes(out)


def test_watcher_state_from_captured_messages() -> None:
    serials = iter(range(1, 100))
    watcher = LinkWatcher("/var/run/netns/x", (1, 2), lambda: next(serials))
    at = datetime(2026, 11, 25, 10, 15, 2, 123456, tzinfo=UTC)
    watcher.begin_dump()
    watcher.apply(renumbered(DUMP, 1), at)
    assert watcher.synced.is_set()
    assert watcher.by_name == {"lo": LO, "tap-cell-1": TAP_DOWN}
    assert watcher.transitions_since("tap-cell-1", 0) == []  # the first dump is the baseline

    watcher.apply(ATTACH_EVENT, at)
    assert watcher.link("tap-cell-1") == TAP_UP
    [transition] = watcher.transitions_since("tap-cell-1", 0)
    assert transition.as_json() == {
        "at": "2026-11-25T10:15:02.123Z",
        "carrier": True,
        "operstate": "UP",
        "admin_up": True,
    }
    assert watcher.transitions_since("tap-cell-1", transition.serial) == []

    watcher.apply(as_dellink(ATTACH_EVENT), at)
    assert watcher.link("tap-cell-1") is None
    # a link that appears after the baseline is a transition of its own
    watcher.apply(ATTACH_EVENT, at)
    assert [t.serial for t in watcher.transitions_since("tap-cell-1", 0)] == [1, 2]

    # a resynchronising dump that no longer lists a link drops it (its DELLINK was lost)
    watcher.begin_dump()
    lo_only = b"".join(
        raw for kind, raw in whole_messages(renumbered(DUMP, 2)) if kind != 16 or b"lo\0" in raw
    )
    watcher.apply(lo_only, at)
    assert watcher.by_name == {"lo": LO}
    assert watcher.dumps == 2


def test_an_interrupted_dump_is_repeated() -> None:
    watcher = LinkWatcher(None, None, lambda: 1)
    watcher.begin_dump()
    interrupted = bytearray(renumbered(DUMP, 1))
    struct.pack_into("=H", interrupted, 6, NLM_F_MULTI | rtnl.NLM_F_DUMP_INTR)
    watcher.apply(bytes(interrupted), datetime.now(UTC))
    assert not watcher.synced.is_set()
    assert watcher.dumps == 0
    assert watcher.resync_pending  # the receive loop sends the repeat request
    request = watcher.begin_dump()
    assert struct.unpack_from("=I", request, 8)[0] == 2


# -- the counters (IFLA_STATS64) ---------------------------------------------------------------


def stats_offset(payload: bytes) -> int:
    """Where the IFLA_STATS64 attribute (its header) begins in a link payload."""
    offset = 16  # ifinfomsg
    while offset < len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if kind == rtnl.IFLA_STATS64:
            return offset
        offset += (length + 3) & ~3
    raise AssertionError("no IFLA_STATS64")


def with_counters(payload: bytes, values: list[int]) -> bytes:
    """``payload`` with the first counters of its IFLA_STATS64 set to ``values``."""
    out = bytearray(payload)
    struct.pack_into(f"={len(values)}Q", out, stats_offset(payload) + 4, *values)
    return bytes(out)


def test_counters_are_named_as_pyroute2_names_the_kernels_fields() -> None:
    [message] = list(iter_messages(ATTACH_EVENT))
    counted = with_counters(bytes(message.payload), [11, 12, 13, 14, 15, 16, 17, 18])
    parsed = parse_link(memoryview(counted))
    assert parsed[1] is not None
    ours = dict(zip(STATS_KEYS, parsed[1], strict=True))
    # pyroute2 decodes whole messages: the netlink header, then the payload
    assert our_view(parsed) == pyroute2_view(ATTACH_EVENT[:16] + counted)
    assert ours == {
        "rx_packets": 11, "tx_packets": 12, "rx_bytes": 13, "tx_bytes": 14,
        "rx_errors": 15, "tx_errors": 16, "rx_dropped": 17, "tx_dropped": 18,
    }  # fmt: skip


def test_a_message_that_differs_in_its_counters_only_has_the_same_state() -> None:
    """A dump every tick repeats each link's message: an unchanged state is not parsed again."""
    tap_message = list(iter_messages(DUMP))[1]
    link, _ = parse_link(tap_message.payload)
    assert link.head is not None
    assert link.head == bytes(tap_message.payload[: len(link.head)])
    moved = with_counters(bytes(tap_message.payload), [5, 0, 300, 0, 0, 0, 5, 0])
    assert link.counters_if_unchanged(memoryview(moved)) == (300, 5, 0, 5, 0, 0, 0, 0)
    # a change of state is parsed whole
    [attach] = list(iter_messages(ATTACH_EVENT))
    assert link.counters_if_unchanged(attach.payload) is None


def test_the_watcher_keeps_an_unchanged_links_state_and_takes_its_new_counters() -> None:
    watcher = LinkWatcher(None, None, lambda: 1)
    watcher.begin_dump()
    watcher.apply(renumbered(DUMP, 1), datetime.now(UTC))
    link = watcher.link("tap-cell-1")
    assert link is not None
    assert watcher.counters[link.index] == IDLE
    link.output_json()  # made once, kept while the state is the same
    watcher.begin_dump()
    moved = with_counters(bytes(list(iter_messages(DUMP))[1].payload), [5, 0, 300, 0, 0, 0, 5, 0])
    again = b"".join(
        raw if kind != 16 or b"tap-cell-1" not in raw else raw[:16] + moved
        for kind, raw in whole_messages(renumbered(DUMP, 2))
    )
    watcher.apply(again, datetime.now(UTC))
    assert watcher.dumps == 2
    assert watcher.link("tap-cell-1") is link
    assert watcher.counters[link.index] == (300, 5, 0, 5, 0, 0, 0, 0)
    assert watcher.transitions_since("tap-cell-1", 0) == []


def test_a_short_counters_attribute_is_a_parse_error() -> None:
    name = b"tap0\0\0\0\0"
    payload = (
        struct.pack("=BxHiII", 0, 1, 9, 0, 0)
        + struct.pack("=HH", 4 + len(name), rtnl.IFLA_IFNAME)
        + name
        + struct.pack("=HH", 12, rtnl.IFLA_STATS64)
        + bytes(8)
    )
    with pytest.raises(ProbeParseError, match="link 9: IFLA_STATS64 is shorter than 64 bytes"):
        parse_link(memoryview(payload))


def test_a_link_message_without_counters_is_the_cells_parse_error() -> None:
    name = b"tap0\0\0\0\0"
    payload = (
        struct.pack("=BxHiII", 0, 1, 9, 0x1003, 0)
        + struct.pack("=HH", 4 + len(name), rtnl.IFLA_IFNAME)
        + name
    )
    message = struct.pack("=IHHII", 16 + len(payload), rtnl.RTM_NEWLINK, 0, 0, 0) + payload
    watcher = LinkWatcher(None, None, lambda: 1)
    watcher.apply(message, datetime.now(UTC))
    assert watcher.link("tap0") is not None
    probe = TapLinkProbe(
        TapLinkProbeConfig(interface="tap0"), None, None, LinkWatchers(lambda: None)
    )
    with pytest.raises(ProbeParseError) as caught:
        probe.reading_from(watcher)
    assert caught.value.message == (
        "the kernel sent no IFLA_STATS64 for tap0 in the host network namespace"
    )


@pytest.mark.parametrize(
    ("baseline", "index", "stats", "expected"),
    [
        (None, 3, (9, 1, 0, 0, 0, 0, 0, 0), None),
        ((3, (9, 1, 0, 0, 0, 0, 0, 0)), 3, (19, 2, 0, 0, 7, 1, 0, 1),
         ((10, 1, 0, 0, 7, 1, 0, 1), False)),
        # a counter lower than before: the device was restarted
        ((3, (9, 1, 0, 0, 7, 1, 0, 0)), 3, (20, 3, 0, 0, 0, 0, 0, 0),
         ((20, 3, 0, 0, 0, 0, 0, 0), True)),
        # another ifindex: another device, whatever its counters
        ((3, IDLE), 4, (1, 1, 0, 0, 0, 0, 0, 0), ((1, 1, 0, 0, 0, 0, 0, 0), True)),
        ((3, IDLE), 3, IDLE, (IDLE, False)),
    ],
)  # fmt: skip
def test_deltas_and_their_reset(
    baseline: tuple[int, LinkStats] | None,
    index: int,
    stats: LinkStats,
    expected: tuple[LinkStats, bool] | None,
) -> None:
    deltas = stats_deltas(baseline, index, stats)
    if expected is None:
        assert deltas is None
    else:
        increase, reset = expected
        assert deltas == {"stats": dict(zip(STATS_KEYS, increase, strict=True)), "reset": reset}
