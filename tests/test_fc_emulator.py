"""The Firecracker emulator against the reference: what Firecracker writes and answers.

Facts from ``../shared/reference/firecracker-metrics.md`` (sections 1 to 6).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from testbed.fc_emulator import open_emulator
from testbed.fc_emulator.line_writer import MetricsLineWriter
from testbed.fc_emulator.schema import MAIN_VERSION
from tests.fc_helpers import counters_only, raw_request, short_root


@pytest.fixture
def fc_root() -> Iterator[Path]:
    yield from short_root()


KEY_ORDER = [
    "utc_timestamp_ms",
    "api_server",
    "balloon",
    "block_data",
    "block_rootfs",
    "block",
    "deprecated_api",
    "get_api_requests",
    "i8042",
    "uart",
    "latencies_us",
    "logger",
    "mmds",
    "net_eth0",
    "net_eth_1",
    "net",
    "patch_api_requests",
    "put_api_requests",
    "seccomp",
    "vcpu",
    "vmm",
    "signals",
    "vsock",
    "entropy",
    "pmem_p0",
    "pmem",
    "vhost_user_block_vu0",
    "interrupts",
    "memory_hotplug",
]
FIELD_COUNTS = {
    "api_server": 2,
    "balloon": 12,
    "block": 20,
    "deprecated_api": 1,
    "get_api_requests": 5,
    "i8042": 6,
    "uart": 7,
    "latencies_us": 10,
    "logger": 4,
    "mmds": 13,
    "patch_api_requests": 12,
    "put_api_requests": 26,
    "seccomp": 1,
    "vcpu": 10,
    "vmm": 1,
    "signals": 7,
    "vsock": 20,
    "entropy": 7,
    "pmem": 6,
    "vhost_user_block_vu0": 5,
    "interrupts": 2,
    "memory_hotplug": 18,
}
FLUSH = (
    b'PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n{"action_type":"FlushMetrics"}'
)
HEAD = b"Server: Firecracker API\r\nConnection: keep-alive\r\n"


def read_lines(fd: int) -> list[bytes]:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data.split(b"\n")


def open_reader(path: Path | None) -> int:
    assert path is not None
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


async def test_line_has_every_section_in_firecrackers_key_order(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec(
                "vm",
                nets=("eth_1", "eth0"),
                blocks=("rootfs", "data"),
                pmems=("p0",),
                vhost_user_blocks=("vu0",),
            )
            vm = await emulator.add(spec)
            fd = open_reader(spec.metrics_path)
            try:
                boot, rest = read_lines(fd)[0], read_lines(fd)
            finally:
                os.close(fd)
    assert rest == [b""]
    assert b" " not in boot  # compact: serde_json::to_writer
    line = json.loads(boot)
    assert list(line) == KEY_ORDER
    for section, count in FIELD_COUNTS.items():
        assert len(line[section]) == count, section
    # v1.16.1: mac_address_updates between cfg_fails and no_rx_avail_buffer (27 fields)
    assert list(line["net_eth0"])[:4] == [
        "activate_fails",
        "cfg_fails",
        "mac_address_updates",
        "no_rx_avail_buffer",
    ]
    assert len(line["net"]) == 27
    assert line["vcpu"]["exit_io_in_agg"] == {"min_us": 0, "max_us": 0, "sum_us": 0}
    assert list(line["put_api_requests"])[:4] == [
        "actions_count",
        "actions_fails",
        "boot_source_count",
        "boot_source_fails",
    ]
    assert vm.flushes[0][0] == "boot"


async def test_main_layout_drops_mac_address_updates(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm", version=MAIN_VERSION)
            await emulator.add(spec)
            fd = open_reader(spec.metrics_path)
            try:
                line = json.loads(read_lines(fd)[0])
            finally:
                os.close(fd)
    assert len(line["net_eth0"]) == 26
    assert "mac_address_updates" not in line["net"]


async def test_counters_are_deltas_gauges_are_stores_aggregates_sum(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm", nets=("eth0", "eth1"))
            vm = await emulator.add(spec)
            fd = open_reader(spec.metrics_path)
            try:
                read_lines(fd)
                metrics = vm.metrics
                metrics.add("net_eth0", "rx_bytes_count", 100)
                metrics.add("net_eth1", "rx_bytes_count", 23)
                metrics.observe_latency("net_eth0", "tap_write_agg", 40)
                metrics.observe_latency("net_eth0", "tap_write_agg", 10)
                metrics.set_gauge("seccomp", "num_faults", 2)
                metrics.add("signals", "sigpipe", 3)
                vm.write_metrics("test")
                vm.write_metrics("test")
                first, second = (json.loads(text) for text in read_lines(fd)[:2])
            finally:
                os.close(fd)
    assert first["net_eth0"]["rx_bytes_count"] == 100
    assert first["net"]["rx_bytes_count"] == 123
    assert first["net_eth0"]["tap_write_agg"] == {"min_us": 10, "max_us": 40, "sum_us": 50}
    assert first["net"]["tap_write_agg"] == {"min_us": 0, "max_us": 0, "sum_us": 50}
    assert first["seccomp"]["num_faults"] == 2
    assert first["signals"]["sigpipe"] == 3
    # the next flush: counters reset, stores and lifetime min/max kept
    assert second["net_eth0"]["rx_bytes_count"] == 0
    assert second["net"]["rx_bytes_count"] == 0
    assert second["net_eth0"]["tap_write_agg"] == {"min_us": 10, "max_us": 40, "sum_us": 0}
    assert second["seccomp"]["num_faults"] == 2
    assert second["signals"]["sigpipe"] == 0


async def test_a_long_running_vm_keeps_only_its_latest_flushes_on_record(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm", flush_record=3)
            vm = await emulator.add(spec)
            fd = open_reader(spec.metrics_path)
            try:
                for n in range(5):
                    vm.write_metrics(f"test-{n}")
                    read_lines(fd)
                # the boot line and the first two were let go; the totals count every line
                assert [why for why, _ in vm.flushes] == ["test-2", "test-3", "test-4"]
                assert vm.processes[-1].lines_written == 6
            finally:
                os.close(fd)


async def test_api_responses_are_byte_exact(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm-1")
            await emulator.add(spec)
            flushed = await raw_request(spec.api_socket, FLUSH)
            info = await raw_request(spec.api_socket, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            empty = await raw_request(spec.api_socket, b"PUT /actions HTTP/1.1\r\n\r\n")
            bad = b'{"action_type":"Nope"}'
            refused = await raw_request(
                spec.api_socket,
                b"PUT /actions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(bad), bad),
            )
    assert flushed == b"HTTP/1.1 204 \r\n" + HEAD + b"\r\n"
    body = b'{"id":"vm-1","state":"Running","vmm_version":"1.16.1","app_name":"Firecracker"}'
    assert info == (
        b"HTTP/1.1 200 \r\n"
        + HEAD
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    assert empty.endswith(b'\r\n\r\n{"fault_message":"Empty PUT request."}')
    assert refused.startswith(b"HTTP/1.1 400 \r\n" + HEAD + b"Content-Type: application/json")
    assert b"An error occurred when deserializing the json body of a request: " in refused


async def test_before_boot_flush_is_400_and_metrics_come_from_the_api(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm", metrics_via="api")
            vm = await emulator.add(spec)
            pre = await raw_request(spec.api_socket, FLUSH)
            body = json.dumps({"metrics_path": str(spec.metrics_path)}).encode()
            put = b"PUT /metrics HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            configured = await raw_request(spec.api_socket, put)
            again = await raw_request(spec.api_socket, put)
            assert vm.flushes == []  # no line before boot
            start = b'{"action_type":"InstanceStart"}'
            started = await raw_request(
                spec.api_socket,
                b"PUT /actions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(start), start),
            )
            after = await raw_request(spec.api_socket, put)
            fd = open_reader(spec.metrics_path)
            try:
                lines = read_lines(fd)
            finally:
                os.close(fd)
    prefix = b"HTTP/1.1 400 \r\n" + HEAD + b"Content-Type: application/json\r\n"
    message = b"The requested operation is not supported before starting the microVM."
    body = b'{"fault_message":"' + message + b'"}'
    assert pre == prefix + b"Content-Length: %d\r\n\r\n" % len(body) + body
    assert configured == b"HTTP/1.1 204 \r\n" + HEAD + b"\r\n"
    assert b"Reinitialization of metrics not allowed." in again
    assert started == b"HTTP/1.1 204 \r\n" + HEAD + b"\r\n"
    assert b"not supported after starting the microVM." in after
    assert len(lines) == 2
    assert lines[1] == b""
    boot = json.loads(lines[0])
    assert boot["put_api_requests"]["metrics_count"] == 2  # the third came after boot
    assert boot["put_api_requests"]["metrics_fails"] == 0  # parse errors only
    assert boot["put_api_requests"]["actions_count"] == 2


async def test_metrics_not_configured_flush_is_a_silent_204(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm", metrics_path=None)
            vm = await emulator.add(spec)
            assert await raw_request(spec.api_socket, FLUSH) == (
                b"HTTP/1.1 204 \r\n" + HEAD + b"\r\n"
            )
            assert vm.flushes == []


async def test_unread_fifo_fills_then_eagain_tears_a_line_and_counts_it(fc_root: Path) -> None:
    """Reference section 1: a 64 KiB pipe holds about nine lines; the next is partly written."""
    rng = random.Random(1)
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm")
            vm = await emulator.add(spec)  # the boot line is the first
            while True:
                vm.metrics.bump_everything(rng)
                outcome = vm.periodic_flush()
                assert outcome is not None
                if not outcome.written:
                    break
            assert outcome.error == "serde"  # mid-line: serialisation stopped there
            fitted = vm.metrics.lines_written
            assert fitted in (9, 10)
            assert vm.metrics.current[("logger", "missed_metrics_count", None)] == 1
            vm.metrics.bump_everything(rng)
            api = vm.write_metrics("api")
            assert api is not None
            assert api.detail == "Resource temporarily unavailable (os error 11)"
            # the API path reports the failure (400) but does not count a missed line
            assert vm.metrics.current[("logger", "missed_metrics_count", None)] == 1
            fd = open_reader(spec.metrics_path)
            try:
                lines = read_lines(fd)
                whole, prefix = lines[:-1], lines[-1]
                vm.write_metrics("after")
                torn = prefix + read_lines(fd)[0]
            finally:
                os.close(fd)
    assert len(whole) == fitted
    assert sum(len(line) + 1 for line in whole) + len(prefix) <= 64 * 1024
    assert prefix.startswith(b'{"utc_timestamp_ms":')
    start = torn.rfind(b'{"utc_timestamp_ms":')
    assert start > 0
    recovered = json.loads(torn[start:])
    assert recovered["logger"]["missed_metrics_count"] == 1
    # every counter: what happened = what whole lines carried + what torn ones lost
    true, emitted, lost = vm.true_counts(), vm.emitted_totals(), vm.lost_totals()
    assert counters_only(true) == {
        leaf: value + counters_only(lost)[leaf] for leaf, value in counters_only(emitted).items()
    }
    assert counters_only(lost) != dict.fromkeys(counters_only(lost), 0)


async def test_injected_full_pipe_fails_the_flush_with_firecrackers_400(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm")
            vm = await emulator.add(spec)
            fd = open_reader(spec.metrics_path)
            try:
                read_lines(fd)
                vm.inject_full_pipe(after_writes=2)
                refused = await raw_request(spec.api_socket, FLUSH)
                assert await raw_request(spec.api_socket, FLUSH) == (
                    b"HTTP/1.1 204 \r\n" + HEAD + b"\r\n"
                )
                lines = read_lines(fd)
            finally:
                os.close(fd)
    message = b"Internal VMM error: Metrics error: Resource temporarily unavailable (os error 11)"
    assert refused.endswith(b'{"fault_message":"' + message + b'"}')
    assert len(lines) == 2
    assert lines[1] == b""
    assert lines[0].count(b'{"utc_timestamp_ms":') == 2  # prefix of the lost line, then the next
    # the API path does not count a missed line
    assert json.loads(lines[0][lines[0].rfind(b'{"utc') :])["logger"]["missed_metrics_count"] == 0


def test_line_writer_writes_at_most_one_kib_per_call(tmp_path: Path) -> None:
    path = tmp_path / "m.ndjson"
    writer = MetricsLineWriter(str(path))
    line = json.dumps({"utc_timestamp_ms": 1, "x": {f"k{i}": i for i in range(600)}})
    compact = line.replace(" ", "").encode()
    try:
        outcome = writer.write_line(compact)
        assert outcome.written
        assert writer.writes == -(-(len(compact) + 1) // 1024)  # full chunks, newline in the last
    finally:
        writer.close()
    assert path.read_bytes() == compact + b"\n"


async def test_exit_line_on_clean_stop_none_on_kill_and_restart_starts_over(
    fc_root: Path,
) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm")
            vm = await emulator.add(spec)
            fd = open_reader(spec.metrics_path)
            try:
                vm.metrics.add("vcpu", "exit_io_in", 5)
                await vm.stop(clean=True)
                assert [why for why, _ in vm.flushes] == ["boot", "exit"]
                # a stale socket: Firecracker does not unlink it
                assert spec.api_socket.exists()
                await emulator.restart(vm, clean=False, new_id="vm-b")
                vm.metrics.add("vcpu", "exit_io_in", 2)
                await vm.stop(clean=False)
                lines = [json.loads(text) for text in read_lines(fd) if text]
            finally:
                os.close(fd)
    assert [line["vcpu"]["exit_io_in"] for line in lines] == [0, 5, 0]  # boot, exit, boot
    assert vm.instance_id == "vm-b"
    assert vm.true_counts()["vcpu"]["exit_io_in"] == 7
    assert vm.emitted_totals()["vcpu"]["exit_io_in"] == 5
