"""Delivery that loses nothing, against real nats-server processes on loopback.

Each scenario prints its figures (produced, delivered, duplicated, declared
lost) so a run's output doubles as the report.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from cellos_probed.config import NatsSettings
from cellos_probed.spool import SpoolOutbox
from cellos_probed.tail import run_verify
from cellos_probed.verify import Completeness
from testbed.cgroup_tree import FakeCgroup
from tests.conftest import NATS_SERVER, NatsServer, needs_nats, poll_until, start_nats_server

PREFIX = "dev.cellos.events.cell.observability.host.v1"
pytestmark = needs_nats


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(
    tmp_path: Path,
    servers: list[str],
    *,
    jetstream: str = "",
    extra: str = "",
    nats_extra: str = "",
    cells: tuple[str, ...] = ("a", "b"),
    tick: float = 0.1,
) -> Path:
    root = tmp_path / "cgroup"
    text = (
        f'[daemon]\ntick_seconds = {tick}\nagent_event_every_ticks = 0\nhost_id = "host-a"\n'
        f'[paths]\ncgroup_root = "{root}"\n'
        f"[nats]\nservers = {json.dumps(servers)}\n{nats_extra}{jetstream}{extra}"
    )
    for cell in cells:
        FakeCgroup(root / cell).write()
        text += (
            f'[[cell]]\nid = "{cell}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
            f'[cell.cgroup]\npath = "{cell}"\n'
        )
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    return path


JETSTREAM = "[nats.jetstream]\nstream = 'CELLOS_TEST'\nreplicas = {replicas}\n"


class Daemon:
    """``cellos-probed run`` as a process, its JSON log in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: trio.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as stderr:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "cellos_probed", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.startswith("{")]

    def count(self, event: str) -> int:
        return sum(1 for entry in self.entries() if entry.get("event") == event)

    async def stop(self, sig: int = signal.SIGTERM, within: float = 10.0) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        with trio.fail_after(within):
            return await self.process.wait()

    def produced(self) -> int:
        stopped = [e for e in self.entries() if e.get("event") == "stopped"]
        return sum(e["readings"] + e["probe_errors"] for e in stopped)


def kill_server(server: NatsServer) -> None:
    server.process.kill()
    server.process.wait(5)


async def verify_stream(url: str, stream: str = "CELLOS_TEST") -> Completeness:
    return await run_verify([url], f"{PREFIX}.>", stream=stream, duration=20)


def report(name: str, completeness: Completeness, produced: int | None = None) -> None:
    rows = completeness.rows()
    delivered = sum(row.received for row in rows)
    duplicated = sum(len(row.duplicates) for row in rows)
    declared = sum(len(row.declared) for row in rows)
    undeclared = sum(len(row.undeclared) for row in rows)
    print(
        f"\n[{name}] produced={produced if produced is not None else '?'} "
        f"delivered={delivered} duplicated={duplicated} declared_lost={declared} "
        f"undeclared_lost={undeclared}"
    )


def assert_exactly_once(completeness: Completeness, cells: tuple[str, ...] = ("a", "b")) -> None:
    rows = completeness.rows()
    assert {row.key[1] for row in rows} == {"host-a"}
    assert {row.key[2] for row in rows} == set(cells)
    for row in rows:
        assert row.duplicates == [], row
        assert row.holes == [], row
        assert row.first == 1
        assert row.received == row.last


async def test_jetstream_outage_every_sequence_once_in_order(tmp_path: Path) -> None:
    port = free_port()
    store = tmp_path / "js"
    server = start_nats_server(store, port=port, jetstream=True)
    daemon = Daemon(
        write_config(tmp_path, [server.url], jetstream=JETSTREAM.format(replicas=1)),
        tmp_path / "daemon.log",
    )
    try:
        with trio.fail_after(60):
            await daemon.start()
            await poll_until(lambda: daemon.count("nats connected") >= 1)
            await trio.sleep(1.0)  # ten ticks published normally
            kill_server(server)
            await poll_until(lambda: daemon.count("cannot publish yet; holding events") >= 1)
            await trio.sleep(1.0)  # ten more ticks held by the daemon
            server = start_nats_server(store, port=port, jetstream=True)
            await poll_until(lambda: daemon.count("publishing again") >= 1)
            await trio.sleep(0.5)
            assert await daemon.stop() == 0
            completeness = await verify_stream(server.url)
    finally:
        server.stop()
    produced = daemon.produced()
    report("jetstream outage", completeness, produced)
    assert_exactly_once(completeness)
    assert sum(row.received for row in completeness.rows()) == produced
    assert daemon.count("reloaded") == 0


async def test_kill_9_with_spooled_unacknowledged_readings(tmp_path: Path) -> None:
    """Readings spooled while NATS is away survive kill -9 and arrive once after restart."""
    port = free_port()
    store = tmp_path / "js"
    config = write_config(
        tmp_path,
        [f"nats://127.0.0.1:{port}"],
        jetstream=JETSTREAM.format(replicas=1),
        extra=f'[spool]\npath = "{tmp_path / "spool"}"\n',
    )
    daemon = Daemon(config, tmp_path / "daemon.log")
    server: NatsServer | None = None
    try:
        with trio.fail_after(60):
            await daemon.start()  # no server yet: everything goes to the spool only
            await poll_until(lambda: daemon.count("cannot publish yet; holding events") >= 1)
            await trio.sleep(1.0)
            assert await daemon.stop(signal.SIGKILL) == -signal.SIGKILL
            spooled = sum(f.stat().st_size for f in (tmp_path / "spool").glob("seg-*"))
            assert spooled > 0
            server = start_nats_server(store, port=port, jetstream=True)
            await daemon.start()
            await poll_until(
                lambda: daemon.count("spool: resending what was not confirmed before") >= 1
            )
            await poll_until(
                lambda: daemon.count("publishing again") >= 1 or daemon.count("nats connected") >= 1
            )
            await trio.sleep(1.0)
            assert await daemon.stop() == 0
            completeness = await verify_stream(server.url)
    finally:
        if server is not None:
            server.stop()
    report("kill -9 with spool", completeness, None)
    boots = {row.key[0] for row in completeness.rows()}
    assert len(boots) == 2  # the killed boot's readings, then the new boot's
    assert_exactly_once(completeness)
    # acknowledged records were removed from the spool: nothing left to resend
    assert not (tmp_path / "spool" / "seg-00000001.spool").exists()
    reopened = SpoolOutbox(tmp_path / "spool", PREFIX, "check", max_bytes=1 << 30)
    assert reopened.recovered == 0
    reopened.close()


async def test_kill_9_while_publishing_never_duplicates(tmp_path: Path) -> None:
    port = free_port()
    server = start_nats_server(tmp_path / "js", port=port, jetstream=True)
    config = write_config(
        tmp_path,
        [server.url],
        jetstream=JETSTREAM.format(replicas=1),
        extra=f'[spool]\npath = "{tmp_path / "spool"}"\n',
        tick=0.02,
    )
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        with trio.fail_after(60):
            await daemon.start()
            await poll_until(lambda: daemon.count("nats connected") >= 1)
            await trio.sleep(1.0)
            await daemon.stop(signal.SIGKILL)
            await daemon.start()
            await poll_until(lambda: daemon.count("nats connected") >= 2)
            await trio.sleep(0.5)
            assert await daemon.stop() == 0
            completeness = await verify_stream(server.url)
    finally:
        server.stop()
    report("kill -9 while publishing", completeness, None)
    assert len({row.key[0] for row in completeness.rows()}) == 2
    assert_exactly_once(completeness)


async def test_a_full_buffer_declares_exactly_what_is_missing(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        [f"nats://127.0.0.1:{port}"],
        jetstream=JETSTREAM.format(replicas=1),
        extra="[buffer]\nmax_events = 10\n",
        tick=0.05,
    )
    daemon = Daemon(config, tmp_path / "daemon.log")
    server: NatsServer | None = None
    try:
        with trio.fail_after(60):
            await daemon.start()  # the server is down: 10 events fit, the rest push out
            await poll_until(lambda: daemon.count("buffer full: dropping oldest readings") >= 2)
            await trio.sleep(1.0)
            server = start_nats_server(tmp_path / "js", port=port, jetstream=True)
            await poll_until(lambda: daemon.count("publishing again") >= 1)
            await trio.sleep(0.3)
            assert await daemon.stop() == 0
            completeness = await verify_stream(server.url)
    finally:
        if server is not None:
            server.stop()
    produced = daemon.produced()
    report("buffer full while down", completeness, produced)
    rows = completeness.rows()
    declared = sum(len(row.declared) for row in rows)
    assert declared > 20
    for row in rows:
        assert row.undeclared == [], row  # every hole named by a gap event
        assert row.duplicates == []
        assert row.first == 1
        assert set(row.declared) == set(row.holes)
    # and the gap events name nothing that did arrive
    for key, numbers in completeness.declared.items():
        assert not numbers & set(completeness.seen.get(key, {})), key
    assert sum(row.received for row in rows) + declared == produced
    assert completeness.ok


def cluster_config(name: str, port: int, cluster_port: int, routes: list[int], store: Path) -> Path:
    route_urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
    path = store.parent / f"{name}.conf"
    store.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'server_name: "{name}"\nlisten: "127.0.0.1:{port}"\n'
        f'jetstream {{ store_dir: "{store}" }}\n'
        f'cluster {{ name: "cellos", listen: "127.0.0.1:{cluster_port}", '
        f"routes: [{route_urls}] }}\n"
    )
    return path


@contextmanager
def three_node_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    ports = [free_port() for _ in range(3)]
    cluster_ports = [free_port() for _ in range(3)]
    monitors = [free_port() for _ in range(3)]
    servers: list[NatsServer] = []
    try:
        for index in range(3):
            conf = cluster_config(
                f"n{index}", ports[index], cluster_ports[index],
                [p for i, p in enumerate(cluster_ports) if i != index],
                tmp_path / f"n{index}" / "js",
            )  # fmt: skip
            servers.append(
                start_nats_server(
                    tmp_path / f"n{index}",
                    port=ports[index],
                    extra=["-c", str(conf), "-m", str(monitors[index])],
                )
            )
            servers[-1].monitor = monitors[index]  # type: ignore[attr-defined]
        yield servers
    finally:
        for server in servers:
            server.stop()


def connections(server: NatsServer) -> int:
    url = f"http://127.0.0.1:{server.monitor}/connz"  # type: ignore[attr-defined]
    with urllib.request.urlopen(url, timeout=2) as reply:
        return sum(1 for c in json.load(reply)["connections"] if c.get("name") == "cellos-probed")


def jetstream_ready(server: NatsServer) -> bool:
    url = f"http://127.0.0.1:{server.monitor}/jsz"  # type: ignore[attr-defined]
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(json.load(reply).get("meta_cluster", {}).get("leader"))
    except OSError:
        return False


async def test_cluster_failover_loses_nothing(tmp_path: Path) -> None:
    with three_node_cluster(tmp_path) as servers:
        with trio.fail_after(90):
            await poll_until(lambda: all(jetstream_ready(s) for s in servers))
            # a stream that lost its leader takes a few seconds to elect another:
            # what is held at stop may have to wait that long for its acknowledgement
            config = write_config(
                tmp_path, [s.url for s in servers], jetstream=JETSTREAM.format(replicas=3)
            )
            config.write_text(
                config.read_text().replace("[daemon]\n", "[daemon]\ndrain_timeout_seconds = 20\n")
            )
            daemon = Daemon(config, tmp_path / "daemon.log")
            await daemon.start()
            await poll_until(lambda: daemon.count("created JetStream stream") >= 1)
            await trio.sleep(1.0)
            connected = next(s for s in servers if connections(s) == 1)
            kill_server(connected)
            killed_at = trio.current_time()
            await poll_until(lambda: daemon.count("nats reconnected") >= 1)
            failover = trio.current_time() - killed_at
            await trio.sleep(1.0)
            assert await daemon.stop(within=30) == 0
            stopped = [e for e in daemon.entries() if e.get("event") == "stopped"]
            assert stopped[0]["drained"] is True  # every reading acknowledged before exit
            survivor = next(s for s in servers if s is not connected)
            completeness = await verify_stream(survivor.url)
    produced = daemon.produced()
    report(f"cluster failover ({failover:.1f}s)", completeness, produced)
    assert failover < 5.0
    assert_exactly_once(completeness)
    assert sum(row.received for row in completeness.rows()) == produced


async def test_user_password_and_token_authentication(tmp_path: Path) -> None:
    for flags, settings, wrong in (
        (["--user", "probe", "--pass", "s3cret"], "user = 'probe'\npassword = 's3cret'\n",
         "user = 'probe'\npassword = 'wrong'\n"),
        (["--auth", "t0ken"], "token = 't0ken'\n", "token = 'nope'\n"),
    ):  # fmt: skip
        server = start_nats_server(tmp_path / flags[0].strip("-"), extra=flags)
        try:
            with trio.fail_after(30):
                good = Daemon(
                    write_config(tmp_path, [server.url], nats_extra=settings),
                    tmp_path / f"good{flags[0]}.log",
                )
                await good.start()
                await poll_until(lambda: good.count("nats connected") >= 1)  # noqa: B023
                assert await good.stop() == 0
                assert good.produced() > 0
                stopped = [e for e in good.entries() if e.get("event") == "stopped"]
                assert stopped[0]["drained"] is True
                bad = Daemon(
                    write_config(tmp_path, [server.url], nats_extra=wrong),
                    tmp_path / f"bad{flags[0]}.log",
                )
                await bad.start()
                await poll_until(lambda: bad.count("cannot publish yet; holding events") >= 1)  # noqa: B023
                await trio.sleep(0.5)
                assert bad.count("nats connected") == 0
                assert await bad.stop() == 0
        finally:
            server.stop()


async def test_nkey_seed_authentication(tmp_path: Path) -> None:
    nkeys = pytest.importorskip("nkeys")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    conf = tmp_path / "nkey.conf"
    conf.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    server = start_nats_server(tmp_path / "nk", extra=["-c", str(conf)])
    try:
        with trio.fail_after(30):
            daemon = Daemon(
                write_config(tmp_path, [server.url], nats_extra=f'nkey_seed = "{seed_file}"\n'),
                tmp_path / "nkey.log",
            )
            await daemon.start()
            await poll_until(lambda: daemon.count("nats connected") >= 1)
            assert await daemon.stop() == 0
    finally:
        server.stop()
    stopped = [e for e in daemon.entries() if e.get("event") == "stopped"]
    assert stopped[0]["drained"] is True
    assert daemon.produced() > 0


async def test_tls_with_a_private_ca_and_a_client_certificate(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("cellos-probed@host")
    files = {}
    for name, blob in (
        ("ca.pem", ca.cert_pem),
        ("server.pem", server_cert.cert_chain_pems[0]),
        ("server.key", server_cert.private_key_pem),
        ("client.pem", client_cert.cert_chain_pems[0]),
        ("client.key", client_cert.private_key_pem),
    ):
        files[name] = tmp_path / name
        blob.write_to_path(str(files[name]))
    server = start_nats_server(
        tmp_path / "tls",
        extra=["--tls", "--tlscert", str(files["server.pem"]), "--tlskey", str(files["server.key"]),
               "--tlsverify", "--tlscacert", str(files["ca.pem"])],
    )  # fmt: skip
    try:
        with trio.fail_after(30):
            settings = (
                f'tls_ca = "{files["ca.pem"]}"\ntls_cert = "{files["client.pem"]}"\n'
                f'tls_key = "{files["client.key"]}"\n'
            )
            url = server.url.replace("nats://", "tls://")
            daemon = Daemon(
                write_config(tmp_path, [url], nats_extra=settings), tmp_path / "tls.log"
            )
            async with trio.open_nursery() as nursery:
                seen = Completeness()

                async def listen() -> None:
                    tls = NatsSettings(servers=(url,), tls_ca=str(files["ca.pem"]),
                                       tls_cert=str(files["client.pem"]),
                                       tls_key=str(files["client.key"]))  # fmt: skip
                    from cellos_probed.nats_bridge import open_subscription

                    async with open_subscription([url], f"{PREFIX}.>", settings=tls) as messages:
                        await daemon.start()
                        async for message in messages:
                            seen.add(json.loads(message.data))
                            if sum(r.received for r in seen.rows()) >= 6:
                                return

                await listen()
                nursery.cancel_scope.cancel()
            assert await daemon.stop() == 0
    finally:
        server.stop()
    assert sum(row.received for row in seen.rows()) >= 6
    assert {row.key[2] for row in seen.rows()} == {"a", "b"}


def test_nats_server_binary_is_the_virtualenv_one() -> None:
    assert NATS_SERVER.exists()
