"""Issue 17, emulator: ``PUT /metrics`` as Firecracker main parses it, micro-http's full server.

Sources: firecracker ``src/vmm/src/vmm_config/metrics.rs`` (``MetricsConfig``:
``emit_id``, ``properties``, unknown keys ignored), ``src/vmm/src/logger/metrics.rs``
(``InstanceIdField``, ``MetricsProperties``: flattened after ``utc_timestamp_ms``),
``src/firecracker/src/api_server/request/metrics.rs`` (``metrics_fails`` on a
parse error only) and micro-http ``src/server.rs`` (``SERVER_FULL_ERROR_MESSAGE``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from testbed.fc_emulator import EmulatedVm, open_emulator
from testbed.fc_emulator.schema import MAIN_VERSION, RELEASE_VERSION
from tests.fc_helpers import raw_request, short_root

NO_CONTENT = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n"
START = b'{"action_type":"InstanceStart"}'
FLUSH = b'{"action_type":"FlushMetrics"}'


@pytest.fixture
def fc_root() -> Iterator[Path]:
    yield from short_root()


def put(path: str, body: bytes) -> bytes:
    return b"PUT %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)


def metrics_body(vm: EmulatedVm, **extra: Any) -> bytes:
    return json.dumps({"metrics_path": str(vm.spec.metrics_path), **extra}).encode()


def read_all(path: Path | None) -> list[bytes]:
    assert path is not None
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        data = os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    return data.split(b"\n")[:-1]


PROPERTIES = {"customer_id": "1234", "bundle_id": "fn-abc", "note": 'a "b"\n\x01'}


async def test_main_writes_id_then_properties_after_the_timestamp(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm-1", version=MAIN_VERSION, metrics_via="api")
            vm = await emulator.add(spec)
            body = metrics_body(vm, emit_id=True, properties=PROPERTIES, future_key=[1])
            configured = await raw_request(spec.api_socket, put("/metrics", body))
            await raw_request(spec.api_socket, put("/actions", START))
            (boot,) = read_all(spec.metrics_path)
    assert configured == NO_CONTENT  # an unknown key is ignored
    stamp = json.loads(boot)["utc_timestamp_ms"]
    # BTreeMap: properties sorted by key; serde_json's escapes; compact
    assert boot.startswith(
        b'{"utc_timestamp_ms":%d,"id":"vm-1","properties":{"bundle_id":"fn-abc",'
        b'"customer_id":"1234","note":"a \\"b\\"\\n\\u0001"},"api_server":{' % stamp
    )


async def test_release_ignores_emit_id_and_properties_as_unknown_keys(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm-1", version=RELEASE_VERSION, metrics_via="api")
            vm = await emulator.add(spec)
            body = metrics_body(vm, emit_id="not even a bool", properties=PROPERTIES)
            configured = await raw_request(spec.api_socket, put("/metrics", body))
            await raw_request(spec.api_socket, put("/actions", START))
            (boot,) = read_all(spec.metrics_path)
    assert configured == NO_CONTENT
    line = json.loads(boot)
    assert list(line)[:2] == ["utc_timestamp_ms", "api_server"]
    assert line["put_api_requests"]["metrics_fails"] == 0


@pytest.mark.parametrize(
    ("extra", "detail"),
    [
        ({"emit_id": "yes"}, b'invalid type: string \\"yes\\", expected a boolean'),
        ({"properties": {"a": 1}}, b"invalid type: integer `1`, expected a string"),
        ({"properties": ["a"]}, b"invalid type: sequence, expected a map"),
    ],
)
async def test_main_refuses_mistyped_emit_id_or_properties(
    fc_root: Path, extra: dict[str, Any], detail: bytes
) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm-1", version=MAIN_VERSION, metrics_via="api")
            vm = await emulator.add(spec)
            refused = await raw_request(spec.api_socket, put("/metrics", metrics_body(vm, **extra)))
            assert vm.writer is None
    assert refused.startswith(b"HTTP/1.1 400 \r\n")
    prefix = b"An error occurred when deserializing the json body of a request: "
    assert prefix + detail in refused


async def test_metrics_fails_counts_parse_errors_only(fc_root: Path) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm-1", metrics_via="api")
            vm = await emulator.add(spec)
            sock, good = spec.api_socket, metrics_body(vm)
            missing = await raw_request(sock, put("/metrics", b'{"path": "x"}'))
            assert await raw_request(sock, put("/metrics", good)) == NO_CONTENT
            again = await raw_request(sock, put("/metrics", good))
            await raw_request(sock, put("/actions", START))
            late = await raw_request(sock, put("/metrics", good))
            await raw_request(sock, put("/actions", FLUSH))
            boot, flushed = (json.loads(line) for line in read_all(spec.metrics_path))
    assert b"missing field `metrics_path`" in missing
    assert b"Reinitialization of metrics not allowed." in again
    assert b"not supported after starting the microVM." in late
    assert boot["put_api_requests"]["metrics_count"] == 3
    assert boot["put_api_requests"]["metrics_fails"] == 1  # the missing field only
    assert flushed["put_api_requests"]["metrics_count"] == 1
    assert flushed["put_api_requests"]["metrics_fails"] == 0


async def test_a_config_file_metrics_block_sets_id_and_properties_from_the_start(
    fc_root: Path,
) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec(
                "vm-1",
                version=MAIN_VERSION,
                metrics_via="config",
                emit_id=True,
                properties={"cell": "c-1"},
            )
            vm = await emulator.add(spec)
            assert spec.metrics_path is not None
            fd = os.open(spec.metrics_path, os.O_RDONLY | os.O_NONBLOCK)  # the FIFO kept alive
            try:
                await emulator.restart(vm, new_id="vm-1-b")
                lines = os.read(fd, 1 << 20).split(b"\n")[:-1]
            finally:
                os.close(fd)
            boot, exit_line, reboot = (json.loads(line) for line in lines)
    assert [line["id"] for line in (boot, exit_line, reboot)] == ["vm-1", "vm-1", "vm-1-b"]
    assert all(line["properties"] == {"cell": "c-1"} for line in (boot, exit_line, reboot))


SERVER_FULL = (
    b"HTTP/1.1 503\r\nServer: Firecracker API\r\nConnection: close\r\n"
    b'Content-Length: 40\r\n\r\n{ "error": "Too many open connections" }'
)


async def test_an_eleventh_connection_is_told_the_server_is_full_then_closed(
    fc_root: Path,
) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm-1")
            await emulator.add(spec)
            held = []
            try:
                for _ in range(10):
                    stream = await trio.open_unix_socket(str(spec.api_socket))
                    held.append(stream)
                    await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
                    assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 \r\n")
                eleventh = await trio.open_unix_socket(str(spec.api_socket))
                answer = b""
                async with eleventh:
                    while chunk := await eleventh.receive_some(65536):
                        answer += chunk
            finally:
                for stream in held:
                    await stream.aclose()
    assert answer == SERVER_FULL
    assert len(SERVER_FULL) == 120  # micro-http's own test reads exactly 120 bytes
