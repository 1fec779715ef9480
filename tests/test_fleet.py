"""The fleet of docs/fleet.md on loopback, from the very files the page shows
(config/fleet/): a 3-node hub cluster with JetStream, a leaf node per host with
JetStream in the host's own domain, a daemon per host publishing to its leaf,
and the hub's CELLOS_FLEET stream sourcing every host's stream. The whole hub
stops for 30 s; the hosts do not notice, and the hub ends up with every reading
exactly once. And the domain itself: a daemon's stream calls go to its leaf's
JetStream wherever the daemon is connected."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import trio

from cellos_probed.cloudevent import STRUCTURED_CONTENT_TYPE
from cellos_probed.config import JetStreamSettings, NatsSettings
from cellos_probed.nats_bridge import NatsPublisher, PublishRefused
from cellos_probed.tail import run_verify
from cellos_probed.verify import Completeness
from testbed.cgroup_tree import FakeCgroup
from tests.conftest import NatsServer, needs_nats, poll_until, start_nats_server
from tests.test_delivery import PREFIX, Daemon, free_port

pytestmark = needs_nats

FLEET = Path(__file__).resolve().parent.parent / "config" / "fleet"
HOSTS = ("host-a", "host-b")
CELLS = ("cell-1", "cell-2")
TICK = 0.1
#: the files read their passwords from the servers' environment
PASSWORDS = {
    "CELLOS_CONSUMER_PASSWORD": "pw-consumer",
    "CELLOS_ADMIN_PASSWORD": "pw-admin",
    "CELLOS_HOST_A_PASSWORD": "pw-host-a",
    "CELLOS_HOST_B_PASSWORD": "pw-host-b",
    "CELLOS_LEAF_HOST_A_PASSWORD": "pw-leaf-a",
    "CELLOS_LEAF_HOST_B_PASSWORD": "pw-leaf-b",
}
HOST_PASSWORD = {"host-a": "pw-host-a", "host-b": "pw-host-b"}
LEAF_PASSWORD = {"host-a": "pw-leaf-a", "host-b": "pw-leaf-b"}
ADMIN = ("cellos-admin", "pw-admin")
CONSUMER = ("cellos-consumer", "pw-consumer")
#: a stream file's max_bytes is reserved on disk when the stream is made, more
#: than a test machine has: that limit alone is lowered here
TEST_MAX_BYTES = 256 * 1024 * 1024
OUTAGE_SECONDS = 30.0
#: a host's stream, asked on its own leaf (whose own domain's API is $JS.API)
ON_LEAF = "$JS.API.STREAM.INFO.CELLOS_HOST"


@dataclass
class Node:
    """One nats-server of the fleet: its file in config/fleet and the environment it reads."""

    conf: Path
    workdir: Path
    port: int
    monitor: int
    env: dict[str, str] = field(default_factory=dict)
    server: NatsServer | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, monkeypatch: pytest.MonkeyPatch) -> None:
        own = {
            "CELLOS_NATS_LISTEN": f"127.0.0.1:{self.port}",
            "CELLOS_NATS_MONITOR": f"127.0.0.1:{self.monitor}",
            "CELLOS_JS_STORE": str(self.workdir / "store"),
        }
        with monkeypatch.context() as context:
            for variable, value in (PASSWORDS | self.env | own).items():
                context.setenv(variable, value)
            self.server = start_nats_server(
                self.workdir, port=self.port, extra=["-c", str(self.conf)]
            )

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def meta_leader(self) -> bool:
        """Whether this node knows its JetStream cluster's meta leader."""
        url = f"http://127.0.0.1:{self.monitor}/jsz"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return bool(json.load(reply).get("meta_cluster", {}).get("leader"))
        except OSError:
            return False


@dataclass
class Fleet:
    hubs: list[Node]
    leaves: dict[str, Node]
    #: the hosts' daemons, killed at the end if a failed test left them running
    daemons: dict[str, Daemon] = field(default_factory=dict)

    def start_hub(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for hub in self.hubs:
            hub.start(monkeypatch)

    def stop_hub(self) -> None:
        for hub in self.hubs:
            hub.stop()

    def hub_ready(self) -> bool:
        """Every hub node knows the JetStream meta leader, and every leaf is attached."""
        return all(hub.meta_leader() for hub in self.hubs) and sum(
            attached_leaves(hub.monitor) for hub in self.hubs
        ) == len(self.leaves)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    routes = [free_port() for _ in range(3)]
    leafnode_ports = [free_port() for _ in range(3)]
    hubs = []
    for index in range(3):
        name = f"hub-{index + 1}"
        node = Node(FLEET / f"{name}.conf", tmp_path / name, free_port(), free_port())
        node.env = {
            "CELLOS_CLUSTER_LISTEN": f"127.0.0.1:{routes[index]}",
            "CELLOS_LEAFNODE_LISTEN": f"127.0.0.1:{leafnode_ports[index]}",
        } | {
            f"CELLOS_HUB_{i + 1}_ROUTE": f"nats-route://127.0.0.1:{p}" for i, p in enumerate(routes)
        }
        hubs.append(node)
    leaves = {}
    for host in HOSTS:
        node = Node(FLEET / f"leaf-{host}.conf", tmp_path / host, free_port(), free_port())
        node.env = {
            f"CELLOS_HUB_{i + 1}_LEAF_URL": f"nats-leaf://leaf-{host}:{LEAF_PASSWORD[host]}@127.0.0.1:{p}"
            for i, p in enumerate(leafnode_ports)
        }  # fmt: skip
        leaves[host] = node
    fleet = Fleet(hubs, leaves)
    try:
        yield fleet
    finally:
        for daemon in fleet.daemons.values():
            kill_if_running(daemon)
        for node in [*leaves.values(), *hubs]:
            node.stop()


def kill_if_running(daemon: Daemon) -> None:
    if daemon.process is not None and daemon.process.returncode is None:
        daemon.process.kill()


def attached_leaves(monitor: int) -> int:
    """The leaf node connections a server has, from its monitoring port (0 while away)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/leafz", timeout=2) as reply:
            return len(json.load(reply).get("leafs") or [])
    except OSError:
        return 0


async def api(
    url: str, subject: str, body: Any = None, *, user: tuple[str, str] | None = ADMIN
) -> dict[str, Any]:
    """One JetStream API request (nats-py on an asyncio loop of its own, in a thread):
    the server's JSON answer, or an ``error`` member where none came."""
    auth = {} if user is None else {"user": user[0], "password": user[1]}

    async def request() -> dict[str, Any]:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, **auth)
        try:
            payload = b"" if body is None else json.dumps(body).encode()
            reply = await nc.request(subject, payload, timeout=5)
            return dict(json.loads(reply.data))
        finally:
            await nc.close()

    try:
        return await trio.to_thread.run_sync(asyncio.run, request())
    except (nats.errors.Error, OSError) as exc:  # a cluster still electing, a node away
        return {"error": {"description": repr(exc)}}


async def create(url: str, subject: str, config: dict[str, Any]) -> None:
    """Create a stream, retried while the JetStream cluster settles (a new meta leader
    may not know every peer yet: "no suitable peers", "temporarily unavailable")."""
    with trio.move_on_after(30):
        while "error" in (answer := await api(url, subject, config)):  # noqa: ASYNC110
            await trio.sleep(0.2)  # the cluster settling in other processes, nothing to await
        return
    raise AssertionError(f"{subject}: {answer['error']}")


def stream_file(name: str) -> dict[str, Any]:
    config = dict(json.loads((FLEET / name).read_text()))
    if config.get("max_bytes", -1) > 0:
        config["max_bytes"] = TEST_MAX_BYTES
    return config


async def messages(url: str, info: str, *, user: tuple[str, str] | None = ADMIN) -> int:
    """The message count of the stream whose STREAM.INFO subject (of whichever
    domain) is ``info``; -1 while it cannot answer."""
    answer = await api(url, info, user=user)
    return -1 if "error" in answer else int(answer["state"]["messages"])


async def await_count(
    url: str,
    info: str,
    done: Callable[[int], bool],
    *,
    within: float = 60,
    user: tuple[str, str] | None = ADMIN,
) -> int:
    with trio.fail_after(within):
        while not done(count := await messages(url, info, user=user)):  # noqa: ASYNC110
            await trio.sleep(0.2)  # a count in another process, nothing to await
    return count


def daemon_config(tmp_path: Path, host: str, server: str, *, with_user: bool = True) -> Path:
    """A host's daemon: its server, its host's user, its leaf's domain; two fixture cgroups."""
    root = tmp_path / f"cgroup-{host}"
    auth = f'user = "{host}"\npassword = "{HOST_PASSWORD[host]}"\n' if with_user else ""
    text = (
        f'[daemon]\ntick_seconds = {TICK}\nagent_event_every_ticks = 0\nhost_id = "{host}"\n'
        f'[paths]\ncgroup_root = "{root}"\n'
        f'[nats]\nservers = ["{server}"]\n{auth}'
        f'[nats.jetstream]\ndomain = "{host}"\n'
    )
    for cell in CELLS:
        FakeCgroup(root / cell).write()
        text += (
            f'[[cell]]\nid = "{cell}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
            f'[cell.cgroup]\npath = "{cell}"\n'
        )
    path = tmp_path / f"daemon-{host}.toml"
    path.write_text(text)
    return path


@pytest.mark.timeout(300)
async def test_the_whole_hub_stops_for_30_s_and_the_fleet_stream_ends_exactly_once(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = fleet.hubs[0]
    # a host's stream asked from the hub, through the host's domain
    through_hub = {host: f"$JS.{host}.API.STREAM.INFO.CELLOS_HOST" for host in HOSTS}
    in_fleet = "$JS.API.STREAM.INFO.CELLOS_FLEET"
    daemons = fleet.daemons = {
        host: Daemon(daemon_config(tmp_path, host, leaf.url), tmp_path / f"daemon-{host}.log")
        for host, leaf in fleet.leaves.items()
    }
    with trio.fail_after(90):
        fleet.start_hub(monkeypatch)
        for leaf in fleet.leaves.values():
            leaf.start(monkeypatch)
        await poll_until(fleet.hub_ready)
        for host, leaf in fleet.leaves.items():
            subject = f"$JS.{host}.API.STREAM.CREATE.CELLOS_HOST"
            await create(leaf.url, subject, stream_file(f"stream-leaf-{host}.json"))
        for name in ("FLEET", "LATEST"):
            config = stream_file(f"stream-{name.lower()}.json")
            await create(hub.url, f"$JS.API.STREAM.CREATE.CELLOS_{name}", config)
        for daemon in daemons.values():
            await daemon.start()
        # both hosts' readings reach the hub through their leaves
        for host in HOSTS:
            await await_count(hub.url, through_hub[host], lambda n: n >= 20)
        await await_count(hub.url, in_fleet, lambda n: n >= 40)

    def troubles() -> dict[str, int]:
        """What each host noticed, from its log: lost connections, readings held back."""
        return {
            host: daemon.count("nats disconnected")
            + daemon.count("cannot publish yet; holding events")
            for host, daemon in daemons.items()
        }

    fleet.stop_hub()
    troubles_before = troubles()
    before = {host: await messages(leaf.url, ON_LEAF) for host, leaf in fleet.leaves.items()}
    await trio.sleep(OUTAGE_SECONDS)  # the outage itself
    during = {
        host: await messages(leaf.url, ON_LEAF) - before[host]
        for host, leaf in fleet.leaves.items()
    }

    with trio.fail_after(150):
        fleet.start_hub(monkeypatch)
        await poll_until(fleet.hub_ready)
        noticed = troubles()  # before the daemons stop (and disconnect)
        for daemon in daemons.values():
            assert await daemon.stop() == 0
        produced = {host: daemon.produced() for host, daemon in daemons.items()}
        stored = {host: await messages(leaf.url, ON_LEAF) for host, leaf in fleet.leaves.items()}
        in_hub = await await_count(hub.url, in_fleet, lambda n: n >= sum(stored.values()))
        first = await api(hub.url, "$JS.API.STREAM.MSG.GET.CELLOS_FLEET", {"seq": 1})
        cells = len(HOSTS) * len(CELLS)
        latest = await await_count(
            hub.url, "$JS.API.STREAM.INFO.CELLOS_LATEST", lambda n: n >= cells
        )
        tail = tmp_path / "tail.toml"
        tail.write_text(
            f"[nats]\nservers = {json.dumps([h.url for h in fleet.hubs])}\n"
            f'user = "{CONSUMER[0]}"\npassword = "{CONSUMER[1]}"\n'
        )
        verify = await trio.run_process(
            [sys.executable, "-m", "cellos_probed", "tail", "--verify", "--stream", "CELLOS_FLEET",
             "--config", str(tail), "--duration", "30"],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        consumer = NatsSettings(servers=(hub.url,), user=CONSUMER[0], password=CONSUMER[1])
        completeness = await run_verify(
            [hub.url], f"{PREFIX}.>", stream="CELLOS_FLEET", duration=30, settings=consumer
        )
        last_of = {(row.key[1], row.key[2]): row.last for row in completeness.rows()}
        # a dashboard's read of one cell's state, a direct get on CELLOS_LATEST, comes
        # to the cell's last reading once CELLOS_LATEST has caught up with CELLOS_FLEET
        newest = f"$JS.API.DIRECT.GET.CELLOS_LATEST.{PREFIX}.cgroup.{HOSTS[0]}.{CELLS[0]}"
        wanted = last_of[HOSTS[0], CELLS[0]]
        while (await api(hub.url, newest, user=CONSUMER)).get("cellosseq") != wanted:  # noqa: ASYNC110
            await trio.sleep(0.2)  # the hub sourcing, nothing to await
        # a late re-send's look-up (the daemon's own code) goes to the leaf through its domain
        looked_up = {host: await last_stored(host, leaf) for host, leaf in fleet.leaves.items()}
        durable = json.loads((FLEET / "consumer-cgroup.json").read_text())
        created = await api(
            hub.url,
            f"$JS.API.CONSUMER.CREATE.CELLOS_FLEET.{durable['durable_name']}",
            {"stream_name": "CELLOS_FLEET", "config": durable},
            user=CONSUMER,
        )

    report(completeness, produced, in_hub)
    print(verify.stdout.decode())
    for host in HOSTS:
        # the hosts did not notice the outage: never held back, their leaves kept storing
        assert noticed[host] == troubles_before[host]
        assert during[host] >= OUTAGE_SECONDS / TICK * len(CELLS) * 0.8, during
        assert stored[host] == produced[host]
    assert in_hub == sum(stored.values())
    # sourced with its headers: still a structured-mode CloudEvent, still its Nats-Msg-Id
    headers = base64.b64decode(first["message"]["hdrs"]).decode()
    assert f"Content-Type: {STRUCTURED_CONTENT_TYPE}\r\n" in headers
    assert "Nats-Msg-Id: urn:cellos:event:" in headers
    assert latest == cells  # max_msgs_per_subject = 1: each cell's latest reading
    assert verify.returncode == 0, verify.stderr.decode()
    rows = completeness.rows()
    assert {(row.key[1], row.key[2]) for row in rows} == {(h, c) for h in HOSTS for c in CELLS}
    for row in rows:
        assert row.duplicates == [], row
        assert row.holes == [], row
        assert (row.first, row.received) == (1, row.last), row
    for host in HOSTS:
        assert sum(row.received for row in rows if row.key[1] == host) == produced[host]
    for host in HOSTS:
        last = last_of[host, CELLS[0]]
        # its own cell's last reading; another host's: refused by the leaf's permissions
        assert looked_up[host] == (last, True)
    assert "error" not in created, created
    assert created["num_pending"] == in_hub  # every reading here is a cgroup reading


async def last_stored(host: str, leaf: Node) -> tuple[int | None, bool]:
    """What the daemon's look-up before a late re-send finds on its leaf, as the host's
    user: the ``cellosseq`` of the last stored reading of the host's first cell, and
    whether the same look-up of another host's cell is refused."""
    jetstream = JetStreamSettings(domain=host)
    settings = NatsSettings(
        (leaf.url,), user=host, password=HOST_PASSWORD[host], jetstream=jetstream
    )
    publisher = NatsPublisher(settings, host_id=host)
    publisher.start()
    try:
        await poll_until(lambda: publisher.state.connected)
        own = f"{PREFIX}.cgroup.{host}.{CELLS[0]}"
        found = (await publisher.last_stored(jetstream, [own]))[own]
        sequence = None if found is None else found.sequence
        other = f"{PREFIX}.cgroup.{next(h for h in HOSTS if h != host)}.{CELLS[0]}"
        try:
            await publisher.last_stored(jetstream, [other])
        except PublishRefused:
            return sequence, True
        return sequence, False
    finally:
        await publisher.aclose()


def report(completeness: Completeness, produced: dict[str, int], in_hub: int) -> None:
    rows = completeness.rows()
    print(
        f"\n[fleet, hub stopped {OUTAGE_SECONDS:.0f} s] produced={sum(produced.values())} "
        f"({', '.join(f'{h} {n}' for h, n in produced.items())}) stored={in_hub} "
        f"duplicated={sum(len(row.duplicates) for row in rows)} "
        f"declared_lost={sum(len(row.declared) for row in rows)} "
        f"undeclared_lost={sum(len(row.undeclared) for row in rows)}"
    )


async def test_the_domain_takes_the_daemons_stream_calls_to_its_leaf_wherever_it_connects(
    tmp_path: Path,
) -> None:
    """A daemon connected to the hub with ``domain = "host-a"``: its stream is looked
    up and created in the leaf's JetStream, not the hub's, and its readings are
    stored and acknowledged there."""
    leafnodes = free_port()
    hub_conf = tmp_path / "hub.conf"
    hub_conf.write_text(
        f'server_name: hub\njetstream {{ domain: hub, store_dir: "{tmp_path / "hub-js"}" }}\n'
        f'leafnodes {{ listen: "127.0.0.1:{leafnodes}" }}\n'
    )
    leaf_conf = tmp_path / "leaf.conf"
    leaf_conf.write_text(
        f'server_name: leaf\njetstream {{ domain: host-a, store_dir: "{tmp_path / "leaf-js"}" }}\n'
        f'leafnodes {{ remotes: [{{url: "nats-leaf://127.0.0.1:{leafnodes}"}}] }}\n'
    )
    monitor = free_port()
    hub = start_nats_server(tmp_path / "hub", extra=["-c", str(hub_conf), "-m", str(monitor)])
    leaf = start_nats_server(tmp_path / "leaf", extra=["-c", str(leaf_conf)])
    daemon = Daemon(
        daemon_config(tmp_path, "host-a", hub.url, with_user=False), tmp_path / "daemon.log"
    )
    in_leaf = "$JS.host-a.API.STREAM.INFO.CELLOS_HOST"
    try:
        with trio.fail_after(60):
            await poll_until(lambda: attached_leaves(monitor) == 1)
            await daemon.start()
            await await_count(hub.url, in_leaf, lambda n: n >= 20, user=None)
            assert await daemon.stop() == 0
            stored = await messages(hub.url, in_leaf, user=None)
            at_hub = await api(hub.url, "$JS.API.STREAM.INFO.CELLOS_HOST", user=None)
    finally:
        kill_if_running(daemon)
        leaf.stop()
        hub.stop()
    assert daemon.count("created JetStream stream") == 1
    assert stored == daemon.produced()
    assert at_hub.get("error", {}).get("err_code") == 10059, at_hub  # stream not found
