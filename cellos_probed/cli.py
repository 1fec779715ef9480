"""The ``cellos-probed`` command line.

Exit codes: 0 success, 78 (EX_CONFIG) a configuration error, 1 anything
else. An operator never sees a traceback for an expected failure.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import orjson
import structlog
import trio

from cellos_probed import __version__, allocator, fd_limit, log
from cellos_probed.config import (
    DEFAULT_SERVERS,
    DEFAULT_SUBJECT_PREFIX,
    Config,
    ConfigError,
    load_config,
)
from cellos_probed.schemas import EVENT_KINDS, all_schemas, load_schema
from cellos_probed.shard import Shard

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG

T = TypeVar("T")

DESCRIPTION = """\
cellos-probed watches the Firecracker microVM cells of this host from the
outside (cgroup-v2 files, nftables counters, TAP link state, the VMM's own
metrics) and publishes every reading as a CloudEvent to NATS.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellos-probed",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 success, 78 configuration error, 1 any other failure",
    )
    parser.add_argument("--version", action="version", version=f"cellos-probed {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (logs go to stderr)",
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="JSON lines (default when stderr is not a terminal) or readable console lines",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run the daemon: probe every cell on the tick, publish to NATS",
        description="Run the daemon. SIGHUP re-reads the config; SIGTERM/SIGINT stop it "
        "after publishing what it holds (a second signal stops at once).",
    )
    run.add_argument("--config", required=True, help="path of the TOML configuration")
    run.add_argument(
        "--shard",
        type=_shard,
        metavar="I/K",
        help="run only shard I of K of the cells (by a hash of the cell id), so that K "
        "processes share a host's cells; see the cellos-probed@.service unit",
    )

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file and exit (78 if invalid)",
        description="Validate the configuration and print a summary; exit 78 naming the "
        "file, cell and key of the first mistake.",
    )
    check.add_argument("--config", required=True, help="path of the TOML configuration")

    once = commands.add_parser(
        "once",
        help="run one tick and print every event as a JSON line; publish nothing",
        description="Probe every cell once and print each event (the same envelope the "
        "daemon would publish) as one JSON object per line. Exit 0 even when probes fail: "
        "their probe_error events are in the output.",
    )
    once.add_argument("--config", required=True, help="path of the TOML configuration")

    tail = commands.add_parser(
        "tail",
        help="subscribe to the event stream and print one readable line per event",
        description="Subscribe and print events as they arrive. Servers and subject prefix "
        "come from --config when given, else the defaults. Ctrl-C ends it (exit 0); with "
        "--verify, Ctrl-C or SIGTERM ends the listening early and the report follows (a "
        "second signal ends it at once, without the report).",
    )
    tail.add_argument("--config", help="take servers and subject prefix from this config")
    tail.add_argument("--server", action="append", help="NATS server URL (repeatable)")
    tail.add_argument("--prefix", help="subject prefix")
    tail.add_argument("--host", help="only this host's cell events")
    tail.add_argument("--cell", help="only this cell")
    tail.add_argument(
        "--probe",
        help="only this probe (cgroup, tap_link, nftables, fc_metrics, probe_error, gap, agent)",
    )
    tail.add_argument("--json", action="store_true", help="print the raw CloudEvent JSON")
    tail.add_argument("--count", type=int, help="stop after this many events")
    tail.add_argument(
        "--verify",
        action="store_true",
        help="report completeness per (boot, host, cell, probe) instead of printing events: "
        "cellosseq values received, duplicates, holes, holes declared by gap events; "
        "exit 1 on an undeclared hole",
    )
    tail.add_argument("--stream", help="with --verify: read this JetStream stream from its start")
    tail.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="with --verify: seconds to listen (core NATS), or at most to read a stream",
    )

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of an event type's data (all of them without TYPE)",
        description="Print the JSON Schema (2020-12) of TYPE's data, the schema whose $id its "
        "events carry as dataschema, whole (the common definitions embedded); without TYPE, "
        "every type's, as one JSON object keyed by type.",
    )
    schema.add_argument("type", nargs="?", choices=EVENT_KINDS, metavar="TYPE",
                        help=f"one of {', '.join(EVENT_KINDS)}")  # fmt: skip
    return parser


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _summary(config: Config) -> str:
    probes: dict[str, int] = {}
    for cell in config.cells:
        for name in cell.probe_names():
            probes[name] = probes.get(name, 0) + 1
    listed = ", ".join(f"{name} x{count}" for name, count in probes.items()) or "no probes"
    return (
        f"{config.source}: OK: {len(config.cells)} cell(s) ({listed}); "
        f"tick {config.daemon.tick_seconds:g}s, probe timeout "
        f"{config.daemon.probe_timeout_seconds:g}s; NATS {', '.join(config.nats.servers)} "
        f"prefix {config.nats.subject_prefix}"
    )


def _cmd_check(args: argparse.Namespace) -> int:
    print(_summary(load_config(args.config)))
    return EXIT_OK


def _cmd_once(args: argparse.Namespace) -> int:
    from cellos_probed.daemon import run_once
    from cellos_probed.sinks import StdoutSink

    config = load_config(args.config)
    trio.run(run_once, config, StdoutSink())
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from cellos_probed.daemon import run_daemon
    from cellos_probed.events import SequenceRegistry
    from cellos_probed.nats_sink import NatsSink

    config = load_config(args.config)
    allocator.tune_collector()  # malloc settings: the unit's GLIBC_TUNABLES (allocator.py)
    shard: Shard | None = args.shard
    if shard is not None:
        config = shard.select(config)
    sequences = SequenceRegistry(host_id=config.daemon.host_id)
    sink = NatsSink(
        config.nats,
        sequences.boot_id,
        buffer=config.buffer,
        spool=config.spool,
        host_id=config.daemon.host_id,
    )

    limit = fd_limit.raise_to_hard_limit(len(config.cells))
    if not limit.enough:
        structlog.get_logger("cellos_probed.cli").warning(
            "open-file limit is below what the cells need: some probes will fail (EMFILE); "
            "raise LimitNOFILE",
            limit=limit.soft,
            needed=limit.needed,
            cells=len(config.cells),
        )
    elif config.daemon.keep_cgroup_files and not limit.keeps_every_cgroup:
        structlog.get_logger("cellos_probed.cli").info(
            "open-file limit leaves no room to keep every cgroup's files open: some are "
            "opened at every read (more CPU); raise LimitNOFILE",
            limit=limit.soft,
            wanted=limit.wanted,
            cells=len(config.cells),
        )

    async def main() -> None:
        await run_daemon(
            config,
            sink,
            config_path=args.config,
            sequences=sequences,
            shard=shard,
            settle_heap=True,
        )

    trio.run(main)
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    printed = all_schemas() if args.type is None else load_schema(args.type)
    sys.stdout.buffer.write(orjson.dumps(printed, option=orjson.OPT_INDENT_2) + b"\n")
    return EXIT_OK


def _cmd_tail(args: argparse.Namespace) -> int:
    from cellos_probed.tail import run_tail, run_verify, tail_subject

    servers: Sequence[str] = DEFAULT_SERVERS
    prefix = DEFAULT_SUBJECT_PREFIX
    settings = None
    if args.config:
        config = load_config(args.config)
        servers, prefix = config.nats.servers, config.nats.subject_prefix
        settings = config.nats
    servers = args.server or servers
    prefix = args.prefix or prefix
    # --verify --probe: the probe's readings, errors and gaps are three kinds of
    # subject, so every kind is taken and the probe is filtered by its probeSource
    subject = tail_subject(prefix, args.host, args.cell, None if args.verify else args.probe)

    def ready(banner: str) -> Callable[[], None]:
        def subscribed() -> None:
            # printed once the server has the subscription: from here nothing is missed
            print(f"# {banner} {subject} on {', '.join(servers)} (Ctrl-C to stop)", file=sys.stderr)
            sys.stderr.flush()

        return subscribed

    if args.verify:

        async def verify(stop: trio.Event) -> int:
            try:
                completeness = await run_verify(
                    servers, subject, stream=args.stream, duration=args.duration,
                    settings=settings, stop=stop, on_ready=ready("verify"), probe=args.probe,
                )  # fmt: skip
            except trio.TooSlowError:
                print(f"cellos-probed: cannot reach NATS at {', '.join(servers)}", file=sys.stderr)
                return EXIT_FAILURE
            print(completeness.render())
            return EXIT_OK if completeness.ok else EXIT_FAILURE

        code = trio.run(_until_signalled, verify)
        if code is None:
            print("cellos-probed: stopped by a second signal, before the report", file=sys.stderr)
            return EXIT_FAILURE
        return code

    try:
        trio.run(
            lambda: run_tail(
                servers, subject, as_json=args.json, limit=args.count, on_ready=ready("tail")
            )
        )
    except KeyboardInterrupt:
        pass
    except trio.TooSlowError:
        print(f"cellos-probed: cannot reach NATS at {', '.join(servers)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def _until_signalled(run: Callable[[trio.Event], Awaitable[T]]) -> T | None:
    """``run`` with SIGINT and SIGTERM setting its stop: an operator's Ctrl-C asks for
    the result now, as the end of ``--duration`` would. A second signal ends it at once
    (None)."""
    result: list[T] = []
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for _ in signals:
                    if stop.is_set():
                        nursery.cancel_scope.cancel()
                    stop.set()

            nursery.start_soon(on_signals)
            result.append(await run(stop))
            nursery.cancel_scope.cancel()
    return result[0] if result else None


_COMMANDS = {
    "run": _cmd_run,
    "check-config": _cmd_check,
    "once": _cmd_once,
    "tail": _cmd_tail,
    "schema": _cmd_schema,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fmt = {"auto": None, "json": True, "console": False}[args.log_format]
    log.configure(level=args.log_level, json=fmt)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"cellos-probed: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        structlog.get_logger("cellos_probed").exception("fatal error")
        print(f"cellos-probed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
