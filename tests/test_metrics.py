"""The daemon's own health for Prometheus: [metrics] textfile and listen.

The textfile is read by a real prometheus-node-exporter, the listener is
scraped over loopback, both are checked by promtool (Debian's prometheus
package), and the README's table, alert rules and drop-in are held to what
a scrape shows and what systemd-analyze reads.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from cellos_probed import __version__
from cellos_probed.cli import EXIT_CONFIG, main
from cellos_probed.config import (
    ConfigError,
    ListenAddress,
    MetricsSettings,
    load_config,
    parse_config,
)
from cellos_probed.daemon import DaemonHandle, Prober, run_daemon
from cellos_probed.metrics import (
    DaemonMetrics,
    MetricsExporter,
    ReloadRecord,
    textfile_every_ticks,
)
from cellos_probed.nats_sink import NatsSink
from cellos_probed.outbox import Outbox
from cellos_probed.probes import SequenceRegistry
from cellos_probed.shard import Shard
from cellos_probed.sinks import EventSink
from cellos_probed.spool import SpoolOutbox
from testbed.cgroup_tree import FakeCgroup
from tests.conftest import NatsServer, poll_until
from tests.test_daemon import RunnableSink
from tests.test_delivery import free_port
from tests.test_outbox import reading
from tests.test_systemd import TEMPLATE, UNIT, needs_analyze, unit_for_this_venv

README = Path(__file__).resolve().parent.parent / "README.md"


def test_metrics_are_off_by_default() -> None:
    assert parse_config("").metrics == MetricsSettings(textfile=None, listen=None)


def test_metrics_textfile_and_listen_are_read() -> None:
    config = parse_config(
        "[metrics]\ntextfile = '/var/lib/prometheus/node-exporter/./cellos_probed.prom'\n"
        "listen = '127.0.0.1:9817'\n"
    )
    assert config.metrics.textfile == Path("/var/lib/prometheus/node-exporter/cellos_probed.prom")
    assert config.metrics.listen == ListenAddress("127.0.0.1", 9817)
    assert str(config.metrics.listen) == "127.0.0.1:9817"
    listen = parse_config("[metrics]\nlisten = '[::1]:9817'\n").metrics.listen
    assert listen == ListenAddress("::1", 9817)
    assert str(listen) == "[::1]:9817"
    assert parse_config("[metrics]\nlisten = '127.0.0.9:1'\n").metrics.listen == ListenAddress(
        "127.0.0.9", 1
    )


LOOPBACK_ONLY = (
    "must be a loopback address and port (127.0.0.1:PORT or [::1]:PORT): the daemon serves "
    "/metrics to this host only; [metrics] textfile hands the figures to node_exporter"
)
# (config text, the message after "cellos-probed: configuration error: {file}: ")
BROKEN_METRICS = [
    ("listen = '0.0.0.0:9817'", f"key 'metrics.listen': '0.0.0.0:9817' {LOOPBACK_ONLY}"),
    ("listen = '[::]:9817'", f"key 'metrics.listen': '[::]:9817' {LOOPBACK_ONLY}"),
    ("listen = '192.0.2.7:9817'", f"key 'metrics.listen': '192.0.2.7:9817' {LOOPBACK_ONLY}"),
    ("listen = '[::ffff:127.0.0.1]:9817'", f"key 'metrics.listen': '[::ffff:127.0.0.1]:9817' {LOOPBACK_ONLY}"),  # noqa: E501
    ("listen = 'localhost:9817'", "key 'metrics.listen': 'localhost' is not an IP address (names are not resolved): write 127.0.0.1:PORT or [::1]:PORT"),  # noqa: E501
    ("listen = '127.0.0.1'", "key 'metrics.listen': '127.0.0.1' has no port: write 127.0.0.1:PORT or [::1]:PORT"),  # noqa: E501
    ("listen = '::1:9817'", "key 'metrics.listen': '::1:9817': an IPv6 address goes in brackets: [::1]:PORT"),  # noqa: E501
    ("listen = '127.0.0.1:0'", "key 'metrics.listen': the port must be between 1 and 65535, got '0'"),  # noqa: E501
    ("listen = '127.0.0.1:65536'", "key 'metrics.listen': the port must be between 1 and 65535, got '65536'"),  # noqa: E501
    ("listen = '127.0.0.1:http'", "key 'metrics.listen': the port must be between 1 and 65535, got 'http'"),  # noqa: E501
    ("listen = 9817", "key 'metrics.listen': must be a string, not an integer"),
    ("textfile = 'cellos_probed.prom'", "key 'metrics.textfile': must be an absolute path"),
    ("textfile = '/var/lib/prometheus/node-exporter/cellos_probed.txt'", "key 'metrics.textfile': must end in .prom: node_exporter's textfile collector reads only *.prom files"),  # noqa: E501
    ("textfile = '/var/lib/prometheus/node-exporter/'", "key 'metrics.textfile': must end in .prom: node_exporter's textfile collector reads only *.prom files"),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize(("line", "message"), BROKEN_METRICS, ids=[c[0] for c in BROKEN_METRICS])
def test_a_bad_metrics_setting_is_a_clear_config_error(
    line: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[metrics]\n{line}\n")
    assert main(["check-config", "--config", str(path)]) == EXIT_CONFIG
    error = capsys.readouterr().err.strip()
    assert error == f"cellos-probed: configuration error: {path}: {message}"


def test_each_shard_writes_its_own_textfile_and_listens_on_its_own_port() -> None:
    """K processes share one config: a textfile each (node_exporter reads them all)
    and consecutive ports, never one process clobbering another's figures."""
    config = parse_config(
        "[metrics]\ntextfile = '/var/lib/node-exporter/cellos_probed.prom'\n"
        "listen = '127.0.0.1:9817'\n"
    )
    first, second = Shard(0, 2).select(config).metrics, Shard(1, 2).select(config).metrics
    assert first.textfile == Path("/var/lib/node-exporter/cellos_probed.shard-0-of-2.prom")
    assert second.textfile == Path("/var/lib/node-exporter/cellos_probed.shard-1-of-2.prom")
    assert (first.listen, second.listen) == (
        ListenAddress("127.0.0.1", 9817),
        ListenAddress("127.0.0.1", 9818),
    )
    assert Shard(0, 1).select(config) == config
    assert Shard(1, 2).select(parse_config("")).metrics == MetricsSettings()
    top = parse_config("[metrics]\nlisten = '127.0.0.1:65535'\n", "c.toml")
    with pytest.raises(ConfigError) as caught:
        Shard(1, 2).select(top)
    assert str(caught.value) == (
        "c.toml: key 'metrics.listen': shard 1/2 listens on port 65535 + 1, past 65535: "
        "choose a lower port"
    )


@pytest.mark.made_up_readings
def test_the_outboxes_count_their_drops_by_the_reason_their_gap_events_give(
    tmp_path: Path,
) -> None:
    sequences = SequenceRegistry(host_id="host-a")
    outbox = Outbox("p.v1", sequences.boot_id, max_events=4, max_bytes=1 << 20)
    for _ in range(6):
        outbox.put(reading(sequences, "a"))
    batch = outbox.batch(1)
    outbox.reject(batch, "too_large")
    outbox.confirm(batch)
    assert outbox.dropped_by_reason == {"buffer_full": 2, "too_large": 1}
    assert outbox.dropped == 3

    size = len(reading(SequenceRegistry(), "a").to_json())
    spool = SpoolOutbox(
        tmp_path, "p.v1", sequences.boot_id, max_bytes=size * 40, segment_bytes=size * 10
    )
    for _ in range(60):
        spool.put(reading(sequences, "b"))
    batch = spool.batch(1)
    spool.reject(batch, "permission_denied")
    spool.confirm(batch)
    assert set(spool.dropped_by_reason) == {"spool_full", "permission_denied"}
    assert spool.dropped_by_reason["permission_denied"] == 1
    assert spool.dropped == sum(spool.dropped_by_reason.values()) > 1
    spool.close()


# --- the daemon's figures, scraped --------------------------------------------------------

PROMTOOL = shutil.which("promtool")
NODE_EXPORTER = shutil.which("prometheus-node-exporter")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus: make setup)"
)
needs_node_exporter = pytest.mark.skipif(
    NODE_EXPORTER is None,
    reason="prometheus-node-exporter not installed (Debian package: make setup)",
)

#: every family the daemon exports, with its type (the README's table holds the same)
FAMILIES = {
    "cellos_probed_build_info": "gauge",
    "cellos_probed_cells": "gauge",
    "cellos_probed_ticks": "counter",
    "cellos_probed_tick_overruns": "counter",
    "cellos_probed_ticks_skipped": "counter",
    "cellos_probed_tick_duration_seconds": "histogram",
    "cellos_probed_readings_produced": "counter",
    "cellos_probed_probe_errors": "counter",
    "cellos_probed_probe_success": "gauge",
    "cellos_probed_probe_duration_seconds": "gauge",
    "cellos_probed_config_generation": "gauge",
    "cellos_probed_config_last_reload_successful": "gauge",
    "cellos_probed_config_last_reload_success_timestamp_seconds": "gauge",
    "cellos_probed_events_published": "counter",
    "cellos_probed_events_acknowledged": "counter",
    "cellos_probed_readings_dropped": "counter",
    "cellos_probed_gap_events": "counter",
    "cellos_probed_events_buffered": "gauge",
    "cellos_probed_events_spooled": "gauge",
    "cellos_probed_spool_bytes": "gauge",
    "cellos_probed_nats_connected": "gauge",
    "cellos_probed_nats_reconnects": "counter",
    "cellos_probed_nats_permission_violations": "counter",
}


def daemon_config(
    tmp_path: Path,
    *,
    metrics: str = "",
    servers: str = "nats://127.0.0.1:1",
    extra: str = "",
    cells: tuple[str, ...] = ("a",),
    missing: tuple[str, ...] = (),
    tick: float = 0.05,
) -> Path:
    """A daemon of fixture cgroup cells (``missing``: cells whose cgroup is not there)."""
    root = tmp_path / "cgroup"
    text = (
        f'[daemon]\ntick_seconds = {tick}\nagent_event_every_ticks = 0\nhost_id = "host-a"\n'
        f'[paths]\ncgroup_root = "{root}"\n[nats]\nservers = ["{servers}"]\n{extra}'
        f"[metrics]\n{metrics}\n"
    )
    for cell in cells + missing:
        if cell in cells:
            FakeCgroup(root / cell).write()
        text += (
            f'[[cell]]\nid = "{cell}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
            f'[cell.cgroup]\npath = "{cell}"\n'
        )
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    return path


@asynccontextmanager
async def running(
    path: Path, sink: EventSink | None = None, shard: Shard | None = None
) -> AsyncIterator[DaemonHandle]:
    """The daemon of ``path`` in this process (a NATS sink by default), stopped after."""
    config = load_config(path)
    if shard is not None:
        config = shard.select(config)
    sequences = SequenceRegistry(host_id="host-a")
    if sink is None:
        sink = NatsSink(config.nats, sequences.boot_id, buffer=config.buffer,
                        host_id="host-a", retry_seconds=0.05)  # fmt: skip
    async with trio.open_nursery() as nursery:
        handle: DaemonHandle = await nursery.start(
            partial(run_daemon, config, sink, config_path=str(path), sequences=sequences,
                    handle_signals=False, shard=shard)
        )  # fmt: skip
        try:
            yield handle
        finally:
            handle.stop()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


async def scrape(url: str) -> dict[str, Metric]:
    _, _, body = await trio.to_thread.run_sync(get, url)
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def value(families: dict[str, Metric], sample: str, **labels: str) -> float:
    family = families[re.sub(r"_(total|count|sum)$", "", sample)]
    found = [s.value for s in family.samples if s.name == sample and s.labels == labels]
    assert len(found) == 1, (sample, labels, family.samples)
    return found[0]


async def refused(url: str) -> None:
    with pytest.raises(urllib.error.URLError) as caught:
        await trio.to_thread.run_sync(get, url)
    assert isinstance(caught.value.reason, ConnectionRefusedError)


async def scrape_until(
    url: str, condition: Callable[[dict[str, Metric]], bool]
) -> dict[str, Metric]:
    """Scrape until ``condition`` holds (the daemon works on its own clock); callers
    bound it with ``trio.fail_after``."""
    while True:
        try:
            families = await scrape(url)
        except OSError:  # not listening yet (node_exporter starting)
            families = {}
        if families and condition(families):
            return families
        await trio.sleep(0.05)


def assert_our_families(families: dict[str, Metric]) -> None:
    ours = {name: f.type for name, f in families.items() if name.startswith("cellos_probed_")}
    ours.pop("cellos_probed_tick_duration_seconds_created", None)  # prometheus_client's
    assert ours == FAMILIES


async def test_the_listener_serves_every_figure_with_its_type_and_they_move(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    port = free_port()
    path = daemon_config(tmp_path, metrics=f"listen = '127.0.0.1:{port}'",
                         servers=nats_server.url, cells=("a", "b"), missing=("gone",))  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    with trio.fail_after(30):
        async with running(path) as handle:
            first = await scrape_until(
                url, lambda f: value(f, "cellos_probed_events_published_total") > 0
            )
            later = await scrape_until(
                url,
                lambda f: (
                    value(f, "cellos_probed_ticks_total")
                    > value(first, "cellos_probed_ticks_total")
                ),
            )
            assert handle.exporter.listening == ListenAddress("127.0.0.1", port)
    assert_our_families(later)
    assert value(later, "cellos_probed_build_info", version=__version__) == 1
    assert value(later, "cellos_probed_cells") == 3
    assert value(later, "cellos_probed_nats_connected") == 1
    assert value(later, "cellos_probed_readings_produced_total") >= 2 * 2
    # the cell whose cgroup is missing fails every tick: the probe's last tick failed
    assert value(later, "cellos_probed_probe_success", probe="cgroup") == 0
    assert value(later, "cellos_probed_probe_errors_total", probe="cgroup", kind="io") >= 2
    assert 0 < value(later, "cellos_probed_probe_duration_seconds", probe="cgroup") < 0.05
    ticks = value(later, "cellos_probed_ticks_total")
    assert value(later, "cellos_probed_tick_duration_seconds_count") in (ticks, ticks - 1)
    assert value(later, "cellos_probed_config_generation") == 1
    assert value(later, "cellos_probed_config_last_reload_successful") == 1
    for reason in ("buffer_full", "spool_full", "too_large", "permission_denied"):
        assert value(later, "cellos_probed_readings_dropped_total", reason=reason) == 0


async def test_a_drop_shows_in_readings_dropped_total_by_its_reason(tmp_path: Path) -> None:
    """NATS unreachable and a buffer of 10 events: the oldest go, counted by reason."""
    port = free_port()
    path = daemon_config(tmp_path, metrics=f"listen = '127.0.0.1:{port}'",
                         servers=f"nats://127.0.0.1:{free_port()}", cells=("a", "b"),
                         extra="[buffer]\nmax_events = 10\n")  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    with trio.fail_after(30):
        async with running(path):
            families = await scrape_until(
                url,
                lambda f: (
                    value(f, "cellos_probed_readings_dropped_total", reason="buffer_full") > 0
                ),
            )
    assert value(families, "cellos_probed_nats_connected") == 0
    assert value(families, "cellos_probed_events_published_total") == 0
    # the ten newest readings, and the gap events that declare the rest (never dropped)
    assert value(families, "cellos_probed_events_buffered") >= 10
    assert value(families, "cellos_probed_readings_dropped_total", reason="spool_full") == 0


async def test_a_reload_turns_the_listener_on_moves_the_textfile_and_turns_it_off(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    first, second = tmp_path / "one" / "cellos_probed.prom", tmp_path / "two" / "cellos.prom"
    first.parent.mkdir()
    second.parent.mkdir()
    path = daemon_config(tmp_path, metrics=f"textfile = '{first}'")
    sink = RunnableSink()
    with trio.fail_after(30):
        async with running(path, sink) as handle:
            assert first.exists()  # written at start, not a few ticks later
            await refused(url)
            daemon_config(tmp_path, metrics=f"textfile = '{second}'\nlisten = '127.0.0.1:{port}'")
            handle.reload()
            await sink.wait_until(lambda: handle.reloads.generation == 2)
            assert not first.exists()  # node_exporter would serve it, stale, for ever
            assert second.exists()
            families = await scrape(url)
            assert value(families, "cellos_probed_config_generation") == 2
            path.write_text("[daemon]\ntick_seconds = 'soon'\n")  # refused: nothing changes
            handle.reload()
            await sink.wait_until(lambda: not handle.reloads.last_successful)
            families = await scrape(url)
            assert value(families, "cellos_probed_config_last_reload_successful") == 0
            assert value(families, "cellos_probed_config_generation") == 2
            daemon_config(tmp_path)
            handle.reload()
            await sink.wait_until(lambda: handle.reloads.generation == 3)
            await refused(url)
            assert not second.exists()
            assert handle.exporter.problem is None


async def test_a_port_in_use_is_reported_and_a_reload_tries_again(tmp_path: Path) -> None:
    """The daemon's readings matter more than its own figures: it runs on, and says so."""
    port = free_port()
    path = daemon_config(tmp_path, metrics=f"listen = '127.0.0.1:{port}'")
    sink = RunnableSink()
    with trio.fail_after(30):
        taken = trio.socket.socket()
        await taken.bind(("127.0.0.1", port))
        taken.listen()
        with capture_logs() as logs:
            async with running(path, sink) as handle:
                await sink.wait_until(lambda: len(sink.events) >= 3)  # it probes on
                assert handle.exporter.problem == (
                    f"METRICS NOT SERVED on 127.0.0.1:{port}: Address already in use"
                )
                assert handle.exporter.problem in handle.status.line()
                daemon_config(tmp_path)  # no listener: nothing to report
                handle.reload()
                await sink.wait_until(lambda: handle.reloads.generation == 2)
                assert handle.exporter.problem is None
                taken.close()
                daemon_config(tmp_path, metrics=f"listen = '127.0.0.1:{port}'")
                handle.reload()
                await sink.wait_until(lambda: handle.reloads.generation == 3)
                assert handle.exporter.problem is None
                families = await scrape(f"http://127.0.0.1:{port}/metrics")
                assert value(families, "cellos_probed_cells") == 1
    assert [e["event"] for e in logs if e["event"].startswith("metrics:")] == [
        "metrics: cannot listen",
        "metrics: serving /metrics",
    ]


async def test_the_listener_answers_only_metrics_and_honours_accept(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    path = daemon_config(tmp_path, metrics=f"listen = '127.0.0.1:{port}'")
    with trio.fail_after(30):
        async with running(path, RunnableSink()):
            plain = await trio.to_thread.run_sync(get, f"{base}/metrics")
            open_metrics = await trio.to_thread.run_sync(
                partial(get, f"{base}/metrics",
                        {"Accept": "application/openmetrics-text;version=1.0.0"})
            )  # fmt: skip
            other = await trio.to_thread.run_sync(get, f"{base}/")
            head = await trio.to_thread.run_sync(
                partial(urllib.request.urlopen,
                        urllib.request.Request(f"{base}/metrics", method="HEAD"), timeout=10)
            )  # fmt: skip
            posted = await raw(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            garbage = await raw(port, b"\x16\x03\x01 hello\r\n\r\n")
            endless = await raw(port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 4000)
            # prometheus_client's choice of format raises on this: the plain format it is
            odd = await raw(port, b"GET /metrics HTTP/1.1\r\nAccept: text/plain;version=x\r\n\r\n")
            after = await trio.to_thread.run_sync(get, f"{base}/metrics")
    assert plain[:2] == (200, "text/plain; version=0.0.4; charset=utf-8")
    assert b"# TYPE cellos_probed_ticks_total counter" in plain[2]
    assert open_metrics[0] == 200
    assert open_metrics[1].startswith("application/openmetrics-text; version=1.0.0")
    assert open_metrics[2].endswith(b"# EOF\n")
    assert other[0] == 404
    assert head.status == 200
    assert head.read() == b""
    assert posted.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nAllow: GET, HEAD\r\n" in posted
    assert garbage.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert endless == b""  # a request head that never ends is cut off unanswered
    assert odd.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4;")
    assert after[0] == 200


async def raw(port: int, request: bytes) -> bytes:
    """What the listener answers ``request`` with, until it closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        try:
            await stream.send_all(request)
        except trio.BrokenResourceError:
            pass  # it closed first (a head too long): the answer is what was read
        answer = b""
        try:
            while chunk := await stream.receive_some(65536):
                answer += chunk
        except trio.BrokenResourceError:
            pass  # reset: it closed with our request unread
        return answer


async def test_the_textfile_is_replaced_whole_every_5_seconds_of_ticks_readable_by_all(
    tmp_path: Path,
) -> None:
    """Under the unit's UMask=0077 the file is still 0644 (node_exporter runs as its own
    user), no temporary file stays, and a directory that is missing is no crash."""
    directory = tmp_path / "textfile"
    textfile = directory / "cellos_probed.prom"
    path = daemon_config(tmp_path, metrics=f"textfile = '{textfile}'", tick=0.05)
    sink = RunnableSink()
    previous = os.umask(0o077)
    try:
        with trio.fail_after(30):
            async with running(path, sink) as handle:
                await sink.wait_until(lambda: len(sink.events) >= 2)
                assert handle.exporter.problem == (
                    f"METRICS TEXTFILE NOT WRITTEN: {textfile}: No such file or directory"
                )
                directory.mkdir()
                await sink.wait_until(textfile.exists)  # the next write: tick 100
                assert handle.exporter.problem is None
                written = textfile.read_text()
    finally:
        os.umask(previous)
    assert textfile.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in directory.iterdir()] == ["cellos_probed.prom"]
    families = {f.name: f for f in text_string_to_metric_families(written)}
    assert value(families, "cellos_probed_ticks_total") == textfile_every_ticks(0.05) == 100


async def test_a_textfile_the_system_refuses_says_what_the_unit_needs() -> None:
    """sysfs refuses to create a file even to root, as a sandbox would."""
    config = parse_config("[metrics]\ntextfile = '/sys/cellos_probed.prom'\n")
    prober = Prober(config, RunnableSink(), SequenceRegistry(host_id="host-a"))
    exporter = MetricsExporter(DaemonMetrics(prober, prober.sink, ReloadRecord()), 1.0)
    with capture_logs() as logs:
        await exporter.apply(config.metrics)  # written at once
        exporter.after_tick(1)  # and again: said once
    assert exporter.problem == (
        "METRICS TEXTFILE NOT WRITTEN: /sys/cellos_probed.prom: Permission denied (under "
        "systemd, the unit's ReadWritePaths= must name its directory; see the README, Metrics)"
    )
    assert [entry["event"] for entry in logs] == ["metrics: cannot write the textfile"]


async def test_a_shard_labels_every_series_with_its_name(tmp_path: Path) -> None:
    """Every shard's textfile lands in one node_exporter: their series must differ."""
    textfile = tmp_path / "cellos_probed.prom"
    path = daemon_config(tmp_path, metrics=f"textfile = '{textfile}'", cells=("a", "b", "c"))
    sink = RunnableSink()
    with trio.fail_after(30):
        async with running(path, sink, Shard(1, 2)) as handle:
            await sink.wait_until(lambda: handle.prober.tick_stats.ticks >= 2)
            handle.exporter.write()
    written = tmp_path / "cellos_probed.shard-1-of-2.prom"
    assert not textfile.exists()
    samples = [s for f in text_string_to_metric_families(written.read_text()) for s in f.samples]
    assert {s.name for s in samples} >= {
        "cellos_probed_tick_duration_seconds_count", "cellos_probed_probe_success"
    }
    assert all(s.labels.get("shard") == "1/2" for s in samples)


@needs_node_exporter
async def test_node_exporter_reads_the_textfile_and_serves_our_figures_with_their_types(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    directory = tmp_path / "textfile"
    directory.mkdir()
    path = daemon_config(tmp_path, metrics=f"textfile = '{directory / 'cellos_probed.prom'}'",
                         servers=nats_server.url, missing=("gone",))  # fmt: skip
    port = free_port()
    assert NODE_EXPORTER is not None
    with trio.fail_after(60):
        async with running(path) as handle:
            await poll_until(lambda: handle.sink.statistics().published > 0)
            handle.exporter.write()  # with NATS connected: what every later write shows
        exporter = await trio.lowlevel.open_process(
            [NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
             f"--collector.textfile.directory={directory}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            families = await scrape_until(
                f"http://127.0.0.1:{port}/metrics", lambda f: "node_textfile_scrape_error" in f
            )
        finally:
            exporter.terminate()
            await exporter.wait()
    assert value(families, "node_textfile_scrape_error") == 0
    assert_our_families(families)
    assert value(families, "cellos_probed_nats_connected") == 1
    assert value(families, "cellos_probed_readings_produced_total") > 0


@needs_promtool
async def test_promtool_finds_the_textfile_and_the_listener_clean(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    port = free_port()
    textfile = tmp_path / "cellos_probed.prom"
    path = daemon_config(
        tmp_path, metrics=f"textfile = '{textfile}'\nlisten = '127.0.0.1:{port}'",
        servers=nats_server.url, missing=("gone",),
    )  # fmt: skip
    with trio.fail_after(30):
        async with running(path) as handle:
            await scrape_until(
                f"http://127.0.0.1:{port}/metrics",
                lambda f: value(f, "cellos_probed_events_published_total") > 0,
            )
            handle.exporter.write()
            _, _, served = await trio.to_thread.run_sync(get, f"http://127.0.0.1:{port}/metrics")
    for text in (textfile.read_bytes(), served):
        assert b'cellos_probed_probe_errors_total{kind="io",probe="cgroup"}' in text
        checked = await trio.run_process(
            [str(PROMTOOL), "check", "metrics"], stdin=text, capture_stdout=True,
            capture_stderr=True, check=False,
        )  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout + checked.stderr == b""  # no lint finding either


# --- the README and the unit ----------------------------------------------------------------


def readme_section() -> str:
    text = README.read_text()
    return text[text.index("\n## Metrics\n") :].split("\n## ", 2)[1]


def test_the_readme_table_lists_exactly_the_exported_families() -> None:
    rows = re.findall(r"^\| `(cellos_probed_\w+)` \| (\w+) \|", readme_section(), re.MULTILINE)
    documented = {
        (name.removesuffix("_total") if kind == "counter" else name): kind for name, kind in rows
    }
    assert documented == FAMILIES


@needs_promtool
def test_the_readme_alert_rules_pass_promtool(tmp_path: Path) -> None:
    rules = re.search(r"```yaml\n(.*?)```", readme_section(), re.DOTALL)
    assert rules is not None
    path = tmp_path / "rules.yml"
    path.write_text(rules.group(1))
    checked = subprocess.run([str(PROMTOOL), "check", "rules", str(path)],
                             capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 2 rules found" in checked.stdout
    used = set(re.findall(r"cellos_probed_\w+", rules.group(1)))
    assert used
    assert all(
        name.removesuffix("_total") in FAMILIES or name.removesuffix("_bucket") in FAMILIES
        for name in used
    )


def test_the_units_deny_binding_a_port_unless_a_drop_in_allows_it() -> None:
    for unit in (UNIT, TEMPLATE):
        text = unit.read_text()
        assert "\nSocketBindDeny=any\n" in text
        assert "SocketBindAllow" not in text.replace("SocketBindAllow=tcp:PORT", "")
        assert "\nReadWritePaths=-/var/lib/prometheus/node-exporter\n" in text


@needs_analyze
@pytest.mark.parametrize(
    ("unit", "name"), [(UNIT, "cellos-probed.service"), (TEMPLATE, "cellos-probed@0-2.service")]
)
def test_the_readme_drop_in_verifies_and_is_read(tmp_path: Path, unit: Path, name: str) -> None:
    drop_in = re.search(r"```ini\n(.*?)```", readme_section(), re.DOTALL)
    assert drop_in is not None
    path = unit_for_this_venv(tmp_path, unit, name)
    directory = tmp_path / f"{unit.name}.d"
    directory.mkdir()
    text = textwrap.dedent(drop_in.group(1))  # a list item's block, indented
    (directory / "metrics.conf").write_text(text)

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                              capture_output=True, text=True, check=False, timeout=60)  # fmt: skip

    clean = verify()
    assert (clean.returncode, clean.stderr) == (0, "")
    # the drop-in is read: a mistake in it is reported
    (directory / "metrics.conf").write_text(text + "SocketBindAllow=tcp:nonsense\n")
    assert "SocketBindAllow" in verify().stderr
