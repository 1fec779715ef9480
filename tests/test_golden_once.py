"""``cellos-probed once`` on a whole testbed, compared with a committed golden file.

The testbed: cgroup fixture files, a TAP (its carrier held up through
/dev/net/tun) and an nftables table with named counters and a chain, both
in a network namespace of their own, and an emulated Firecracker VM. The
real CLI runs as a subprocess; every line it prints is parsed, what differs
from run to run is replaced by a placeholder (see :func:`normalised`),
the events are sorted and compared with ``tests/golden/once.json``. On a
mismatch the test prints a unified diff of golden and actual.

After a deliberate change of the output, rewrite the golden file and
review its diff before committing it::

    CELLOS_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_golden_once.py

Cells: ``cell-full`` (all four probes reading), ``cell-gone`` (its cgroup
directory does not exist: a probe_error), ``cell-partial`` (a cgroup without
the memory and pids controllers: those files listed as missing) and
``cell-nocounter`` (one of its nftables counters does not exist).
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from testbed.cgroup_tree import FakeCgroup
from testbed.fc_emulator import jail_paths, open_emulator
from testbed.nft import CellRules, TableSpec, namespace_with_loopback, namespaces, nft_table, ping
from testbed.taps import attached_tap, ip, link_details, set_link, tap_device, unique_name
from tests.conftest import needs_root, poll_until
from tests.event_contract import check_event
from tests.fc_helpers import short_root

pytestmark = needs_root

GOLDEN = Path(__file__).parent / "golden" / "once.json"
REPO = Path(__file__).resolve().parents[1]
PID = str(os.getpid())

TAP = "tap-full"  # alone in its namespace: no need for a unique name
TAP_ADDRESS = "02:fc:00:00:00:01"  # set, so the reading's address is exact
TABLE = "cellos"
FULL = CellRules("cell-full")
EXTRA_COUNTER = "cell-nocounter-rx"
ABSENT_COUNTER = "cell-nocounter-tx"
PINGS = 2

#: an event id and a boot id are random UUID4s; a time is RFC 3339 UTC with milliseconds
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
#: numbers that differ from run to run, by key name wherever they appear: the
#: wall clock of the VMM's newest line, the interface index the kernel gave the TAP
VOLATILE_NUMBERS = frozenset({"utc_timestamp_ms", "ifindex"})


@pytest.fixture(autouse=True)
def leaves_nothing_behind() -> Iterator[None]:
    yield
    assert [name for name in namespaces() if PID in name] == []


@pytest.fixture
def root() -> Iterator[Path]:
    # short: the VM's API socket path must fit a sockaddr_un
    yield from short_root()


def normalised(value: Any, places: dict[str, str], key: str | None = None) -> Any:
    """``value`` with run-specific parts replaced; every other leaf kept exact.

    ``places`` maps strings of this run (the temporary root, the namespace's
    name) to placeholders. Matching by value and by key name anywhere, not by
    an event's layout, keeps this valid when the envelope's keys change.
    """
    if isinstance(value, dict):
        return {name: normalised(item, places, name) for name, item in value.items()}
    if isinstance(value, list):
        return [normalised(item, places) for item in value]
    if isinstance(value, str):
        for real, placeholder in places.items():
            value = value.replace(real, placeholder)
        return TIMESTAMP.sub("<time>", UUID4.sub("<uuid4>", value))
    if key in VOLATILE_NUMBERS and isinstance(value, int) and not isinstance(value, bool):
        return f"<{key}>"
    return value


def sort_key(event: dict[str, Any]) -> tuple[str, str, str]:
    data = event.get("data", {})
    return (str(data.get("cellId")), str(event.get("type")), str(data.get("probeSource")))


def write_cgroups(cgroup_root: Path) -> None:
    full = FakeCgroup(cgroup_root / "cell-full")
    full.memory_events.update(high=12, max=3, oom=1, oom_kill=1)
    full.cpu_stat.update(usage_usec=1_500_000, user_usec=1_000_000, system_usec=500_000)
    full.cpu_stat.update(nr_periods=40, nr_throttled=2, throttled_usec=7_000)
    full.pids_events["max"] = 4
    full.cpu_some_total = 123_456
    full.write()
    # as on this host: no memory or pids controller, so only cpu and io files
    partial = FakeCgroup(cgroup_root / "cell-partial")
    partial.cpu_stat.update(usage_usec=250_000, user_usec=200_000, system_usec=50_000)
    partial.write()
    for name in ("memory.events", "memory.current", "memory.peak", "memory.pressure",
                 "pids.events", "pids.current"):  # fmt: skip
        (partial.path / name).unlink()


def config_text(root: Path, netns: str) -> str:
    api, metrics = jail_paths(root / "jail", "cell-full")
    cgroups = root / "cgroup"
    head = (
        '[daemon]\ntick_seconds = 10.0\nprobe_timeout_seconds = 8.0\nhost_id = "golden-host"\n'
        f'[paths]\ncgroup_root = "{cgroups}"\njail_root = "{root / "jail"}"\n'
    )

    def cell(name: str) -> str:
        return (
            f'[[cell]]\nid = "{name}"\nrun_id = "run-{name}"\n'
            f'spec_signature_hash = "sha256:{name}"\n'
        )

    full = (
        cell("cell-full") + f'netns = "{netns}"\n'
        f'[cell.cgroup]\npath = "{cgroups / "cell-full"}"\n'
        f'[cell.tap_link]\ninterface = "{TAP}"\n'
        f'[cell.nftables]\nfamily = "inet"\ntable = "{TABLE}"\n'
        f'counters = ["{FULL.rx}", "{FULL.tx}"]\nchain = "{FULL.chain}"\n'
        f'[cell.fc_metrics]\napi_socket = "{api}"\nmetrics_path = "{metrics}"\n'
    )
    gone = cell("cell-gone") + f'[cell.cgroup]\npath = "{cgroups / "cell-gone"}"\n'
    partial = cell("cell-partial") + f'[cell.cgroup]\npath = "{cgroups / "cell-partial"}"\n'
    nocounter = (
        cell("cell-nocounter") + f'netns = "{netns}"\n'
        f'[cell.nftables]\nfamily = "inet"\ntable = "{TABLE}"\n'
        f'counters = ["{EXTRA_COUNTER}", "{ABSENT_COUNTER}"]\n'
    )
    return head + full + gone + partial + nocounter


def golden_text(events: list[dict[str, Any]]) -> str:
    return json.dumps(events, indent=2, sort_keys=True) + "\n"


async def once_on_testbed(root: Path, ns: str) -> subprocess.CompletedProcess[bytes]:
    """Build the testbed, run ``cellos-probed once`` on it; everything made is removed."""
    write_cgroups(root / "cgroup")
    spec = TableSpec("inet", TABLE, (FULL,), extra_counters=(EXTRA_COUNTER,))
    with ExitStack() as stack, trio.fail_after(60):
        netns = stack.enter_context(namespace_with_loopback(ns))
        # no IPv6: its router solicitations would move the TAP's counters by timing
        ip("netns", "exec", ns, "sysctl", "-q", "-w",
           "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")  # fmt: skip
        stack.enter_context(tap_device(TAP, ns, up=False))
        ip("link", "set", TAP, "address", TAP_ADDRESS, netns=ns)
        set_link(TAP, "up", ns)
        stack.enter_context(attached_tap(TAP, ns))
        stack.enter_context(nft_table(spec, ns))
        await trio.to_thread.run_sync(ping, ns, PINGS)
        # the kernel reports the carrier's operstate a moment later: a change
        # still pending would show as a transition in one run and not the next
        await poll_until(lambda: link_details(TAP, ns)["operstate"] == "UP")
        config = root / "cellos-probed.toml"
        config.write_text(config_text(root, netns))

        async with open_emulator(root / "jail") as emulator:
            vm = await emulator.add(emulator.spec("cell-full"))
            vm.stop_timer()  # no periodic line at a moment of its own choosing
            activity = random.Random(18)
            vm.metrics.synthetic_activity(activity, 1.0)
            vm.periodic_flush()
            vm.metrics.synthetic_activity(activity, 0.5)  # in the line of the probe's flush
            return await trio.run_process(
                [sys.executable, "-m", "cellos_probed", "once", "--config", str(config)],
                capture_stdout=True, capture_stderr=True, check=False, cwd=REPO,
            )  # fmt: skip


# not a trio test: the diff is reported by pytest itself, not inside a trio exception group
def test_once_prints_what_the_golden_file_holds(root: Path) -> None:
    ns = unique_name("gold")
    result = trio.run(once_on_testbed, root, ns)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = result.stdout.splitlines()
    for line in lines:  # the real output honours the contract before it is normalised
        check_event(line)
    places = {str(root): "<root>", ns: "<netns>"}
    events = sorted(
        (normalised(json.loads(line), places) for line in lines),
        key=sort_key,
    )
    actual = golden_text(events)
    if os.environ.get("CELLOS_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(actual)
        return
    expected = GOLDEN.read_text() if GOLDEN.exists() else ""
    if actual != expected:
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=str(GOLDEN.relative_to(REPO)),
            tofile="cellos-probed once (normalised)",
        )
        pytest.fail(
            "the output differs from the golden file (CELLOS_UPDATE_GOLDEN=1 rewrites it):\n"
            + "".join(diff),
            pytrace=False,
        )
