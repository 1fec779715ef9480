"""Property tests for the nftables, Firecracker-metrics and API-answer parsers:
every input parses to the documented shape or raises the documented typed error."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellos_probed.probes import ProbeError, ProbeParseError
from cellos_probed.probes.fc_api import ApiConnection
from cellos_probed.probes.fc_exchange import run_round
from cellos_probed.probes.fc_http import FLUSH_REQUEST, ApiResponse, parse_response
from cellos_probed.probes.fc_metrics_parse import MetricsAccumulator
from cellos_probed.probes.nftables_parse import cell_view, parse_table_listing, view_output

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIXTURES = Path(__file__).parent / "fixtures" / "nftables"
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
    st.text(max_size=8),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


# --- nftables -----------------------------------------------------------------

nft_items = st.one_of(
    st.fixed_dictionaries({"counter": st.fixed_dictionaries({
        "family": st.sampled_from(["inet", "ip"]), "table": st.sampled_from(["cellos", "other"]),
        "name": st.text(min_size=1, max_size=6), "handle": json_values,
        "packets": json_values, "bytes": json_values})}),
    st.dictionaries(st.sampled_from(["table", "chain", "rule", "metainfo", "set"]), json_values,
                    min_size=1, max_size=1),
    json_values,
)  # fmt: skip


def check_listing(text: bytes) -> None:
    try:
        snapshot = parse_table_listing(text, "inet", "cellos")
    except ProbeParseError as error:
        assert error.message  # a reason, typed
        return
    for name, counter in snapshot.counters.items():
        assert isinstance(name, str)
        assert counter.packets >= 0
        assert counter.bytes >= 0
    view = cell_view(snapshot, tuple(snapshot.counters)[:2], None)
    output = view_output(view)
    assert set(output["counters"]) <= set(snapshot.counters)


@FUZZ
@given(st.lists(st.lists(nft_items, max_size=6), max_size=3))
def test_nftables_listing_of_arbitrary_documents(documents: list[list[Any]]) -> None:
    check_listing(b"\n".join(orjson.dumps({"nftables": items}) for items in documents))


@FUZZ
@given(st.binary(max_size=300))
def test_nftables_listing_of_arbitrary_bytes(data: bytes) -> None:
    check_listing(data)


@FUZZ
@given(st.data())
def test_nftables_real_output_cut_anywhere(data: st.DataObject) -> None:
    text = (FIXTURES / "list_table.json").read_bytes()
    cut = data.draw(st.integers(0, len(text)))
    check_listing(text[:cut])


# --- Firecracker metrics lines --------------------------------------------------


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=200), st.sampled_from([
    b'{"utc_timestamp_ms":1,"net_eth0":{"rx_bytes_count":5}}\n',
    b'{"utc_timestamp_ms":2,"latencies_us":{"pause_vm":7}}\n', b"\n", b"\0\0\0",
    b'{"utc_timestamp_ms":"x"}\n', b'{"utc_timestamp_ms":3,"vcpu":{"exit_io_in_agg":{"min_us":1}}}',
])), max_size=20))  # fmt: skip
def test_metrics_stream_of_arbitrary_chunks(chunks: list[bytes]) -> None:
    accumulator = MetricsAccumulator(max_line=4096)
    for chunk in chunks:
        accumulator.feed(chunk)
    reading = accumulator.take_reading()
    assert reading.lines >= 0
    assert reading.torn_lines >= reading.unparsed_lines >= 0
    assert isinstance(reading.delta, dict)
    assert isinstance(reading.totals, dict)
    assert "utc_timestamp_ms" not in reading.delta


@FUZZ
@given(json_values, json_values)
def test_metrics_lines_with_wrong_types_never_crash(first: Any, second: Any) -> None:
    accumulator = MetricsAccumulator()
    for value in (first, second):
        line = orjson.dumps({"utc_timestamp_ms": 1, "net_eth0": value, "vcpu": value}) + b"\n"
        accumulator.feed(line)
    reading = accumulator.take_reading()
    assert reading.lines == 2


def test_integers_beyond_64_bits_are_a_parse_error_or_a_torn_line() -> None:
    huge = str(2**70).encode()
    check_listing(b'{"nftables": [{"counter": {"family": "inet", "table": "cellos", "name": "a",'
                  b' "handle": 1, "packets": ' + huge + b', "bytes": 1}}]}')  # fmt: skip
    accumulator = MetricsAccumulator()
    accumulator.feed(b'{"utc_timestamp_ms":1,"vmm":{"panic_count":' + huge + b"}}\n")
    assert accumulator.take_reading().lines in (0, 1)


def test_a_huge_line_is_counted_not_kept() -> None:
    accumulator = MetricsAccumulator(max_line=8192)
    accumulator.feed(b'{"utc_timestamp_ms":1,"x":"' + b"a" * 100_000)
    accumulator.feed(b'"}\n{"utc_timestamp_ms":2,"vmm":{"panic_count":0}}\n')
    reading = accumulator.take_reading()
    assert reading.unparsed_lines == 1
    assert reading.lines == 1
    assert reading.utc_timestamp_ms == 2


# --- answers on the API socket ----------------------------------------------------


class OneRequest:
    """A round of one exchange: what the client makes of whatever the socket answers."""

    def __init__(self, path: Path) -> None:
        self.connection = ApiConnection(str(path))
        self.result: ApiResponse | ProbeError | None = None

    def begin(self) -> bytes | None:
        return FLUSH_REQUEST

    def answered(self, response: ApiResponse, *, last_call: bool = False) -> bytes | None:
        self.result = response
        return None

    def failed(self, error: ProbeError) -> None:
        self.result = error


async def answer_with(data: bytes, tmp: Path) -> Any:
    """Serve ``data`` as the answer to one request; what the client makes of it."""
    path = tmp / f"api-{abs(hash(data)) % 10**9}.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)
    exchange = OneRequest(path)

    async def serve() -> None:
        conn, _ = await listener.accept()
        listener.close()  # one answer only: a retry finds the VM gone
        with conn:
            await conn.recv(65536)
            await conn.send(data)

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                try:
                    await trio.to_thread.run_sync(run_round, [exchange], time.monotonic() + 2.0)
                finally:
                    exchange.connection.close()
                return exchange.result or ProbeError("no answer")
    finally:
        listener.close()
        path.unlink(missing_ok=True)


responses = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda status, body: b"HTTP/1.1 " + status + b" \r\nServer: Firecracker API\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
              st.sampled_from([b"204", b"400", b"200", b"999", b"abc"]), st.binary(max_size=80)),
)  # fmt: skip


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=responses)
def test_api_answers_of_any_shape_become_a_response_or_a_typed_error(
    data: bytes, tmp_path: Path
) -> None:
    result = trio.run(answer_with, data, tmp_path)
    if isinstance(result, ProbeError):
        assert result.kind in ("io", "parse", "timeout")
        assert data.decode("latin-1")[20:60] not in result.message or len(data) < 60
    else:
        assert 100 <= result.status_code <= 999
        assert len(result.body) <= 64 * 1024


@FUZZ
@given(data=responses, at_eof=st.booleans())
def test_any_bytes_parse_to_an_answer_more_needed_or_a_parse_error(
    data: bytes, at_eof: bool
) -> None:
    try:
        parsed = parse_response(data, at_eof=at_eof)
    except ProbeParseError as error:
        assert data.decode("latin-1")[20:60] not in error.message or len(data) < 60
        return
    if parsed is None:
        assert not at_eof
        return
    response, used = parsed
    assert 200 <= response.status_code <= 999
    assert 0 < used <= len(data)
    assert data[used - len(response.body) : used] == response.body


@FUZZ
@given(
    body=st.binary(max_size=300),
    status=st.sampled_from([200, 400, 404, 500]),
    cut=st.integers(min_value=0, max_value=400),
)
def test_an_answer_cut_anywhere_needs_more_until_whole(body: bytes, status: int, cut: int) -> None:
    answer = (
        f"HTTP/1.1 {status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    cut = min(cut, len(answer))
    if cut < len(answer):
        assert parse_response(answer[:cut]) is None
        try:
            parse_response(answer[:cut], at_eof=True)
        except ProbeParseError:
            pass
        else:
            raise AssertionError("an answer cut short at the end of the connection parsed")
    parsed = parse_response(answer + b"HTTP/1.1 204 \r\n\r\n")
    assert parsed is not None
    assert parsed[0] == ApiResponse(status, body, True)
    assert parsed[1] == len(answer)


def test_firecrackers_exact_answers_parse() -> None:
    no_content = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n"
    assert parse_response(no_content) == (ApiResponse(204, b"", True), len(no_content))
    fault = (
        b"HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
        b"Content-Type: application/json\r\nContent-Length: 21\r\n\r\n"
        b'{"fault_message":"x"}'
    )
    assert parse_response(fault) == (ApiResponse(400, b'{"fault_message":"x"}', True), len(fault))
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{}"
    assert parse_response(closing) is None  # no length: the body runs to the end
    assert parse_response(closing, at_eof=True) == (ApiResponse(200, b"{}", False), len(closing))
    for broken in (
        b"HTTP/1.1 20 \r\n\r\n",
        b"HTTP/2 204 \r\n\r\n",
        b"HTTP/1.1 204 \r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 \r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 \r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 100 \r\n\r\n",
    ):
        try:
            parse_response(broken, at_eof=True)
        except ProbeParseError:
            continue
        raise AssertionError(f"accepted {broken!r}")


def test_sums_past_64_bits_saturate_instead_of_failing() -> None:
    accumulator = MetricsAccumulator()
    top = 2**64 - 1
    for timestamp in (1, 2):
        accumulator.feed(
            b'{"utc_timestamp_ms":%d,"net_eth0":{"rx_bytes_count":%d,"tx_count":5}}\n'
            % (timestamp, top)
        )
        reading = accumulator.take_reading_json()
    totals = orjson.loads(reading.totals)
    assert totals["net_eth0"] == {"rx_bytes_count": top, "tx_count": 10}
    assert orjson.loads(reading.delta)["net_eth0"]["rx_bytes_count"] == top
