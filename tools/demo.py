"""`make demo`: the daemon's main job on an embedded default.

Starts a nats-server from the virtualenv on a free loopback port, builds
demo cells from real kernel objects where the host allows (a cgroup under
this host's cgroup2 mount with a process burning CPU in it), writes a
config, runs `cellos-probed run` and prints what a subscriber receives,
one readable line per event, until Ctrl-C or DEMO_SECONDS. Everything it
created is removed on the way out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cellos_probed.cgroupfs import find_cgroup2_mount  # noqa: E402
from cellos_probed.tail import run_tail  # noqa: E402
from testbed.cgroup_tree import FakeCgroup, make_real_cgroup  # noqa: E402
from testbed.fc_emulator import emulator_process  # noqa: E402
from testbed.nft import CellRules, TableSpec, nft_table, ping  # noqa: E402
from testbed.taps import attached_tap, ip, network_namespace, set_link, tap_device  # noqa: E402
from testbed.unit_env import environment_like_the_unit  # noqa: E402
from tests.conftest import start_nats_server  # noqa: E402

PREFIX = "dev.cellos.events.cell.observability.host.v1"


def say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


@contextmanager
def burner_in(cgroup: Path) -> Iterator[None]:
    """A process that uses some CPU (10 ms in every 100) inside ``cgroup``."""
    code = (
        "import time\n"
        "while True:\n"
        "    end = time.time() + 0.01\n"
        "    while time.time() < end: pass\n"
        "    time.sleep(0.09)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        (cgroup / "cgroup.procs").write_text(str(process.pid))
        yield
    finally:
        process.kill()
        process.wait()


def cgroup_cells(
    stack: ExitStack, workdir: Path, extra: dict[str, str]
) -> tuple[str, str]:
    """Demo cells' [paths] line and [[cell]] tables for the cgroup probe."""
    mount = find_cgroup2_mount()
    cells = ""
    if os.geteuid() == 0 and mount is not None and os.access(mount, os.W_OK):
        parent = stack.enter_context(make_real_cgroup(mount, f"cellos-demo-{os.getpid()}"))
        for name in ("cell-1", "cell-2"):
            cgroup = stack.enter_context(make_real_cgroup(parent, name))
            if name == "cell-1":
                stack.enter_context(burner_in(cgroup))
        root = mount
        relative = parent.relative_to(mount)
        say(f"cgroups: real, under {parent} (cell-1 has a process using ~10% CPU)")
    else:
        root = workdir / "cgroup"
        relative = Path("firecracker")
        for name in ("cell-1", "cell-2"):
            FakeCgroup(root / relative / name).write()
        say(f"cgroups: not root or no writable cgroup2 mount; fixture trees under {root}")
    for name in ("cell-1", "cell-2"):
        cells += (
            f'[[cell]]\nid = "{name}"\nrun_id = "demo-run"\n'
            f'spec_signature_hash = "sha256:demo"\n{extra.get(name, "")}'
            f'[cell.cgroup]\npath = "{relative / name}"\n\n'
        )
    # a cell whose cgroup is gone: the daemon says so instead of going silent
    cells += (
        '[[cell]]\nid = "cell-gone"\nrun_id = "demo-run"\nspec_signature_hash = "sha256:demo"\n'
        f'[cell.cgroup]\npath = "{relative / "cell-gone"}"\n\n'
    )
    return f'cgroup_root = "{root}"\n', cells


@contextmanager
def flapping(name: str, netns: str, every: float) -> Iterator[None]:
    """Take ``name`` administratively down and up again every ``every`` seconds."""
    stop = threading.Event()

    def flap() -> None:
        while not stop.wait(every):
            set_link(name, "down", netns)
            time.sleep(0.2)  # a flap shorter than the tick: transitions still show it
            set_link(name, "up", netns)

    thread = threading.Thread(target=flap, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def pinging(netns: str, every: float) -> Iterator[None]:
    """ICMP on the namespace's loopback every ``every`` seconds: the counters move."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            ping(netns, 2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def network_cells(stack: ExitStack) -> dict[str, str]:
    """Each demo cell's netns, [cell.tap_link] and [cell.nftables]: real kernel objects."""
    if os.geteuid() != 0:
        say("TAPs and nftables: not root; the demo cells have only the cgroup probe")
        return {}
    name = f"cellos-demo-{os.getpid()}"
    netns = stack.enter_context(network_namespace(name))
    ip("link", "set", "lo", "up", netns=name)
    cells = ("cell-1", "cell-2")
    spec = TableSpec("inet", "cellos", [CellRules(cell) for cell in cells])
    stack.enter_context(nft_table(spec, name))
    tables = {}
    for rules in spec.cells:
        tap = f"tap-{rules.cell}"
        stack.enter_context(tap_device(tap, name))
        tables[rules.cell] = (
            f'netns = "{netns}"\n[cell.tap_link]\ninterface = "{tap}"\n'
            f'[cell.nftables]\nfamily = "inet"\ntable = "cellos"\n'
            f'counters = ["{rules.rx}", "{rules.tx}"]\nchain = "{rules.chain}"\n'
        )
    # cell-1's VMM holds its TAP open (carrier up); cell-2's flaps every 3 s
    stack.enter_context(attached_tap("tap-cell-1", name))
    stack.enter_context(flapping("tap-cell-2", name, 3.0))
    stack.enter_context(pinging(name, 1.0))
    say(f"TAPs: tap-cell-1 (held open: carrier) and tap-cell-2 (flapping) in netns {name}")
    say("nftables: table inet cellos there, counters moved by a ping every second")
    return tables


def vm_cells(stack: ExitStack, workdir: Path) -> tuple[str, dict[str, str]]:
    """An emulated Firecracker VM per demo cell: its [paths] jail_root and [cell.fc_metrics]."""
    jail = workdir / "jail"
    vms = stack.enter_context(
        emulator_process(jail, 2, prefix="cell-", interval=4.0, activity=True)
    )
    say("Firecracker: 2 emulated VMs (API socket + metrics FIFO, a periodic flush every 4 s)")
    tables = {
        f"cell-{index + 1}": (
            f'[cell.fc_metrics]\napi_socket = "{vm["api_socket"]}"\n'
            f'metrics_path = "{vm["metrics_path"]}"\n'
        )
        for index, vm in enumerate(vms)
    }
    return f'jail_root = "{jail}"\n', tables


async def show(servers: list[str], seconds: float | None) -> None:
    with trio.move_on_after(seconds if seconds else float("inf")):
        await run_tail(servers, f"{PREFIX}.>")


def main() -> int:
    seconds = float(os.environ.get("DEMO_SECONDS", "0") or 0) or None
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="cellos-demo-") as tmp:
        workdir = Path(tmp)
        server = start_nats_server(workdir / "nats")
        stack.callback(server.stop)
        say(f"nats-server from the virtualenv on {server.url}")
        taps = network_cells(stack)
        jail, vms = vm_cells(stack, workdir)
        for cell, table in vms.items():
            taps[cell] = taps.get(cell, "") + table
        paths, cells = cgroup_cells(stack, workdir, taps)
        paths += jail
        config = workdir / "demo.toml"
        config.write_text(
            "[daemon]\ntick_seconds = 1.0\n\n"
            f"[paths]\n{paths}\n"
            f'[nats]\nservers = ["{server.url}"]\n\n{cells}'
        )
        say(f"config {config}; daemon log in {workdir / 'daemon.log'}")
        log = (workdir / "daemon.log").open("wb")
        stack.callback(log.close)
        daemon = subprocess.Popen(  # allocating as the installed daemon does
            [str(Path(sys.executable).parent / "cellos-probed"), "run", "--config", str(config)],
            stderr=log,
            env=environment_like_the_unit(),
        )

        def stop_daemon() -> None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(10)
            say(f"daemon stopped, exit code {daemon.returncode}")

        stack.callback(stop_daemon)
        say("events as a subscriber receives them (Ctrl-C to stop):")
        try:
            trio.run(show, [server.url], seconds)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
