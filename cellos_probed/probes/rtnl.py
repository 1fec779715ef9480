"""rtnetlink link messages, parsed with ``struct``: the few attributes ``tap_link`` needs.

Pure: bytes in, values out. pyroute2 supplies the protocol's constants and
name tables; its generic decoder is not used here because it spends about
0.4 ms per link (``../shared/reference/protocols.md`` section 4), which
would make a resynchronising dump of 1,000 TAPs cost 400 ms. This parser
reads the netlink header, the ``ifinfomsg`` and seven ``IFLA_*``
attributes, and stops walking a message's attributes once it has them all.
A link's message whose bytes before ``IFLA_STATS64`` are those of the
message its state was parsed from has that state: only its counters are
read (a dump every tick repeats every link's message, most of them
unchanged but for their counters).

Layouts (``linux/netlink.h``, ``linux/rtnetlink.h``, ``linux/if_link.h``)::

    nlmsghdr  u32 len, u16 type, u16 flags, u32 seq, u32 pid     (16 bytes)
    ifinfomsg u8 family, u8 pad, u16 type, s32 index, u32 flags, u32 change
    rtattr    u16 len, u16 type, payload, padded to 4 bytes
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import orjson
from pyroute2.netlink import (
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_GETLINK, RTM_NEWLINK, RTMGRP_LINK
from pyroute2.netlink.rtnl.ifinfmsg import IFF_NAMES, state_by_code

from cellos_probed.readings import ProbeParseError

__all__ = [
    "NLMSG_DONE",
    "NLMSG_ERROR",
    "NLM_F_DUMP_INTR",
    "RTMGRP_LINK",
    "RTM_DELLINK",
    "RTM_NEWLINK",
    "STATS_KEYS",
    "LinkInfo",
    "LinkStats",
    "NetlinkMessage",
    "flag_names",
    "iter_messages",
    "link_dump_request",
    "parse_error_code",
    "parse_link",
    "parse_link_index",
]

NLMSG_HEADER: Final = struct.Struct("=IHHII")
IFINFOMSG: Final = struct.Struct("=BxHiII")
RTATTR: Final = struct.Struct("=HH")
_U32: Final = struct.Struct("=I")
_S32: Final = struct.Struct("=i")

# linux/if_link.h attribute numbers (the test checks them against pyroute2's table)
IFLA_ADDRESS: Final = 1
IFLA_IFNAME: Final = 3
IFLA_MTU: Final = 4
IFLA_OPERSTATE: Final = 16
IFLA_CARRIER: Final = 33
IFLA_STATS64: Final = 23
IFLA_CARRIER_CHANGES: Final = 35
#: the attributes a link's state (:class:`LinkInfo`) is made of
_STATE: Final = frozenset(
    {IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_OPERSTATE, IFLA_CARRIER, IFLA_CARRIER_CHANGES}
)
_WANTED: Final = _STATE | {IFLA_STATS64}

#: struct rtnl_link_stats64 (u64 each) begins rx_packets, tx_packets, rx_bytes, tx_bytes,
#: rx_errors, tx_errors, rx_dropped, tx_dropped; kernels append fields after those
_STATS64: Final = struct.Struct("=8Q")
#: ``tap_link``'s names for them, in its output's order
STATS_KEYS: Final = (
    "rx_bytes", "rx_packets", "rx_errors", "rx_dropped",
    "tx_bytes", "tx_packets", "tx_errors", "tx_dropped",
)  # fmt: skip
_IN_KEY_ORDER: Final = operator.itemgetter(2, 0, 4, 6, 3, 1, 5, 7)
#: a link's counters, in :data:`STATS_KEYS` order
LinkStats = tuple[int, int, int, int, int, int, int, int]

IFF_UP: Final = IFF_NAMES["IFF_UP"]
#: (bit, name) in bit order: "UP", "BROADCAST", ..., "LOWER_UP", ...
_FLAG_BITS: Final = tuple(
    sorted((value, name.removeprefix("IFF_")) for name, value in IFF_NAMES.items())
)
#: RFC 2863 operational states by code: 0 "UNKNOWN" ... 6 "UP"
OPERSTATES: Final[dict[int, str]] = dict(state_by_code)

_flag_names_cache: dict[int, tuple[str, ...]] = {}


def flag_names(flags: int) -> tuple[str, ...]:
    """``0x11043`` -> ``("UP", "BROADCAST", "RUNNING", "MULTICAST", "LOWER_UP")``."""
    names = _flag_names_cache.get(flags)
    if names is None:
        names = tuple(name for bit, name in _FLAG_BITS if flags & bit)
        if len(_flag_names_cache) < 4096:  # a handful of combinations occur in practice
            _flag_names_cache[flags] = names
    return names


class NetlinkMessage(NamedTuple):
    """One message of a datagram (a tuple: made for every link of every dump)."""

    type: int
    flags: int
    seq: int
    payload: memoryview


def iter_messages(data: bytes | bytearray | memoryview) -> Iterator[NetlinkMessage]:
    """The netlink messages of one datagram, in order."""
    view = memoryview(data)
    offset, end = 0, len(view)
    while offset + NLMSG_HEADER.size <= end:
        length, msg_type, flags, seq, _pid = NLMSG_HEADER.unpack_from(view, offset)
        if length < NLMSG_HEADER.size or offset + length > end:
            raise ProbeParseError(f"netlink message length {length} at offset {offset} is invalid")
        yield NetlinkMessage(
            msg_type, flags, seq, view[offset + NLMSG_HEADER.size : offset + length]
        )
        offset += (length + 3) & ~3
    if offset < end and any(view[offset:end]):
        raise ProbeParseError(f"netlink datagram has {end - offset} trailing bytes")


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """One link as an RTM_NEWLINK message describes it."""

    index: int
    name: str | None
    flags: int
    operstate: str
    carrier: bool | None
    carrier_changes: int | None
    mtu: int | None
    address: str | None
    #: the message's bytes before its ``IFLA_STATS64`` when every state attribute
    #: lies in them: a later message of the link that begins so has this state
    head: bytes | None = field(default=None, compare=False, repr=False)
    #: :meth:`output_json`'s result, made on first use (a link's message is read
    #: every tick for as long as nothing changes: a thousand TAPs a second)
    _made: tuple[dict[str, Any], bytes] | None = field(default=None, compare=False, repr=False)

    @property
    def admin_up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def state(self) -> tuple[bool | None, str, bool]:
        """What a transition is a change of: (carrier, operstate, admin_up)."""
        return (self.carrier, self.operstate, self.admin_up)

    def output(self) -> dict[str, Any]:
        """The ``tap_link`` output fields this message determines (all but ``transitions``)."""
        return {
            "ifindex": self.index,
            "operstate": self.operstate,
            "carrier": self.carrier,
            "carrier_changes": self.carrier_changes,
            "flags": list(flag_names(self.flags)),
            "admin_up": self.admin_up,
            "mtu": self.mtu,
            "address": self.address,
        }

    def output_json(self) -> tuple[dict[str, Any], bytes]:
        """:meth:`output` made once (shared: read only) and its JSON without the closing brace."""
        made = self._made
        if made is None:
            fields = self.output()
            made = (fields, orjson.dumps(fields)[:-1])
            object.__setattr__(self, "_made", made)  # a cache, not state: frozen otherwise
        return made

    def counters_if_unchanged(self, payload: memoryview) -> LinkStats | None:
        """The counters of ``payload``, a later message of this link, when it describes
        this same state (it begins with :attr:`head`); ``None``: parse it whole."""
        head = self.head
        if head is None or bytes(payload[: len(head)]) != head:
            return None
        return _stats(payload, len(head), self.index)


def _mac(raw: memoryview) -> str:
    return ":".join(f"{byte:02x}" for byte in raw)


def _ifinfomsg(payload: memoryview) -> tuple[int, int]:
    if len(payload) < IFINFOMSG.size:
        raise ProbeParseError(f"ifinfomsg of {len(payload)} bytes is too short")
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(payload, 0)
    return index, flags


def parse_link_index(payload: memoryview) -> int:
    """The ifindex of an RTM_NEWLINK / RTM_DELLINK payload."""
    return _ifinfomsg(payload)[0]


def _stats(payload: memoryview, offset: int, index: int) -> LinkStats | None:
    """The counters of the ``IFLA_STATS64`` attribute at ``offset``; ``None`` if it is not there."""
    if offset + RTATTR.size > len(payload):
        return None
    length, attr_type = RTATTR.unpack_from(payload, offset)
    if attr_type & 0x3FFF != IFLA_STATS64 or offset + length > len(payload):
        return None
    if length < RTATTR.size + _STATS64.size:
        raise ProbeParseError(f"link {index}: IFLA_STATS64 is shorter than 64 bytes")
    stats: LinkStats = _IN_KEY_ORDER(_STATS64.unpack_from(payload, offset + RTATTR.size))
    return stats


def parse_link(payload: memoryview) -> tuple[LinkInfo, LinkStats | None]:
    """An RTM_NEWLINK payload (``ifinfomsg`` and attributes): the link's state, and its
    counters (``None`` when the message has no ``IFLA_STATS64``)."""
    index, flags = _ifinfomsg(payload)
    found: dict[int, memoryview] = {}
    stats_at = -1
    head_whole = False  # every state attribute came before IFLA_STATS64
    offset, end = IFINFOMSG.size, len(payload)
    while offset + RTATTR.size <= end and len(found) < len(_WANTED):
        length, attr_type = RTATTR.unpack_from(payload, offset)
        if length < RTATTR.size or offset + length > end:
            raise ProbeParseError(f"link {index}: attribute length {length} is invalid")
        attr_type &= 0x3FFF  # drop NLA_F_NESTED / NLA_F_NET_BYTEORDER
        if attr_type in _WANTED:
            if attr_type == IFLA_STATS64 and stats_at < 0:
                stats_at, head_whole = offset, len(found) == len(_STATE)
            found[attr_type] = payload[offset + RTATTR.size : offset + length]
        offset += (length + 3) & ~3

    def u32(code: int) -> int | None:
        raw = found.get(code)
        if raw is None:
            return None
        if len(raw) < 4:
            raise ProbeParseError(f"link {index}: attribute {code} is shorter than 4 bytes")
        value: int = _U32.unpack_from(raw, 0)[0]
        return value

    def u8(code: int) -> int | None:
        raw = found.get(code)
        if raw is None:
            return None
        if len(raw) < 1:
            raise ProbeParseError(f"link {index}: attribute {code} is empty")
        return raw[0]

    name_raw = found.get(IFLA_IFNAME)
    name = (
        None if name_raw is None else bytes(name_raw).split(b"\0", 1)[0].decode("utf-8", "replace")
    )
    operstate_code = u8(IFLA_OPERSTATE)
    carrier = u8(IFLA_CARRIER)
    address = found.get(IFLA_ADDRESS)
    link = LinkInfo(
        index=index,
        name=name,
        flags=flags,
        operstate="UNKNOWN"
        if operstate_code is None
        else OPERSTATES.get(operstate_code, str(operstate_code)),
        carrier=None if carrier is None else bool(carrier),
        carrier_changes=u32(IFLA_CARRIER_CHANGES),
        mtu=u32(IFLA_MTU),
        address=None if address is None else _mac(address),
        head=bytes(payload[:stats_at]) if head_whole else None,
    )
    return link, None if stats_at < 0 else _stats(payload, stats_at, index)


def parse_error_code(payload: memoryview) -> int:
    """The errno of an NLMSG_ERROR payload (0 is an acknowledgement)."""
    if len(payload) < 4:
        raise ProbeParseError("netlink error message is too short")
    code: int = _S32.unpack_from(payload, 0)[0]
    return -code


def link_dump_request(seq: int) -> bytes:
    """RTM_GETLINK with NLM_F_DUMP: every link of the socket's namespace."""
    body = IFINFOMSG.pack(0, 0, 0, 0, 0)  # AF_UNSPEC, any type, any index
    header = NLMSG_HEADER.pack(
        NLMSG_HEADER.size + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body
