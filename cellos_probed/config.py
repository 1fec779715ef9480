"""The TOML configuration, read strictly into frozen, typed objects.

Every mistake is one :class:`ConfigError` naming the file, the cell and the
key (and line and column for TOML syntax). Each settings dataclass is also
its table's schema: a field with ``_KEY`` metadata is the key of its name,
read and checked as the metadata says, its default the field's own. The
loader knows every key of the contract from the start: a key whose feature
is not built yet is refused as such (:data:`NOT_SUPPORTED_YET`), never
mistaken for a typo and never silently ignored. Paths need not exist (cells
come and go) but must lie under their root, also once the symlinks among
their existing components are followed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from cellos_probed import __version__, cgroupfs

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_T = TypeVar("_T", bound="DataclassInstance")

DEFAULT_SUBJECT_PREFIX: Final = "dev.cellos.events.cell.observability.host.v1"
DEFAULT_SERVERS: Final = ("nats://127.0.0.1:4222",)
SUBJECT_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SUBJECT_PREFIX: Final = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_SERVER_URL: Final = re.compile(r"(nats|tls|ws|wss)://[^\s/]+(:\d+)?/?")
_STREAM: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
NFT_FAMILIES: Final = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
_NFT_FAMILY: Final = re.compile("|".join(NFT_FAMILIES))
_NFT_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]{0,255}")
_IFNAME: Final = re.compile(r"(?!\.\.?\Z)[^/\s:]{1,15}")

#: The probes a cell may have, each in its own ``[cell.<name>]`` table, in this order.
BUILT_PROBES: Final = ("cgroup", "tap_link", "nftables", "fc_metrics")

#: Keys of the contract whose feature is not built yet, with that feature:
#: each is refused as such. A feature that lands deletes its entries here
#: and adds its fields to the dataclasses below.
NOT_SUPPORTED_YET: Final[dict[str, str]] = {}


class ConfigError(Exception):
    """A configuration mistake, told the way an operator reads it."""

    def __init__(
        self,
        message: str,
        *,
        file: str | os.PathLike[str] | None = None,
        cell: str | None = None,
        key: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = None if file is None else str(file)
        self.cell = cell
        self.key = key
        self.line = line
        self.column = column

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        parts = [where]
        if self.cell is not None:
            parts.append(f"cell {self.cell!r}")
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        return ": ".join(parts) + f": {self.message}"


# The schema: field metadata saying how a key is read. A field without it is
# not a key; the loader derives it (a resolved path, a nested table).

_KEY: Final = "cellos_probed.config.key"


class _Invalid(Exception):
    """A value of the right TOML type that its key does not accept."""


@dataclass(frozen=True, slots=True)
class _Key:
    what: str  # as in "must be {what}, not a string"
    kinds: tuple[type, ...]  # the TOML types accepted (a boolean only if bool is listed)
    check: Callable[[Any], Any]  # the value kept, or raises _Invalid
    #: a default that follows other keys: gets those read before it in its table
    #: and what the loader adds (the field's own default is then this rule's result
    #: on the default of what it follows)
    default_from: Callable[[Mapping[str, Any]], Any] | None = None


def _number(
    low: float, high: float, default_from: Callable[[Mapping[str, Any]], Any] | None = None
) -> dict[str, _Key]:
    def check(value: float) -> float:
        # compared before float(): an integer may not fit one; NaN fails both
        if not low <= value <= high:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise _Invalid(f"must be between {low:g} and {high:g}, got {shown}")
        return float(value)

    return {_KEY: _Key("a number", (int, float), check, default_from)}


def _integer(
    low: int, high: int, default_from: Callable[[Mapping[str, Any]], Any] | None = None
) -> dict[str, _Key]:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise _Invalid(f"must be between {low} and {high}, got {value}")
        return value

    return {_KEY: _Key("an integer", (int,), check, default_from)}


def _boolean() -> dict[str, _Key]:
    return {_KEY: _Key("true or false", (bool,), bool)}


def _text(value: str, pattern: re.Pattern[str] | None, invalid: str, absolute: bool) -> str:
    if not value:
        raise _Invalid("must not be empty")
    if pattern is not None and not pattern.fullmatch(value):
        raise _Invalid(invalid.format(value=value))
    if absolute and not os.path.isabs(value):
        raise _Invalid("must be an absolute path")
    return value


def _string(
    pattern: re.Pattern[str] | None = None, invalid: str = "", *, absolute: bool = False
) -> dict[str, _Key]:
    """A non-empty string; ``invalid`` (a format string of ``value``) if it does not match."""
    return {_KEY: _Key("a string", (str,), lambda value: _text(value, pattern, invalid, absolute))}


def _path() -> dict[str, _Key]:
    """An absolute path, normalised."""
    return {
        _KEY: _Key(
            "a string", (str,), lambda value: Path(os.path.normpath(_text(value, None, "", True)))
        )
    }


def _strings(
    pattern: re.Pattern[str] | None = None,
    invalid: str = "",
    *,
    may_be_empty: bool = False,
    twice: str | None = None,
    default_from: Callable[[Mapping[str, Any]], Any] | None = None,
) -> dict[str, _Key]:
    """A list of non-empty strings; ``twice``: the message if one is listed twice."""

    def check(value: list[Any]) -> tuple[str, ...]:
        if not value and not may_be_empty:
            raise _Invalid("must not be empty")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise _Invalid(f"item {index} must be a non-empty string")
            _text(item, pattern, invalid, False)
        if twice is not None and len(set(value)) != len(value):
            raise _Invalid(twice)
        return tuple(value)

    return {_KEY: _Key("a list of strings", (list,), check, default_from)}


def default_host_id() -> str:
    """The host name made a NATS subject token (dots and the like become ``_``)."""
    token = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:128]
    return token or "localhost"


#: the context key under which a cell's probe table finds its ``[probes.<name>]`` values
_PROBE_DEFAULTS: Final = "probe_defaults"


def _probe_default(name: str, fallback: Any) -> Callable[[Mapping[str, Any]], Any]:
    """A per-cell key's default: the ``[probes.<probe>]`` table's value, else ``fallback``."""
    return lambda known: known.get(_PROBE_DEFAULTS, {}).get(name, fallback)


#: how often a probe is read, in base ticks (``[probes.<name>]`` and per cell)
_EVERY_TICKS: Final = _integer(1, 1_000_000, _probe_default("every_ticks", 1))
_FC_SECTION: Final = re.compile(r"[A-Za-z0-9_]{1,128}")


def _half_the_tick(known: Mapping[str, Any]) -> float:
    return float(known["tick_seconds"]) / 2


def _all_under_the_prefix(known: Mapping[str, Any]) -> tuple[str, ...]:
    return (f"{known['subject_prefix']}.>",)


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    tick_seconds: float = field(default=1.0, metadata=_number(0.01, 3600.0))
    #: must be less than the tick
    probe_timeout_seconds: float = field(
        default=0.5, metadata=_number(0.001, 3600.0, default_from=_half_the_tick)
    )
    host_id: str = field(
        default_factory=default_host_id,
        metadata=_string(SUBJECT_TOKEN, "must be a NATS subject token: [A-Za-z0-9_-]{{1,128}}"),
    )
    drain_timeout_seconds: float = field(default=5.0, metadata=_number(0.0, 600.0))
    #: every this many ticks, the daemon's own `agent` event (0: never)
    agent_event_every_ticks: int = field(default=10, metadata=_integer(0, 1_000_000))
    #: keep each cell's cgroup2 files open between ticks: one pread a file a tick
    #: instead of open, read, close, for ~5 KiB of kernel memory a file
    keep_cgroup_files: bool = field(default=True, metadata=_boolean())


@dataclass(frozen=True, slots=True)
class PathRoots:
    #: None: no cgroup2 mount found on this host
    cgroup_root: Path | None = field(default_factory=cgroupfs.find_cgroup2_mount, metadata=_path())
    jail_root: Path = field(default=Path("/srv/jailer"), metadata=_path())
    netns_root: Path = field(default=Path("/var/run/netns"), metadata=_path())


@dataclass(frozen=True, slots=True)
class JetStreamSettings:
    stream: str = field(
        default="CELLOS_HOST",
        metadata=_string(_STREAM, "must be a stream name: [A-Za-z0-9_-]{{1,64}}"),
    )
    subjects: tuple[str, ...] = field(
        default=(f"{DEFAULT_SUBJECT_PREFIX}.>",),
        metadata=_strings(default_from=_all_under_the_prefix),
    )
    create_stream: bool = field(default=True, metadata=_boolean())
    replicas: int = field(default=1, metadata=_integer(1, 5))
    duplicate_window_seconds: float = field(default=120.0, metadata=_number(0.1, 86_400.0))
    ack_timeout_seconds: float = field(default=2.0, metadata=_number(0.01, 600.0))
    #: a leaf node's JetStream: the API calls go to $JS.<domain>.API, one subject token
    domain: str | None = field(
        default=None,
        metadata=_string(SUBJECT_TOKEN, "must be one NATS subject token: [A-Za-z0-9_-]{{1,128}}"),
    )


@dataclass(frozen=True, slots=True)
class NatsSettings:
    servers: tuple[str, ...] = field(
        default=DEFAULT_SERVERS,
        metadata=_strings(_SERVER_URL, "{value!r} is not a nats:// or tls:// URL"),
    )
    subject_prefix: str = field(
        default=DEFAULT_SUBJECT_PREFIX,
        metadata=_string(_SUBJECT_PREFIX, "must be dot-separated subject tokens, no wildcards"),
    )
    name: str = field(default="cellos-probed", metadata=_string())
    # at most one way to authenticate: credentials, nkey_seed, user + password, token
    credentials: str | None = field(default=None, metadata=_string(absolute=True))
    nkey_seed: str | None = field(default=None, metadata=_string(absolute=True))
    user: str | None = field(default=None, metadata=_string())
    password: str | None = field(default=None, metadata=_string())
    token: str | None = field(default=None, metadata=_string())
    tls_ca: str | None = field(default=None, metadata=_string(absolute=True))
    tls_cert: str | None = field(default=None, metadata=_string(absolute=True))
    tls_key: str | None = field(default=None, metadata=_string(absolute=True))
    #: [nats.jetstream]: present = publish with acknowledgements
    jetstream: JetStreamSettings | None = None


@dataclass(frozen=True, slots=True)
class BufferSettings:
    """The in-memory outbox bounds (used when no spool is configured)."""

    max_events: int = field(default=100_000, metadata=_integer(10, 100_000_000))
    max_bytes: int = field(default=64 * 1024 * 1024, metadata=_integer(4096, 1 << 40))


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    path: Path = field(metadata=_path())
    max_bytes: int = field(default=1 << 30, metadata=_integer(1 << 20, 1 << 44))


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A loopback address and port: where the daemon serves ``/metrics``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_LOOPBACK_ONLY: Final = (
    "must be a loopback address and port (127.0.0.1:PORT or [::1]:PORT): the daemon serves "
    "/metrics to this host only; [metrics] textfile hands the figures to node_exporter"
)
_WRITE_LISTEN: Final = "write 127.0.0.1:PORT or [::1]:PORT"


def _loopback(value: str) -> ListenAddress:
    """``HOST:PORT`` (``[HOST]:PORT`` for IPv6) with HOST a loopback IP address: the
    figures are this host's business; a name is refused rather than resolved."""
    if value.startswith("["):
        host, bracket, port = value[1:].partition("]:")
        if not bracket:
            raise _Invalid(f"{value!r} has no port: {_WRITE_LISTEN}")
    else:
        host, colon, port = value.rpartition(":")
        if not colon:
            raise _Invalid(f"{value!r} has no port: {_WRITE_LISTEN}")
        if ":" in host:
            raise _Invalid(f"{value!r}: an IPv6 address goes in brackets: [::1]:PORT")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise _Invalid(
            f"{host!r} is not an IP address (names are not resolved): {_WRITE_LISTEN}"
        ) from None
    if not address.is_loopback:
        raise _Invalid(f"{value!r} {_LOOPBACK_ONLY}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise _Invalid(f"the port must be between 1 and 65535, got {port!r}")
    return ListenAddress(str(address), int(port))


def _prom_file(value: str) -> Path:
    path = Path(os.path.normpath(_text(value, None, "", True)))
    if value.endswith("/") or path.suffix != ".prom":
        raise _Invalid(
            "must end in .prom: node_exporter's textfile collector reads only *.prom files"
        )
    return path


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """``[metrics]``: the daemon's own health in the Prometheus text format; both
    ways out are off by default (``metrics.py``)."""

    #: rewritten (atomically) every few ticks, for node_exporter's textfile collector
    textfile: Path | None = field(
        default=None, metadata={_KEY: _Key("a string", (str,), _prom_file)}
    )
    #: ``/metrics`` served here, on loopback only
    listen: ListenAddress | None = field(
        default=None, metadata={_KEY: _Key("a string", (str,), _loopback)}
    )


@dataclass(frozen=True, slots=True)
class CgroupProbeConfig:
    path: str = field(metadata=_string())  # as written; reported in `inputs`
    resolved: Path  # absolute, under [paths] cgroup_root
    #: [paths] cgroup_root: opens walk down from it refusing symlinks
    #: (None: only the directory's own name is checked)
    root: Path | None = None
    every_ticks: int = field(default=1, metadata=_EVERY_TICKS)


@dataclass(frozen=True, slots=True)
class TapLinkProbeConfig:
    interface: str = field(metadata=_string(_IFNAME, "{value!r} is not a valid interface name"))
    every_ticks: int = field(default=1, metadata=_EVERY_TICKS)


@dataclass(frozen=True, slots=True)
class NftablesProbeConfig:
    family: str = field(metadata=_string(_NFT_FAMILY, f"must be one of {', '.join(NFT_FAMILIES)}"))
    table: str = field(metadata=_string(_NFT_NAME, "{value!r} is not a valid nftables table name"))
    #: named counter objects; with `chain`, or alone (at least one of the two)
    counters: tuple[str, ...] = field(
        default=(),
        metadata=_strings(
            _NFT_NAME,
            "{value!r} is not a valid nftables object name",
            may_be_empty=True,
            twice="lists a counter twice",
        ),
    )
    chain: str | None = field(
        default=None, metadata=_string(_NFT_NAME, "{value!r} is not a valid nftables chain name")
    )
    every_ticks: int = field(default=1, metadata=_EVERY_TICKS)


@dataclass(frozen=True, slots=True)
class FcMetricsProbeConfig:
    api_socket: str = field(metadata=_string())  # as written
    metrics_path: str = field(metadata=_string())  # as written
    api_socket_resolved: Path  # absolute, under [paths] jail_root
    metrics_path_resolved: Path
    #: [paths] jail_root: opens walk down from it refusing symlinks (None: not checked)
    root: Path | None = None
    every_ticks: int = field(default=1, metadata=_EVERY_TICKS)
    #: ``totals`` in every Nth reading (and the first after a reconnect or a new instance)
    totals_every: int = field(
        default=1, metadata=_integer(1, 1_000_000, _probe_default("totals_every", 1))
    )
    #: the top-level sections kept in ``delta`` and ``totals`` (None: all)
    sections: tuple[str, ...] | None = field(
        default=None,
        metadata=_strings(
            _FC_SECTION,
            "{value!r} is not a Firecracker metrics section name",
            twice="lists a section twice",
            default_from=_probe_default("sections", None),
        ),
    )


@dataclass(frozen=True, slots=True)
class ProbeDefaults:
    """``[probes.<name>]``: what every cell's probe of that name takes unless its own
    table says otherwise."""

    every_ticks: int = field(default=1, metadata=_integer(1, 1_000_000))


@dataclass(frozen=True, slots=True)
class FcMetricsDefaults(ProbeDefaults):
    """``[probes.fc_metrics]``: besides ``every_ticks``, the Firecracker volume keys."""

    totals_every: int = field(default=1, metadata=_integer(1, 1_000_000))
    sections: tuple[str, ...] | None = field(
        default=None,
        metadata=_strings(
            _FC_SECTION,
            "{value!r} is not a Firecracker metrics section name",
            twice="lists a section twice",
        ),
    )


@dataclass(frozen=True, slots=True)
class CellConfig:
    id: str = field(
        metadata=_string(
            SUBJECT_TOKEN, "{value!r} is not a NATS subject token: [A-Za-z0-9_-]{{1,128}}"
        )
    )
    run_id: str = field(metadata=_string())
    spec_signature_hash: str = field(metadata=_string())
    netns: str | None = field(default=None, metadata=_string())
    netns_resolved: Path | None = None
    cgroup: CgroupProbeConfig | None = None
    tap_link: TapLinkProbeConfig | None = None
    nftables: NftablesProbeConfig | None = None
    fc_metrics: FcMetricsProbeConfig | None = None

    def probe_names(self) -> tuple[str, ...]:
        probes = (self.cgroup, self.tap_link, self.nftables, self.fc_metrics)
        return tuple(
            name for name, probe in zip(BUILT_PROBES, probes, strict=True) if probe is not None
        )


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    daemon: DaemonSettings
    paths: PathRoots
    nats: NatsSettings
    cells: tuple[CellConfig, ...]
    buffer: BufferSettings = BufferSettings()
    spool: SpoolSettings | None = None
    metrics: MetricsSettings = MetricsSettings()


class _Table:
    """One TOML table being read; remembers which keys were consumed."""

    def __init__(self, data: dict[str, Any], path: str, loader: _Loader, cell: str | None) -> None:
        self.data = data
        self.path = path
        self.loader = loader
        self.cell = cell
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str | None, message: str) -> ConfigError:
        return self.loader.error(
            message, cell=self.cell, key=None if name is None else self.key(name)
        )

    def value(self, name: str, what: str, kinds: tuple[type, ...]) -> Any:
        """The value of the present key ``name``, if of one of the TOML types ``kinds``."""
        self.used.add(name)
        value = self.data[name]
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"must be {what}, not a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"must be {what}, not {_toml_type(value)}")
        return value

    def table(self, name: str) -> _Table | None:
        if name not in self.data:
            return None
        return _Table(self.value(name, "a table", (dict,)), self.key(name), self.loader, self.cell)

    def section(self, name: str) -> _Table:
        """The table ``name``; empty when absent (its keys take their defaults)."""
        return self.table(name) or _Table({}, self.key(name), self.loader, self.cell)

    def read(self, schema: type[DataclassInstance], **context: Any) -> dict[str, Any]:
        """The keys of ``schema``'s fields, checked, or their defaults; by field name.

        ``context``: values of another table that a derived default follows.
        """
        known = dict(context)
        values: dict[str, Any] = {}
        for item in fields(schema):
            spec = item.metadata.get(_KEY)
            if spec is None:
                continue
            if item.name in self.data:
                try:
                    value = spec.check(self.value(item.name, spec.what, spec.kinds))
                except _Invalid as invalid:
                    raise self.error(item.name, str(invalid)) from None
            else:
                value = self._default(item, spec, known)
            known[item.name] = values[item.name] = value
        return values

    def _default(self, item: Field[Any], spec: _Key, known: Mapping[str, Any]) -> Any:
        if spec.default_from is not None:
            return spec.default_from(known)
        if item.default is not MISSING:
            return item.default
        if item.default_factory is not MISSING:
            return item.default_factory()
        raise self.error(item.name, f"is required ({spec.what})")

    def finish(self) -> None:
        """Refuses a key nothing read: one whose feature is not built yet, or an unknown one."""
        for name, value in self.data.items():
            if name not in self.used:
                self._unread(name, value)

    def _unread(self, name: str, value: Any) -> None:
        key = self.key(name)
        if key in NOT_SUPPORTED_YET:
            raise self.error(
                name,
                f"is not supported yet: {NOT_SUPPORTED_YET[key]} is not built in cellos-probed "
                f"{__version__}; remove the key until a release that has it",
            )
        if not any(known.startswith(f"{key}.") for known in NOT_SUPPORTED_YET):
            raise self.error(name, "unknown key")
        # a table of such keys: each refused in turn; an empty one holds nothing to ignore
        _Table(self.value(name, "a table", (dict,)), key, self.loader, self.cell).finish()


def _toml_type(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _plain(schema: type[_T], table: _Table, **context: Any) -> _T:
    """The settings of a table whose keys have no rule across them."""
    values = table.read(schema, **context)
    table.finish()
    return schema(**values)


class _Loader:
    def __init__(self, file: str) -> None:
        self.file = file
        self._real_roots: dict[Path, str] = {}
        self._defaults: dict[str, dict[str, Any]] = {}

    def real_root(self, root: Path) -> str:
        """``root`` with its symlinks resolved, once per load (thousands of cells share it)."""
        if root not in self._real_roots:
            self._real_roots[root] = os.path.realpath(root)
        return self._real_roots[root]

    def error(self, message: str, **where: Any) -> ConfigError:
        return ConfigError(message, file=self.file, **where)

    def load(self, document: dict[str, Any]) -> Config:
        top = _Table(document, "", self, None)
        daemon = self._daemon(top.section("daemon"))
        paths = _plain(PathRoots, top.section("paths"))
        nats = self._nats(top.section("nats"))
        buffer = _plain(BufferSettings, top.section("buffer"))
        spool_table = top.table("spool")
        spool = None if spool_table is None else _plain(SpoolSettings, spool_table)
        metrics = _plain(MetricsSettings, top.section("metrics"))
        self._defaults = self._probe_defaults(top.section("probes"))
        cells = tuple(self._cells(top, paths))
        top.finish()
        return Config(self.file, daemon, paths, nats, cells, buffer, spool, metrics)

    def _probe_defaults(self, table: _Table) -> dict[str, dict[str, Any]]:
        """Each ``[probes.<name>]`` table's values, by probe; a name not a probe is unknown."""
        defaults: dict[str, dict[str, Any]] = {}
        for name in BUILT_PROBES:
            probe_table = table.table(name)
            if probe_table is not None:
                schema = FcMetricsDefaults if name == "fc_metrics" else ProbeDefaults
                defaults[name] = probe_table.read(schema)
                probe_table.finish()
        table.finish()
        return defaults

    def _read_probe(self, table: _Table, schema: type[_T], name: str) -> dict[str, Any]:
        """A cell's ``[cell.<name>]`` keys, the ``[probes.<name>]`` values as defaults."""
        return table.read(schema, **{_PROBE_DEFAULTS: self._defaults.get(name, {})})

    def _daemon(self, table: _Table) -> DaemonSettings:
        daemon = _plain(DaemonSettings, table)
        if daemon.probe_timeout_seconds >= daemon.tick_seconds:
            raise table.error(
                "probe_timeout_seconds",
                f"must be less than tick_seconds ({daemon.tick_seconds:g}), "
                f"got {daemon.probe_timeout_seconds:g}",
            )
        return daemon

    def _nats(self, table: _Table) -> NatsSettings:
        values = table.read(NatsSettings)
        methods = [key for key in ("credentials", "nkey_seed", "user", "token") if values[key]]
        if len(methods) > 1:
            raise table.error(
                methods[1], f"conflicts with {methods[0]}: choose one way to authenticate"
            )
        for first, second in (("user", "password"), ("tls_cert", "tls_key")):
            if (values[first] is None) != (values[second] is None):
                missing = second if values[second] is None else first
                raise table.error(missing, f"{first} and {second} go together")
        jetstream = table.table("jetstream")
        table.finish()
        if jetstream is None:
            return NatsSettings(**values)
        prefix = values["subject_prefix"]
        return NatsSettings(
            **values, jetstream=_plain(JetStreamSettings, jetstream, subject_prefix=prefix)
        )

    def _cells(self, top: _Table, paths: PathRoots) -> Iterator[CellConfig]:
        what = "an array of tables ([[cell]])"
        raw = top.value("cell", what, (list,)) if "cell" in top.data else []
        seen: dict[str, int] = {}
        for index, item in enumerate(raw):
            label = f"#{index + 1}"
            if not isinstance(item, dict):
                raise self.error("must be a table ([[cell]])", cell=label, key="cell")
            cell_id = item.get("id")
            if isinstance(cell_id, str) and SUBJECT_TOKEN.fullmatch(cell_id):
                label = cell_id
            table = _Table(item, "cell", self, label)
            values = table.read(CellConfig)
            if values["id"] in seen:
                raise table.error("id", f"duplicate cell id (also cell #{seen[values['id']] + 1})")
            seen[values["id"]] = index
            netns = values["netns"]
            cell = CellConfig(
                **values,
                netns_resolved=(
                    None
                    if netns is None
                    else _under_root(table, "netns", netns, paths.netns_root, "netns_root")
                ),
                cgroup=self._cgroup(table.table("cgroup"), paths),
                tap_link=self._tap_link(table.table("tap_link")),
                nftables=self._nftables(table.table("nftables")),
                fc_metrics=self._fc_metrics(table.table("fc_metrics"), paths),
            )
            table.finish()
            yield cell

    def _tap_link(self, table: _Table | None) -> TapLinkProbeConfig | None:
        if table is None:
            return None
        values = self._read_probe(table, TapLinkProbeConfig, "tap_link")
        table.finish()
        return TapLinkProbeConfig(**values)

    def _nftables(self, table: _Table | None) -> NftablesProbeConfig | None:
        if table is None:
            return None
        nftables = NftablesProbeConfig(**self._read_probe(table, NftablesProbeConfig, "nftables"))
        table.finish()
        if not nftables.counters and nftables.chain is None:
            raise table.error(None, "needs `counters`, `chain`, or both")
        return nftables

    def _fc_metrics(self, table: _Table | None, paths: PathRoots) -> FcMetricsProbeConfig | None:
        if table is None:
            return None
        values = self._read_probe(table, FcMetricsProbeConfig, "fc_metrics")
        root = paths.jail_root

        def resolved(name: str) -> Path:
            return _under_root(table, name, values[name], root, "jail_root")

        api_socket, metrics_path = resolved("api_socket"), resolved("metrics_path")
        table.finish()
        return FcMetricsProbeConfig(
            **values, api_socket_resolved=api_socket, metrics_path_resolved=metrics_path, root=root
        )

    def _cgroup(self, table: _Table | None, paths: PathRoots) -> CgroupProbeConfig | None:
        if table is None:
            return None
        values = self._read_probe(table, CgroupProbeConfig, "cgroup")
        root = paths.cgroup_root
        if root is None:
            raise table.error(
                "path", "no cgroup2 mount found on this host; set [paths] cgroup_root"
            )
        resolved = _under_root(table, "path", values["path"], root, "cgroup_root")
        table.finish()
        return CgroupProbeConfig(**values, resolved=resolved, root=root)


def _under_root(table: _Table, name: str, value: str, root: Path, root_key: str) -> Path:
    """``value`` (absolute, or relative to ``root``) normalised, or an error if it escapes
    its root as written or through a symlink already on the disk.

    Only the part that exists is resolved: a cell's directories may come later.
    Opens still refuse symlinks (``confine``), as the tree can change after load.
    """
    candidate = os.path.normpath(os.path.join(root, value))
    if not _within(candidate, str(root)):
        raise table.error(name, f"{value!r} is not under [paths] {root_key} ({root})")
    # realpath resolves each existing component (a dangling link's target too)
    # and keeps the missing tail as written; the root resolves the same way
    resolved = os.path.realpath(candidate)
    if not _within(resolved, table.loader.real_root(root)):
        raise table.error(
            name,
            f"{value!r} leads through a symlink to {resolved}, outside [paths] {root_key} ({root})",
        )
    return Path(candidate)


def _within(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both normalised, absolute)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def parse_config(text: str, file: str = "<config>") -> Config:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, text, file) from None
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        raise ConfigError(
            f"TOML syntax error: an integer longer than {sys.get_int_max_str_digits()} digits",
            file=file,
        ) from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise ConfigError(
            "TOML syntax error: arrays or tables nested too deeply", file=file
        ) from None
    return _Loader(file).load(document)


def load_config(path: str | os.PathLike[str]) -> Config:
    file = os.fspath(path)
    try:
        with open(file, "rb") as handle:
            raw = handle.read(4 * 1024 * 1024 + 1)
    except FileNotFoundError:
        raise ConfigError("file not found", file=file) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a file", file=file) from None
    except PermissionError:
        raise ConfigError("permission denied reading the file", file=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", file=file) from None
    if len(raw) > 4 * 1024 * 1024:
        raise ConfigError("file is larger than 4 MiB", file=file)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 (byte {exc.start})", file=file) from None
    return parse_config(text, file)


#: tomllib's suffix to every message (3.11 has no lineno/colno attributes)
_AT: Final = re.compile(r" \(at (?:line (\d+), column (\d+)|end of document)\)$")


def _syntax_error(exc: tomllib.TOMLDecodeError, text: str, file: str) -> ConfigError:
    message = str(exc)
    found = _AT.search(message)
    if found is None:
        return ConfigError(f"TOML syntax error: {message}", file=file)
    if found.group(1) is None:  # the end of the document: its last line, past its last character
        line = text.count("\n") + 1
        column = len(text) - text.rfind("\n")
    else:
        line, column = int(found.group(1)), int(found.group(2))
    return ConfigError(
        f"TOML syntax error: {message[: found.start()]}", file=file, line=line, column=column
    )
