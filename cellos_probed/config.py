"""The TOML configuration, read strictly into frozen, typed objects.

Every mistake is one :class:`ConfigError` naming the file, the cell and the
key (and line and column for TOML syntax). The loader knows every key of
the contract from the start: a key whose feature is not built yet is
refused as such, never mistaken for a typo and never silently ignored.
Paths need not exist (cells come and go) but must lie under their root, also
once the symlinks among their existing components are followed.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cellos_probed import cgroupfs

DEFAULT_SUBJECT_PREFIX: Final = "dev.cellos.events.cell.observability.host.v1"
DEFAULT_SERVERS: Final = ("nats://127.0.0.1:4222",)
SUBJECT_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SUBJECT_PREFIX: Final = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
NFT_FAMILIES: Final = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
_NFT_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]{0,255}")
_IFNAME: Final = re.compile(r"[^/\s:]{1,15}")

# Keys the contract fixes whose feature arrives with a later issue. Each is
# refused with this explanation until it is built.
NOT_SUPPORTED_YET: Final[dict[str, str]] = {
    "cell.tap_link": "the tap_link probe",
    "cell.nftables": "the nftables probe",
    "cell.fc_metrics": "the fc_metrics probe",
}

#: Probe tables parsed and validated here whose probe is built; the others
#: are refused with NOT_SUPPORTED_YET even though their keys are known.
BUILT_PROBES: Final = frozenset({"cgroup", "tap_link", "nftables", "fc_metrics"})


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


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    tick_seconds: float = 1.0
    probe_timeout_seconds: float = 0.5
    host_id: str = "localhost"
    drain_timeout_seconds: float = 5.0
    #: every this many ticks, the daemon's own `agent` event (0: never)
    agent_event_every_ticks: int = 10
    #: keep each cell's cgroup2 files open between ticks: one pread a file a tick
    #: instead of open, read, close, for ~5 KiB of kernel memory a file
    keep_cgroup_files: bool = True


@dataclass(frozen=True, slots=True)
class PathRoots:
    cgroup_root: Path | None
    jail_root: Path = Path("/srv/jailer")
    netns_root: Path = Path("/var/run/netns")


@dataclass(frozen=True, slots=True)
class JetStreamSettings:
    stream: str = "CELLOS_HOST"
    subjects: tuple[str, ...] = (f"{DEFAULT_SUBJECT_PREFIX}.>",)
    create_stream: bool = True
    replicas: int = 1
    duplicate_window_seconds: float = 120.0
    ack_timeout_seconds: float = 2.0


@dataclass(frozen=True, slots=True)
class NatsSettings:
    servers: tuple[str, ...] = DEFAULT_SERVERS
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    name: str = "cellos-probed"
    credentials: str | None = None
    nkey_seed: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    jetstream: JetStreamSettings | None = None


@dataclass(frozen=True, slots=True)
class BufferSettings:
    """The in-memory outbox bounds (used when no spool is configured)."""

    max_events: int = 100_000
    max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    path: Path
    max_bytes: int = 1024 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CgroupProbeConfig:
    path: str  # as written in the config; reported in `inputs`
    resolved: Path  # absolute, under [paths] cgroup_root
    #: [paths] cgroup_root: opens walk down from it refusing symlinks
    #: (None: only the directory's own name is checked)
    root: Path | None = None


@dataclass(frozen=True, slots=True)
class TapLinkProbeConfig:
    interface: str


@dataclass(frozen=True, slots=True)
class NftablesProbeConfig:
    family: str
    table: str
    counters: tuple[str, ...] = ()
    chain: str | None = None


@dataclass(frozen=True, slots=True)
class FcMetricsProbeConfig:
    api_socket: str  # as written
    metrics_path: str  # as written
    api_socket_resolved: Path  # absolute, under [paths] jail_root
    metrics_path_resolved: Path
    #: [paths] jail_root: opens walk down from it refusing symlinks (None: not checked)
    root: Path | None = None


@dataclass(frozen=True, slots=True)
class CellConfig:
    id: str
    run_id: str
    spec_signature_hash: str
    netns: str | None = None
    netns_resolved: Path | None = None
    cgroup: CgroupProbeConfig | None = None
    tap_link: TapLinkProbeConfig | None = None
    nftables: NftablesProbeConfig | None = None
    fc_metrics: FcMetricsProbeConfig | None = None

    def probe_names(self) -> tuple[str, ...]:
        return tuple(
            name
            for name in ("cgroup", "tap_link", "nftables", "fc_metrics")
            if getattr(self, name) is not None
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


def default_host_id() -> str:
    """The host name made a NATS subject token (dots and the like become ``_``)."""
    token = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:128]
    return token or "localhost"


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

    def has(self, name: str) -> bool:
        return name in self.data

    def _get(
        self, name: str, kinds: tuple[type, ...], what: str, default: Any, required: bool
    ) -> Any:
        self.used.add(name)
        if name not in self.data:
            if required:
                raise self.error(name, f"is required ({what})")
            return default
        value = self.data[name]
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"must be {what}, not a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"must be {what}, not {_toml_type(value)}")
        return value

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> Any:
        value = self._get(name, (str,), "a string", default, required)
        if isinstance(value, str) and not value:
            raise self.error(name, "must not be empty")
        return value

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        value = float(self._get(name, (int, float), "a number", default, False))
        if not math.isfinite(value) or not low <= value <= high:
            raise self.error(name, f"must be between {low:g} and {high:g}, got {value:g}")
        return value

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        value = self._get(name, (int,), "an integer", default, False)
        if not low <= value <= high:
            raise self.error(name, f"must be between {low} and {high}, got {value}")
        return int(value)

    def boolean(self, name: str, default: bool) -> bool:
        return bool(self._get(name, (bool,), "true or false", default, False))

    def strings(self, name: str, *, required: bool = False) -> tuple[str, ...] | None:
        value = self._get(name, (list,), "a list of strings", None, required)
        if value is None:
            return None
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.error(name, f"item {index} must be a non-empty string")
        return tuple(value)

    def table(self, name: str, *, required: bool = False) -> _Table | None:
        value = self._get(name, (dict,), "a table", None, required)
        if value is None:
            return None
        return _Table(value, self.key(name), self.loader, self.cell)

    def finish(self) -> None:
        for name in self.data:
            if name in self.used:
                continue
            generic = re.sub(r"^cell\[[^]]*\]", "cell", self.key(name))
            if generic in NOT_SUPPORTED_YET:
                raise self.error(
                    name,
                    f"is not supported yet: {NOT_SUPPORTED_YET[generic]} "
                    "arrive(s) in a later release of cellos-probed",
                )
            raise self.error(name, "unknown key")


def _toml_type(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


class _Loader:
    def __init__(self, file: str) -> None:
        self.file = file
        self._real_roots: dict[Path, str] = {}

    def real_root(self, root: Path) -> str:
        """``root`` with its symlinks resolved, once per load (thousands of cells share it)."""
        if root not in self._real_roots:
            self._real_roots[root] = os.path.realpath(root)
        return self._real_roots[root]

    def error(self, message: str, **where: Any) -> ConfigError:
        return ConfigError(message, file=self.file, **where)

    def load(self, document: dict[str, Any]) -> Config:
        top = _Table(document, "", self, None)
        daemon = self._daemon(top.table("daemon"))
        paths = self._paths(top.table("paths"))
        nats = self._nats(top.table("nats"))
        buffer = self._buffer(top.table("buffer"))
        spool = self._spool(top.table("spool"))
        cells = tuple(self._cells(top, paths))
        top.finish()
        return Config(self.file, daemon, paths, nats, cells, buffer, spool)

    def _buffer(self, table: _Table | None) -> BufferSettings:
        if table is None:
            return BufferSettings()
        max_events = table.integer("max_events", 100_000, low=10, high=100_000_000)
        max_bytes = table.integer("max_bytes", 64 * 1024 * 1024, low=4096, high=1 << 40)
        table.finish()
        return BufferSettings(max_events, max_bytes)

    def _spool(self, table: _Table | None) -> SpoolSettings | None:
        if table is None:
            return None
        path = table.string("path", required=True)
        if not os.path.isabs(path):
            raise table.error("path", "must be an absolute path")
        max_bytes = table.integer("max_bytes", 1 << 30, low=1 << 20, high=1 << 44)
        table.finish()
        return SpoolSettings(Path(os.path.normpath(path)), max_bytes)

    def _daemon(self, table: _Table | None) -> DaemonSettings:
        if table is None:
            return DaemonSettings(host_id=default_host_id())
        tick = table.number("tick_seconds", 1.0, low=0.01, high=3600.0)
        timeout = table.number("probe_timeout_seconds", tick / 2, low=0.001, high=3600.0)
        if timeout >= tick:
            raise table.error(
                "probe_timeout_seconds",
                f"must be less than tick_seconds ({tick:g}), got {timeout:g}",
            )
        host_id = table.string("host_id", default_host_id())
        if not SUBJECT_TOKEN.fullmatch(host_id):
            raise table.error("host_id", "must be a NATS subject token: [A-Za-z0-9_-]{1,128}")
        drain = table.number("drain_timeout_seconds", 5.0, low=0.0, high=600.0)
        agent_every = table.integer("agent_event_every_ticks", 10, low=0, high=1_000_000)
        keep = table.boolean("keep_cgroup_files", True)
        table.finish()
        return DaemonSettings(tick, timeout, host_id, drain, agent_every, keep)

    def _paths(self, table: _Table | None) -> PathRoots:
        found = cgroupfs.find_cgroup2_mount()
        if table is None:
            return PathRoots(cgroup_root=found)

        def root(name: str) -> Path | None:
            value = table.string(name)
            if value is None:
                return None
            if not os.path.isabs(value):
                raise table.error(name, "must be an absolute path")
            return Path(os.path.normpath(value))

        cgroup_root = root("cgroup_root") or found
        jail_root = root("jail_root") or Path("/srv/jailer")
        netns_root = root("netns_root") or Path("/var/run/netns")
        table.finish()
        return PathRoots(cgroup_root, jail_root, netns_root)

    def _nats(self, table: _Table | None) -> NatsSettings:
        if table is None:
            return NatsSettings()
        servers = table.strings("servers") or DEFAULT_SERVERS
        for server in servers:
            if not re.fullmatch(r"(nats|tls|ws|wss)://[^\s/]+(:\d+)?/?", server):
                raise table.error("servers", f"{server!r} is not a nats:// or tls:// URL")
        prefix = table.string("subject_prefix", DEFAULT_SUBJECT_PREFIX)
        if not _SUBJECT_PREFIX.fullmatch(prefix):
            raise table.error(
                "subject_prefix", "must be dot-separated subject tokens, no wildcards"
            )
        name = table.string("name", "cellos-probed")
        auth = {
            key: table.string(key)
            for key in ("credentials", "nkey_seed", "user", "password", "token")
        }
        tls = {key: table.string(key) for key in ("tls_ca", "tls_cert", "tls_key")}
        for key in ("credentials", "nkey_seed", *tls):
            value = auth.get(key) or tls.get(key)
            if value is not None and not os.path.isabs(value):
                raise table.error(key, "must be an absolute path")
        methods = [key for key in ("credentials", "nkey_seed", "user", "token") if auth[key]]
        if len(methods) > 1:
            raise table.error(
                methods[1], f"conflicts with {methods[0]}: choose one way to authenticate"
            )
        if (auth["user"] is None) != (auth["password"] is None):
            missing = "password" if auth["password"] is None else "user"
            raise table.error(missing, "user and password go together")
        if (tls["tls_cert"] is None) != (tls["tls_key"] is None):
            missing = "tls_key" if tls["tls_key"] is None else "tls_cert"
            raise table.error(missing, "tls_cert and tls_key go together")
        jetstream = self._jetstream(table.table("jetstream"), prefix)
        table.finish()
        return NatsSettings(servers, prefix, name, **auth, **tls, jetstream=jetstream)

    def _jetstream(self, table: _Table | None, prefix: str) -> JetStreamSettings | None:
        if table is None:
            return None
        stream = table.string("stream", "CELLOS_HOST")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", stream):
            raise table.error("stream", "must be a stream name: [A-Za-z0-9_-]{1,64}")
        subjects = table.strings("subjects") or (f"{prefix}.>",)
        create = table.boolean("create_stream", True)
        replicas = table.integer("replicas", 1, low=1, high=5)
        window = table.number("duplicate_window_seconds", 120.0, low=0.1, high=86_400.0)
        ack_timeout = table.number("ack_timeout_seconds", 2.0, low=0.01, high=600.0)
        table.finish()
        return JetStreamSettings(stream, subjects, create, replicas, window, ack_timeout)

    def _cells(self, top: _Table, paths: PathRoots) -> Iterator[CellConfig]:
        raw = top._get("cell", (list,), "an array of tables ([[cell]])", [], False)
        seen: dict[str, int] = {}
        for index, item in enumerate(raw):
            label = f"#{index + 1}"
            if not isinstance(item, dict):
                raise self.error("must be a table ([[cell]])", cell=label, key="cell")
            cell_id = item.get("id")
            if isinstance(cell_id, str) and SUBJECT_TOKEN.fullmatch(cell_id):
                label = cell_id
            table = _Table(item, "cell", self, label)
            cell_id = table.string("id", required=True)
            if not SUBJECT_TOKEN.fullmatch(cell_id):
                raise table.error(
                    "id", f"{cell_id!r} is not a NATS subject token: [A-Za-z0-9_-]{{1,128}}"
                )
            if cell_id in seen:
                raise table.error("id", f"duplicate cell id (also cell #{seen[cell_id] + 1})")
            seen[cell_id] = index
            run_id = table.string("run_id", required=True)
            spec_hash = table.string("spec_signature_hash", required=True)
            netns = table.string("netns")
            netns_resolved = (
                None
                if netns is None
                else _under_root(table, "netns", netns, paths.netns_root, "netns_root")
            )
            cell = CellConfig(
                cell_id,
                run_id,
                spec_hash,
                netns,
                netns_resolved,
                cgroup=self._cgroup(self._probe_table(table, "cgroup"), paths),
                tap_link=self._tap_link(self._probe_table(table, "tap_link")),
                nftables=self._nftables(self._probe_table(table, "nftables")),
                fc_metrics=self._fc_metrics(self._probe_table(table, "fc_metrics"), paths),
            )
            table.finish()
            yield cell

    def _probe_table(self, cell: _Table, name: str) -> _Table | None:
        table = cell.table(name)
        if table is not None and name not in BUILT_PROBES:
            raise cell.error(
                name,
                f"is not supported yet: {NOT_SUPPORTED_YET['cell.' + name]} "
                "arrives in a later release of cellos-probed",
            )
        return table

    def _tap_link(self, table: _Table | None) -> TapLinkProbeConfig | None:
        if table is None:
            return None
        interface = table.string("interface", required=True)
        if not _IFNAME.fullmatch(interface) or interface in (".", ".."):
            raise table.error("interface", f"{interface!r} is not a valid interface name")
        table.finish()
        return TapLinkProbeConfig(interface)

    def _nftables(self, table: _Table | None) -> NftablesProbeConfig | None:
        if table is None:
            return None
        family = table.string("family", required=True)
        if family not in NFT_FAMILIES:
            raise table.error("family", f"must be one of {', '.join(NFT_FAMILIES)}")
        name = table.string("table", required=True)
        if not _NFT_NAME.fullmatch(name):
            raise table.error("table", f"{name!r} is not a valid nftables table name")
        counters = table.strings("counters") or ()
        for counter in counters:
            if not _NFT_NAME.fullmatch(counter):
                raise table.error("counters", f"{counter!r} is not a valid nftables object name")
        if len(set(counters)) != len(counters):
            raise table.error("counters", "lists a counter twice")
        chain = table.string("chain")
        if chain is not None and not _NFT_NAME.fullmatch(chain):
            raise table.error("chain", f"{chain!r} is not a valid nftables chain name")
        if not counters and chain is None:
            raise table.error(None, "needs `counters`, `chain`, or both")
        table.finish()
        return NftablesProbeConfig(family, name, counters, chain)

    def _fc_metrics(self, table: _Table | None, paths: PathRoots) -> FcMetricsProbeConfig | None:
        if table is None:
            return None
        api = table.string("api_socket", required=True)
        metrics = table.string("metrics_path", required=True)
        api_resolved = _under_root(table, "api_socket", api, paths.jail_root, "jail_root")
        metrics_resolved = _under_root(table, "metrics_path", metrics, paths.jail_root, "jail_root")
        table.finish()
        return FcMetricsProbeConfig(api, metrics, api_resolved, metrics_resolved, paths.jail_root)

    def _cgroup(self, table: _Table | None, paths: PathRoots) -> CgroupProbeConfig | None:
        if table is None:
            return None
        path = table.string("path", required=True)
        root = paths.cgroup_root
        if root is None:
            raise table.error(
                "path", "no cgroup2 mount found on this host; set [paths] cgroup_root"
            )
        resolved = _under_root(table, "path", path, root, "cgroup_root")
        table.finish()
        return CgroupProbeConfig(path, resolved, root)


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
        raise _syntax_error(exc, file) from None
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


def _syntax_error(exc: tomllib.TOMLDecodeError, file: str) -> ConfigError:
    line = getattr(exc, "lineno", None)
    column = getattr(exc, "colno", None)
    message = getattr(exc, "msg", None) or str(exc)
    if line is None:
        found = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        if found:
            line, column = int(found.group(1)), int(found.group(2))
            message = str(exc)[: found.start()].strip()
    return ConfigError(f"TOML syntax error: {message}", file=file, line=line, column=column)
