"""`make bench`: the daemon at N cells from real kernel objects, against the floor and a peer.

For each N it builds N cells (a TAP each in one network namespace, two named
nftables counters each in one table there, a real cgroup each under the
cgroup2 mount, an emulated Firecracker VM each when the emulator is
available), starts a nats-server and a subscriber, runs `cellos-probed run`
(with the systemd unit's GLIBC_TUNABLES, as installed: testbed/unit_env.py)
for a fixed number of ticks, removes everything, and reports:

- per tick: duration p50/p99/max (the daemon's own `agent` figures), overruns;
- the daemon's CPU seconds per tick (from /proc/<pid>/stat), peak RSS, RSS growth;
- events per second delivered to the subscriber, and how many were lost;
- the floor (bench/floor.py: the same kernel reads by the simplest loop), run
  for 10 ticks before the daemon and 10 after (the mean is the floor: the
  machine's speed drifts), and the ratio of the daemon's CPU to it; beside it
  the floor had it kept its cgroup files open and read them with one pread
  each, as the daemon does on cgroup2 (the floor itself opens them, as the
  issue defines it), and the daemon's ratio to that;
- a peer: node_exporter's netclass collector scraping the same TAPs, its CPU
  per scrape next to our tap_link cost per tick;
- bytes: per kind of event (the subject's token after the prefix: each probe,
  agent, probe_error, gap) and for the host, the bytes per tick on the wire
  (each message's HPUB frame as the daemon sends it: see bench/subscriber.py)
  and in payloads, and the median and p99 event (payload) size.

Results: bench/results/<name>.json, bench/results/<name>.md, bench/results/<name>.png.
Usage: python bench/bench_daemon.py [--n 100,500,1000,2000] [--ticks 30] [--soak SECONDS]
Environment: BENCH_N, BENCH_TICKS, BENCH_NAME, BENCH_SHARDS, BENCH_TIMEOUT, BENCH_PROFILE,
BENCH_FC_TOTALS_EVERY (``--fc-totals-every``: ``[probes.fc_metrics] totals_every`` in the
bench's config; unset, the daemon's default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cellos_probed.cgroupfs import find_cgroup2_mount  # noqa: E402
from cellos_probed.netns import NamespaceThread, NetnsPath  # noqa: E402
from testbed.taps import ip, many_taps, network_namespace  # noqa: E402
from testbed.unit_env import environment_like_the_unit  # noqa: E402
from tests.conftest import start_nats_server  # noqa: E402

PREFIX = "dev.cellos.events.cell.observability.host.v1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
VENV_BIN = Path(sys.executable).parent
#: the daemon's probe_timeout_seconds in the bench (BENCH_TIMEOUT to explore)
PROBE_TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", "0.5"))


#: start-up (imports, first connections, buffers reaching their working size) is not measured
WARM_UP_SECONDS = 6.0
#: a soak waits longer: RSS growth is judged on the working set, not on reaching it.
#: Every emulated VMM's own 60 s metrics timer fires once in the first minute
#: (all together: they started together), the daemon's first two-line readings:
#: the working set is reached only after that (RSS stepped +11 MiB there, flat after)
SOAK_WARM_UP_SECONDS = 90.0
SOAK_WARM_UP_AFTER_TICKS = 120
#: RSS growth compares the median of the first and of the last window of samples
#: (one a second): a single sample lands anywhere in the allocator's trim cycle
GROWTH_WINDOW_SAMPLES = 60


def percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def histogram_percentile(counts: dict[int, int], fraction: float) -> int:
    """:func:`percentile` of the values a ``{value: count}`` histogram holds."""
    total = sum(counts.values())
    rank = min(total - 1, int(fraction * total))
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen > rank:
            return value
    raise ValueError("an empty histogram has no percentile")


def bytes_per_tick(volume: list[dict[str, dict[str, Any]]], ticks: float) -> dict[str, Any]:
    """The subscriber's sizes of the measured ticks (``volume``: theirs, each by kind),
    per tick: ``ticks`` of them (with shards, the entries over the processes)."""
    wire: dict[str, int] = {}
    sizes: dict[str, dict[int, int]] = {}
    for kinds in volume:
        for kind, tally in kinds.items():
            wire[kind] = wire.get(kind, 0) + tally["wire"]
            histogram = sizes.setdefault(kind, {})
            for size, count in tally["sizes"].items():
                histogram[int(size)] = histogram.get(int(size), 0) + count
    by_kind = {
        kind: {
            "events_per_tick": sum(histogram.values()) / ticks,
            "wire_bytes_per_tick": wire[kind] / ticks,
            "payload_bytes_per_tick": sum(s * c for s, c in histogram.items()) / ticks,
            "event_bytes_p50": histogram_percentile(histogram, 0.50),
            "event_bytes_p99": histogram_percentile(histogram, 0.99),
        }
        for kind, histogram in sorted(sizes.items())
    }
    return {
        "ticks": ticks,
        "wire_bytes_per_tick": sum(k["wire_bytes_per_tick"] for k in by_kind.values()),
        "payload_bytes_per_tick": sum(k["payload_bytes_per_tick"] for k in by_kind.values()),
        "by_kind": by_kind,
    }


def rss_growth_pct(samples: list[int]) -> float:
    """Growth from the first window's median to the last window's, in percent."""
    window = max(1, min(GROWTH_WINDOW_SAMPLES, len(samples) // 4))
    first = statistics.median(samples[:window])
    last = statistics.median(samples[-window:])
    return 100.0 * (last - first) / max(1.0, first)


def stamp_seconds(stamp: str) -> float:
    """An event's RFC 3339 UTC stamp (``...Z``) as seconds since the epoch."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@contextmanager
def real_cgroups(n: int) -> Iterator[tuple[Path, list[str]]]:
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 mount"
    parent = mount / f"cellos-bench-{os.getpid()}"
    parent.mkdir()
    names = [f"c{i}" for i in range(n)]
    try:
        for name in names:
            (parent / name).mkdir()
        yield parent, names
    finally:
        for name in names:
            try:
                (parent / name).rmdir()
            except OSError:
                pass
        parent.rmdir()


@contextmanager
def nft_table(netns: str, family: str, table: str, cells: int) -> Iterator[None]:
    lines = [f"table {family} {table} {{"]
    for i in range(cells):
        lines += [f"  counter c{i}-rx {{ }}", f"  counter c{i}-tx {{ }}"]
    lines.append("}")
    script = Path(tempfile.mkstemp(suffix=".nft")[1])
    script.write_text("\n".join(lines) + "\n")
    try:
        subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", str(script)], check=True)
        yield
    finally:
        script.unlink()
        subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "delete", "table", family, table], check=False
        )


def fc_emulator_available() -> bool:
    try:
        import testbed.fc_emulator as emulator
    except ImportError:
        return False
    return hasattr(emulator, "emulator_process")


@contextmanager
def emulated_vms(workdir: Path, n: int) -> Iterator[list[dict[str, str]] | None]:
    """N emulated VMs from the Firecracker emulator, if this tree has one."""
    if not fc_emulator_available():
        yield None
        return
    from testbed.fc_emulator import emulator_process

    # one emulator process per 250 VMs: see emulator_process
    with emulator_process(workdir / "jail", n, processes=max(1, n // 250)) as vms:
        yield vms


def write_config(
    path: Path, n: int, *, cgroup_parent: Path, netns: Path, taps: list[str],
    vms: list[dict[str, str]] | None, jail: Path, nats_url: str, ticks: int,
    fc_totals_every: int | None,
) -> None:  # fmt: skip
    text = (
        f"[daemon]\ntick_seconds = 1.0\nprobe_timeout_seconds = {PROBE_TIMEOUT}\n"
        # every tick: each agent event names its tick's duration, so the
        # figures cover exactly the measured ticks (not start-up's)
        f"agent_event_every_ticks = 1\ndrain_timeout_seconds = 10\n"
        f'[paths]\ncgroup_root = "{cgroup_parent}"\njail_root = "{jail}"\n'
        f'[nats]\nservers = ["{nats_url}"]\n'
    )
    if fc_totals_every is not None:
        text += f"[probes.fc_metrics]\ntotals_every = {fc_totals_every}\n"
    for i in range(n):
        text += (
            f'[[cell]]\nid = "c{i}"\nrun_id = "bench"\nspec_signature_hash = "sha256:bench"\n'
            f'netns = "{netns}"\n'
            f'[cell.cgroup]\npath = "c{i}"\n'
            f'[cell.tap_link]\ninterface = "{taps[i]}"\n'
            f'[cell.nftables]\nfamily = "inet"\ntable = "cellosbench"\n'
            f'counters = ["c{i}-rx", "c{i}-tx"]\n'
        )
        if vms is not None:
            text += (
                f'[cell.fc_metrics]\napi_socket = "{vms[i]["api_socket"]}"\n'
                f'metrics_path = "{vms[i]["metrics_path"]}"\n'
            )
    path.write_text(text)


def supported_probes() -> set[str]:
    from cellos_probed.config import BUILT_PROBES

    return set(BUILT_PROBES)


def strip_unbuilt(config: Path, keep: set[str] | None = None) -> None:
    """Drop the probe tables of probes this tree has not built yet (so the bench runs),
    and, with ``keep``, of every probe not in it."""
    built = supported_probes() if keep is None else supported_probes() & keep
    out, skip = [], False
    for line in config.read_text().splitlines():
        if line.startswith("[cell."):
            skip = line.strip("[]").split(".", 1)[1] not in built
        elif line.startswith("["):
            skip = False
        if not skip:
            out.append(line)
    config.write_text("\n".join(out) + "\n")


def shards_for(n: int) -> int:
    """Daemon processes for N cells (``run --shard``): BENCH_SHARDS, else one.

    On this 2-core machine the emulator, nats-server and the subscriber take
    most of a core already. Two shards at N=1000 shortened the tick (p99
    365 ms against ~490) for the same CPU, at the cost of a second
    interpreter's memory (233 MiB for both); at N=2000 they cut the probe
    timeouts by two thirds, and the machine itself is then saturated
    (bench/results/shards.md).
    """
    return int(os.environ.get("BENCH_SHARDS", "1"))


def run_daemon(
    config: Path, workdir: Path, ticks: int, nats_url: str, shards: int = 1
) -> dict[str, Any]:
    sub_out = workdir / "subscriber.json"
    subscriber = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "subscriber.py"), nats_url, PREFIX, str(sub_out)]
    )
    while not Path(str(sub_out) + ".ready").exists():
        time.sleep(0.05)
    logs = [(workdir / f"daemon-{index}.log").open("wb") for index in range(shards)]
    command = [str(VENV_BIN / "cellos-probed"), "run", "--config", str(config)]
    env = environment_like_the_unit()
    daemons = [
        subprocess.Popen(command + (["--shard", f"{index}/{shards}"] if shards > 1 else []),
                         stderr=logs[index], env=env)
        for index in range(shards)
    ]  # fmt: skip

    def cpu() -> float:
        return sum(cpu_seconds(daemon.pid) for daemon in daemons)

    def rss(key: str = "VmRSS") -> int:
        return sum(rss_kib(daemon.pid, key) for daemon in daemons)

    # warm up: start-up, imports, first dumps, buffers at their working size;
    # then measure whole ticks
    time.sleep(WARM_UP_SECONDS if ticks < SOAK_WARM_UP_AFTER_TICKS else SOAK_WARM_UP_SECONDS)
    cpu0, t0, wall0 = cpu(), time.monotonic(), time.time()
    rss_start = rss()
    profile = os.environ.get("BENCH_PROFILE")  # where the time goes: py-spy, GIL holder only
    if profile and shutil.which("py-spy", path=str(VENV_BIN)):
        subprocess.Popen(
            [str(VENV_BIN / "py-spy"), "record", "-p", str(daemons[0].pid), "-d", str(ticks),
             "-f", "raw", "-o", profile, "--gil", "-r", "200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    rss_samples = []
    for _ in range(ticks):
        time.sleep(1.0)
        rss_samples.append(rss())
        for index, daemon in enumerate(daemons):
            if daemon.poll() is not None:
                text = (workdir / f"daemon-{index}.log").read_text()[-2000:]
                raise RuntimeError(f"daemon exited: {text}")
    cpu1, t1 = cpu(), time.monotonic()
    peak = sum(rss_kib(daemon.pid, "VmHWM") for daemon in daemons)
    # bytes are counted over `ticks` whole ticks from the warm-up's end: one more ends them
    time.sleep(1.0)
    for daemon in daemons:
        daemon.send_signal(signal.SIGTERM)
    for daemon in daemons:
        daemon.wait(30)
    for log in logs:
        log.close()
    time.sleep(1.0)
    subscriber.send_signal(signal.SIGTERM)
    subscriber.wait(30)
    sub = json.loads(sub_out.read_text())
    produced = errors = 0
    for index in range(shards):
        entries = [
            json.loads(x)
            for x in (workdir / f"daemon-{index}.log").read_text().splitlines()
            if x.startswith("{")
        ]
        stopped = next(e for e in entries if e.get("event") == "stopped")
        produced += stopped["readings"] + stopped["probe_errors"]
        errors += stopped["probe_errors"]
    # the last agent figures of each process (overruns), and every measured
    # tick's duration: those whose agent event was stamped after the warm-up
    last: dict[str, dict[str, Any]] = {}
    durations: list[float] = []
    for figures in sub["agent"]:
        last[figures.get("shard", "0/1")] = figures
        if stamp_seconds(figures["hostReceivedAt"]) >= wall0:
            durations.append(figures["lastTickDurationMs"])
    ordered = sorted(durations)
    # the bytes of the first `ticks` measured ticks of each process: an agent event
    # ends its tick's messages (the subscriber's volume[i] ends with agent[i])
    measured = [
        index
        for index, figures in enumerate(sub["agent"])
        if stamp_seconds(figures["hostReceivedAt"]) >= wall0
    ][: ticks * shards]
    elapsed_ticks = (t1 - t0) / 1.0
    return {
        "processes": shards,
        "cpu_seconds_per_tick": (cpu1 - cpu0) / elapsed_ticks,
        "rss_start_mib": rss_start / 1024,
        "rss_end_mib": rss_samples[-1] / 1024,
        "rss_peak_mib": peak / 1024,
        "rss_growth_pct": rss_growth_pct(rss_samples),
        # one sample a second: flat, still rising or a plateau reads at a glance
        "rss_samples_mib": [round(sample / 1024, 1) for sample in rss_samples],
        # with shards, each process's ticks count: the slow shard's ticks are in the tail
        "tick_ms": {
            "p50": percentile(ordered, 0.50),
            "p99": percentile(ordered, 0.99),
            "max": ordered[-1] if ordered else 0.0,
        },
        "ticks_measured": len(durations),
        # in order: a slow tick every tenth (say) shows as a pattern here
        "tick_samples_ms": [round(duration, 1) for duration in durations],
        "overruns": sum(figures.get("tickOverruns") or 0 for figures in last.values()),
        "produced": produced,
        "delivered": sub["received"],
        "lost": produced - sub["received"],
        "undeclared_holes": sub["undeclared"],
        "duplicates": sub["duplicates"],
        "events_per_second": sub["received"] / max(1e-9, sub["last_at"] - sub["first_at"]),
        "probe_errors": errors,
        "probe_errors_by_probe": sub.get("probe_errors", {}),
        #: by the cell's tick (its sequence, 1 = the first): at start-up only, or all along
        "probe_errors_by_tick": sub.get("probe_error_ticks", {}),
        "bytes": bytes_per_tick([sub["volume"][i] for i in measured], len(measured) / shards),
    }


def run_probe_alone(config: Path, probe: str, workdir: Path, ticks: int) -> dict[str, Any]:
    """The daemon with only ``probe`` for the same cells: that probe's own CPU per tick.

    The peer column's other half: node_exporter's CPU per scrape of the TAPs
    next to what our ``tap_link`` probe costs a tick on its own.
    """
    alone = workdir / f"{probe}-alone.toml"
    alone.write_text(config.read_text())
    strip_unbuilt(alone, keep={probe})
    with (workdir / f"{probe}-alone.log").open("wb") as log:
        daemon = subprocess.Popen(
            [str(VENV_BIN / "cellos-probed"), "run", "--config", str(alone)],
            stderr=log,
            env=environment_like_the_unit(),
        )
        try:
            time.sleep(WARM_UP_SECONDS)
            cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(ticks)
            cpu1, t1 = cpu_seconds(daemon.pid), time.monotonic()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
    return {"probe": probe, "ticks": ticks, "cpu_seconds_per_tick": (cpu1 - cpu0) / (t1 - t0)}


#: ticks of each floor run (one before the daemon, one after)
FLOOR_TICKS = 10


def mean_floor(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The floor runs' mean, each run kept beside it (``runs``)."""
    parts = runs[0]["parts_cpu_seconds_per_tick"]
    total = statistics.mean(r["cpu_seconds_per_tick"] for r in runs)
    mean_parts = {
        part: statistics.mean(r["parts_cpu_seconds_per_tick"][part] for r in runs) for part in parts
    }
    kept = statistics.mean(r["cgroup_kept_descriptors_cpu_seconds_per_tick"] for r in runs)
    return {
        "cpu_seconds_per_tick": total,
        "parts_cpu_seconds_per_tick": mean_parts,
        # the floor had it kept its cgroup files open as the daemon does on cgroup2
        "kept_cgroup_files": {
            "cgroup_cpu_seconds_per_tick": kept,
            "cpu_seconds_per_tick": total - mean_parts["cgroup"] + kept,
        },
        "runs": runs,
    }


def run_floor(workdir: Path, spec: dict[str, Any], ticks: int) -> dict[str, Any]:
    path = workdir / "floor.json"
    path.write_text(json.dumps({**spec, "ticks": ticks, "tick_seconds": 1.0}))
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "floor.py"), str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(json.loads(result.stdout))


def run_node_exporter(netns_name: str, netns: Path, scrapes: int) -> dict[str, Any] | None:
    binary = shutil.which("prometheus-node-exporter")
    if binary is None:
        return None
    ip("link", "set", "lo", "up", netns=netns_name)
    port = 19100
    exporter = subprocess.Popen(
        ["ip", "netns", "exec", netns_name, binary, "--collector.disable-defaults",
         "--collector.netclass", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    scraper = NamespaceThread(NetnsPath(netns.parent, netns))
    scraper.start()

    def scrape() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            return len(reply.read())

    import trio

    async def scrape_all() -> dict[str, Any]:
        for _ in range(50):  # wait until it listens
            try:
                await scraper.run(scrape)
                break
            except OSError:
                await trio.sleep(0.1)
        pid = exporter.pid
        # ip netns exec execs the exporter in place: the pid is the exporter's
        cpu0 = cpu_seconds(pid)
        size = 0
        for _ in range(scrapes):
            size = await scraper.run(scrape)
        return {
            "cpu_seconds_per_scrape": (cpu_seconds(pid) - cpu0) / scrapes,
            "metrics_bytes": size,
        }

    try:
        return trio.run(scrape_all)
    finally:
        scraper.stop()
        exporter.send_signal(signal.SIGTERM)
        exporter.wait(10)


def bench_one(n: int, ticks: int, fc_totals_every: int | None) -> dict[str, Any]:
    say(f"N={n}: building {n} cells")
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cellos-bench-")))
        netns_name = f"cellosbench{os.getpid()}"
        netns = stack.enter_context(network_namespace(netns_name))
        taps = stack.enter_context(
            many_taps(netns_name, [f"bt{os.getpid() % 10000}x{i}" for i in range(n)])
        )
        stack.enter_context(nft_table(netns_name, "inet", "cellosbench", n))
        cgroup_parent, cgroups = stack.enter_context(real_cgroups(n))
        vms = stack.enter_context(emulated_vms(workdir, n))
        server = start_nats_server(workdir / "nats")
        stack.callback(server.stop)
        config = workdir / "bench.toml"
        write_config(config, n, cgroup_parent=cgroup_parent, netns=netns, taps=taps, vms=vms,
                     jail=workdir / "jail", nats_url=server.url, ticks=ticks,
                     fc_totals_every=fc_totals_every)  # fmt: skip
        strip_unbuilt(config)
        probes = sorted(supported_probes() & {"cgroup", "tap_link", "nftables", "fc_metrics"})
        if vms is None:
            probes = [p for p in probes if p != "fc_metrics"]
        floor_spec = {
            "cgroup_dirs": [str(cgroup_parent / c) for c in cgroups],
            "netns": str(netns),
            "nft": {"family": "inet", "table": "cellosbench"} if "nftables" in probes else None,
            "vms": [
                {key: str(workdir / "jail" / vm[key]) for key in ("api_socket", "metrics_path")}
                for vm in (vms or [])
            ] if "fc_metrics" in probes else [],
        }  # fmt: skip
        # the floor before and after the daemon: this shared machine's speed drifts,
        # and the mean of the two brackets the daemon's run
        say(f"N={n}: floor (before)")
        floor_before = run_floor(workdir, floor_spec, FLOOR_TICKS)
        say(f"N={n}: daemon for {ticks} ticks with probes {', '.join(probes)}")
        emulator_pids = [int(pid) for pid in vms[0]["emulator_pids"].split(",")] if vms else []
        emulator_cpu0 = sum(cpu_seconds(pid) for pid in emulator_pids)
        started = time.monotonic()
        shards = shards_for(n)
        say(f"N={n}: {shards} daemon process(es)")
        daemon = run_daemon(config, workdir, ticks, server.url, shards)
        emulator_cpu = (
            (sum(cpu_seconds(pid) for pid in emulator_pids) - emulator_cpu0)
            / (time.monotonic() - started)
            if emulator_pids
            else None
        )
        say(f"N={n}: floor (after)")
        floor = mean_floor([floor_before, run_floor(workdir, floor_spec, FLOOR_TICKS)])
        say(f"N={n}: node_exporter, and tap_link alone")
        peer = run_node_exporter(netns_name, netns, 5)
        tap_alone = run_probe_alone(config, "tap_link", workdir, 10)
    return {
        "n": n,
        "ticks": ticks,
        "probes": probes,
        # [probes.fc_metrics] totals_every; None: the daemon's default
        "fc_totals_every": fc_totals_every,
        "daemon": daemon,
        "floor": floor,
        "ratio_to_floor": daemon["cpu_seconds_per_tick"] / max(1e-9, floor["cpu_seconds_per_tick"]),
        "ratio_to_floor_kept_cgroup_files": daemon["cpu_seconds_per_tick"]
        / max(1e-9, floor["kept_cgroup_files"]["cpu_seconds_per_tick"]),
        "node_exporter": peer,
        "tap_link_alone": tap_alone,
        "emulator_cpu_seconds_per_second": emulator_cpu,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    head = (
        "| N | daemon processes | probes | tick p50 / p99 / max ms | overruns | daemon CPU s/tick "
        "| floor CPU s/tick | ratio | floor keeping cgroup files open: CPU s/tick, ratio "
        "| peak RSS MiB | RSS growth | events/s | lost | probe errors "
        "| node_exporter CPU s/scrape | our tap_link alone CPU s/tick |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        d, tick = r["daemon"], r["daemon"]["tick_ms"]
        peer = r["node_exporter"]
        peer_text = f"{peer['cpu_seconds_per_scrape']:.3f}" if peer else "n/a"
        alone = r.get("tap_link_alone")
        alone_text = f"{alone['cpu_seconds_per_tick']:.3f}" if alone else "n/a"
        kept = r["floor"].get("kept_cgroup_files")
        kept_text = (
            f"{kept['cpu_seconds_per_tick']:.3f}, {r['ratio_to_floor_kept_cgroup_files']:.1f}x"
            if kept
            else "n/a"
        )
        rows.append(
            f"| {r['n']} | {d.get('processes', 1)} | {'+'.join(r['probes'])} | "
            f"{tick.get('p50', 0):.0f} / "
            f"{tick.get('p99', 0):.0f} / {tick.get('max', 0):.0f} | {d['overruns']} | "
            f"{d['cpu_seconds_per_tick']:.3f} | {r['floor']['cpu_seconds_per_tick']:.3f} | "
            f"{r['ratio_to_floor']:.1f}x | {kept_text} | "
            f"{d['rss_peak_mib']:.0f} | {d['rss_growth_pct']:+.1f}% | "
            f"{d['events_per_second']:.0f} | {d['lost']} | {d['probe_errors']} | {peer_text} | "
            f"{alone_text} |"
        )
    return head + "\n".join(rows) + "\n"


#: the kinds with columns of their own in the bytes table; the others (agent,
#: probe_error, gap) are summed in one
BYTES_COLUMNS = ("fc_metrics", "cgroup", "tap_link", "nftables")


def bytes_markdown(results: list[dict[str, Any]]) -> str:
    """Bytes per tick (KB = 1,000 bytes) on the wire by kind and for the host, and
    each probe's median and p99 event size."""
    head = (
        "| N | fc_metrics totals_every | host KB/tick on the wire | "
        + " | ".join(f"{kind} KB/tick | {kind} event p50 / p99 B" for kind in BYTES_COLUMNS)
        + " | other kinds KB/tick |\n"
        + "|---" * (4 + 2 * len(BYTES_COLUMNS))
        + "|\n"
    )
    rows = []
    for r in results:
        figures = r["daemon"]["bytes"]
        cells = [
            str(r["n"]),
            "default" if r["fc_totals_every"] is None else str(r["fc_totals_every"]),
            f"{figures['wire_bytes_per_tick'] / 1000:,.1f}",
        ]
        other = figures["wire_bytes_per_tick"]
        for kind in BYTES_COLUMNS:
            mine = figures["by_kind"].get(kind)
            if mine is None:
                cells += ["n/a", "n/a"]
                continue
            other -= mine["wire_bytes_per_tick"]
            cells += [
                f"{mine['wire_bytes_per_tick'] / 1000:,.1f}",
                f"{mine['event_bytes_p50']:,} / {mine['event_bytes_p99']:,}",
            ]
        cells.append(f"{other / 1000:,.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in (("p50", "tick p50", "o-"), ("p99", "tick p99", "s--"),
                              ("max", "tick max", "^:")):  # fmt: skip
        left.plot(ns, [r["daemon"]["tick_ms"].get(key, 0) for r in results], style, label=label)
    left.axhline(500, color="red", linestyle=":", label="target p99 (500 ms)")
    left.set(xlabel="cells (N)", ylabel="ms", title="tick duration")
    left.legend()
    right.plot(ns, [r["daemon"]["cpu_seconds_per_tick"] for r in results], "o-", label="daemon")
    floors = [r["floor"]["cpu_seconds_per_tick"] for r in results]
    right.plot(ns, floors, "s--", label="floor")
    right.plot(ns, [2 * f for f in floors], ":", color="gray", label="target (2x floor)")
    kept = [r["floor"].get("kept_cgroup_files", {}).get("cpu_seconds_per_tick") for r in results]
    if all(value is not None for value in kept):
        right.plot(ns, kept, "d-.", label="floor keeping cgroup files open")
    right.axhline(0.5, color="red", linestyle=":", label="target (0.5 core-s)")
    right.set(xlabel="cells (N)", ylabel="CPU seconds per 1 s tick", title="CPU per tick")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


#: LimitNOFILE in systemd/cellos-probed.service: the daemon's limit when installed
UNIT_OPEN_FILE_LIMIT = 524288


def give_the_units_open_file_limit() -> None:
    """Run the daemon (a child) with the open-file limit its systemd unit gives it.

    A root shell's hard limit can be lower (20,000 on this machine): at 2,000
    cells the daemon would keep fewer cgroups' files open than installed.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(hard, UNIT_OPEN_FILE_LIMIT)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except (ValueError, OSError) as exc:
        print(
            f"bench: open-file limit stays at {hard} ({exc}): at the largest N some cells'"
            " cgroup files are opened at each read instead of kept (the daemon logs it)",
            file=sys.stderr,
        )


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default=os.environ.get("BENCH_N", "100,500,1000,2000"))
    parser.add_argument("--ticks", type=int, default=int(os.environ.get("BENCH_TICKS", "30")))
    parser.add_argument("--name", default=os.environ.get("BENCH_NAME", "scale"))
    parser.add_argument(
        "--soak", type=int, default=0, help="seconds at N=1000 (RSS must stay flat)"
    )
    parser.add_argument("--soak-n", type=int, default=1000, help="cells for --soak")
    parser.add_argument(
        "--fc-totals-every",
        type=at_least_one,
        default=os.environ.get("BENCH_FC_TOTALS_EVERY"),
        help="[probes.fc_metrics] totals_every in the bench's config (default: the daemon's)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (namespaces, TAPs, nftables, cgroups)", file=sys.stderr)
        return 1
    give_the_units_open_file_limit()
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.soak:
        results = [bench_one(args.soak_n, args.soak, args.fc_totals_every)]
        name = f"{args.name}-soak" if args.soak_n == 1000 else f"{args.name}-soak-{args.soak_n}"
    else:
        results = [bench_one(int(n), args.ticks, args.fc_totals_every) for n in args.n.split(",")]
        name = args.name
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    table = markdown(results) + "\n" + bytes_markdown(results)
    (out / f"{name}.md").write_text(table)
    if len(results) > 1:
        plot(results, out / f"{name}.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
