"""The JSON Schemas of the event types' data, ``cellos-probed schema``, and the contract
checks the suite runs on every event it builds (``tests/event_contract.py``)."""

from __future__ import annotations

import copy
import subprocess
import sys
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.config import CellConfig, Config, DaemonSettings, NatsSettings, PathRoots
from cellos_probed.daemon import Prober, collect_figures
from cellos_probed.events import (
    HOST_PROBE_EVENT_TYPE_PREFIX,
    SequenceRegistry,
    agent_event,
    gap_event,
)
from cellos_probed.schemas import (
    EVENT_KINDS,
    all_schemas,
    load_schema,
    schema_documents,
    schema_id,
)
from cellos_probed.sinks import CapturingSink, EventSink, SinkStatistics
from testbed.cgroup_tree import FakeCgroup
from tests.event_contract import (
    CHECKED_FORMATS,
    ContractError,
    check_data,
    check_event,
    format_checker,
)

GOLDEN = Path(__file__).parent / "golden" / "once.json"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
STAMP = "2026-11-25T10:15:02.123Z"
BOOT = "0b8e2f0e-5a55-4c1e-9a4e-1d1f3c2b9a70"
ATTRIBUTION = {
    "cellId": "cell-1",
    "hostId": "host-a",
    "runId": "run-7",
    "specSignatureHash": "sha256:abcd",
}
#: what tests/golden/once.json holds in place of what differs from run to run
PLACEHOLDERS: dict[str, Any] = {
    "<time>": STAMP,
    "<ifindex>": 7,
    "<utc_timestamp_ms>": 1_764_065_702_123,
}


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "cellos_probed", *args], capture_output=True, timeout=30, check=False
    )


def real_values(value: Any) -> Any:
    """A golden event with its placeholders made values again."""
    if isinstance(value, dict):
        return {key: real_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [real_values(item) for item in value]
    if isinstance(value, str):
        if value in PLACEHOLDERS:
            return PLACEHOLDERS[value]
        return value.replace("<uuid4>", str(uuid.uuid4()))
    return value


def golden_events() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = real_values(orjson.loads(GOLDEN.read_bytes()))
    return events


def kind_of(event: dict[str, Any]) -> str:
    kind: str = event["type"].removeprefix(f"{HOST_PROBE_EVENT_TYPE_PREFIX}.")
    return kind


def golden_data(kind: str, *, with_key: str | None = None) -> dict[str, Any]:
    """The data of the golden file's first event of ``kind`` (whose output has ``with_key``)."""
    for event in golden_events():
        output = event["data"].get("output", {})
        if kind_of(event) == kind and (with_key is None or with_key in output):
            data: dict[str, Any] = event["data"]
            return data
    raise AssertionError(f"no {kind} event in {GOLDEN}")


def gap_data() -> dict[str, Any]:
    data: dict[str, Any] = gap_event(ATTRIBUTION, "host.cgroup", 3, 5, "buffer_full", BOOT).data
    return data


class ConnectedSink(EventSink):
    """A sink that says it delivers over a connection: the agent figures then have its."""

    def emit_nowait(self, event: CloudEvent) -> None:
        pass

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(published=41, buffered=2, reconnects=1, connected=True)


def agent_data(sink: EventSink | None = None) -> dict[str, Any]:
    """The daemon's own figures as it collects them (a prober of one cell, ticked twice)."""
    config = Config(
        "<test>",
        DaemonSettings(tick_seconds=1.0, probe_timeout_seconds=0.5, host_id="host-a"),
        PathRoots(cgroup_root=None),
        NatsSettings(),
        (CellConfig("cell-1", "run-7", "sha256:abcd"),),
    )
    sink = sink or ConnectedSink()
    prober = Prober(config, sink, SequenceRegistry(BOOT, "host-a"))
    prober.tick_stats.durations.extend([0.0012, 0.0031])
    prober.probe_stats.count_error("io", "cgroup")
    data: dict[str, Any] = agent_event("host-a", BOOT, collect_figures(prober, sink)).data
    return data


def sample(kind: str) -> dict[str, Any]:
    """A valid ``data`` of ``kind``: what the daemon made (golden, or built here)."""
    if kind == "gap":
        return gap_data()
    if kind == "agent":
        return agent_data()
    return golden_data(kind, with_key="rules" if kind == "nftables" else None)


def is_valid(kind: str, data: Any) -> bool:
    try:
        check_data(schema_id(kind), data)
    except ContractError:
        return False
    return True


# -- the schemas as shipped --------------------------------------------------------------------


def test_every_type_has_a_2020_12_schema_whose_id_is_its_dataschema() -> None:
    shipped = {
        entry.name
        for entry in resources.files("cellos_probed.schemas").iterdir()
        if entry.name.endswith(".json")
    }
    assert shipped == {f"{kind}.json" for kind in EVENT_KINDS} | {"common.json"}
    common = schema_documents()["urn:cellos:schema:host.v1.common:1"]
    for kind in EVENT_KINDS:
        schema = load_schema(kind)
        assert schema["$schema"] == DRAFT_2020_12
        assert schema["$id"] == schema_id(kind) == f"urn:cellos:schema:host.v1.{kind}:1"
        Draft202012Validator.check_schema(schema)
        # whole: the common definitions are among its own, and it refers to nothing else
        written = schema_documents()[schema_id(kind)]
        assert not written.get("$defs", {}).keys() & common["$defs"].keys()
        assert schema["$defs"] == {**written.get("$defs", {}), **common["$defs"]}
        assert b"urn:cellos:schema:host.v1.common" not in orjson.dumps(schema)
    assert set(schema_documents()) == {schema_id(kind) for kind in EVENT_KINDS} | {
        "urn:cellos:schema:host.v1.common:1"
    }
    assert all_schemas() == {kind: load_schema(kind) for kind in EVENT_KINDS}


def test_an_unknown_type_has_no_schema() -> None:
    with pytest.raises(ValueError, match="unknown event type 'disk': one of cgroup, tap_link"):
        load_schema("disk")


def test_the_golden_events_are_valid_whole() -> None:
    events = golden_events()
    assert {kind_of(event) for event in events} == {
        "cgroup",
        "tap_link",
        "nftables",
        "fc_metrics",
        "probe_error",
    }
    for event in events:
        check_event(orjson.dumps(event))


def test_each_schema_validates_alone_with_no_registry() -> None:
    """A consumer may take one type's schema and nothing else."""
    for kind in EVENT_KINDS:
        validator = Draft202012Validator(load_schema(kind), format_checker=format_checker())
        assert list(validator.iter_errors(sample(kind))) == []
        broken = sample(kind)
        broken["hostReceivedAt"] = "2026-02-30T10:15:02.123Z"  # no such day
        assert not validator.is_valid(broken)


# -- the schemas are precise -------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def put(path: str, value: Any) -> Mutation:
    """Set the member at ``path`` (keys joined by '/', list indexes as numbers)."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def drop(*paths: str) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        for path in paths:
            *parents, last = path.split("/")
            node: Any = data
            for key in parents:
                node = node[key]
            del node[last]

    return mutate


UNTIMED = {"carrier": True, "operstate": "UP", "admin_up": True}
STATS = dict.fromkeys(
    (f"{way}_{what}" for way in ("rx", "tx") for what in ("bytes", "packets", "errors", "dropped")),
    0,
)
FIGURES = {"packets": 1, "bytes": 84}

INVALID: list[tuple[str, str, Mutation]] = [
    # the attribution and the time stamp, shared by every type
    ("cgroup", "a required key missing: cellId", drop("cellId")),
    ("cgroup", "a cell id that is not a subject token", put("cellId", "cell.1")),
    ("cgroup", "a member no schema names", put("extra", 1)),
    ("cgroup", "a time without milliseconds", put("hostReceivedAt", "2026-11-25T10:15:02Z")),
    ("cgroup", "a time not in UTC", put("hostReceivedAt", "2026-11-25T10:15:02.123+01:00")),
    ("cgroup", "a time that is no date", put("hostReceivedAt", "2026-13-25T10:15:02.123Z")),
    ("cgroup", "another probe's probeSource", put("probeSource", "host.nftables")),
    ("cgroup", "inputs without files", drop("inputs/files")),
    ("cgroup", "a file the probe does not read", put("inputs/files", ["memory.stat"])),
    # cgroup
    ("cgroup", "output without missing", drop("output/missing")),
    ("cgroup", "output without deltas", drop("output/deltas")),
    ("cgroup", "a string where an integer belongs", put("output/memory_current", "8388608")),
    ("cgroup", "a keyed file's value a string", put("output/cpu_stat/usage_usec", "1500000")),
    ("cgroup", "a keyed file's value a fraction", put("output/cpu_stat/usage_usec", 1.5)),
    ("cgroup", "an integer written as 1.0", put("output/pids_current", 3.0)),
    ("cgroup", "a negative counter", put("output/pids_current", -1)),
    ("cgroup", "a pressure line without total", drop("output/cpu_pressure/some/total")),
    ("cgroup", "a pressure line's extra key", put("output/cpu_pressure/some/avg5", 0.0)),
    ("cgroup", "deltas without reset", put("output/deltas", {"cpu_stat": {"usage_usec": 1}})),
    ("cgroup", "a missing file by its output key", put("output/missing", ["memory_events"])),
    ("cgroup", "a file of no probe", put("output/memory_stat", {"anon": 1})),
    # tap_link
    ("tap_link", "carrier as a string", put("output/carrier", "true")),
    ("tap_link", "no transitions", drop("output/transitions")),
    ("tap_link", "a transition without its time", put("output/transitions", [UNTIMED])),
    (
        "tap_link",
        "a transition's time without ms",
        put("output/transitions", [{**UNTIMED, "at": "2026-11-25T10:15:02Z"}]),
    ),
    ("tap_link", "ifindex 0", put("output/ifindex", 0)),
    ("tap_link", "an address in capitals", put("output/address", "02:FC:00:00:00:01")),
    ("tap_link", "no stats", drop("output/stats")),
    ("tap_link", "neither stats nor deltas", drop("output/stats", "output/deltas")),
    ("tap_link", "no deltas", drop("output/deltas")),
    ("tap_link", "a counter the probe does not send", put("output/stats/rx_nohandler", 0)),
    ("tap_link", "a negative counter", put("output/stats/tx_dropped", -1)),
    ("tap_link", "deltas without reset", put("output/deltas", {"stats": STATS})),
    ("tap_link", "inputs without netns", drop("inputs/netns")),
    # nftables
    ("nftables", "a chain configured, no rules", drop("output/rules")),
    ("nftables", "rules with no chain configured", drop("inputs/chain")),
    ("nftables", "a counter without bytes", drop("output/counters/cell-full-rx/bytes")),
    ("nftables", "a rule's handle a string", put("output/rules/0/handle", "6")),
    (
        "nftables",
        "missing of another kind",
        put("output/missing", [{"kind": "table", "name": "cellos"}]),
    ),
    (
        "nftables",
        "deltas of a rule not by handle",
        put("output/deltas", {"counters": {}, "rules": {"echo": FIGURES}, "reset": False}),
    ),
    ("nftables", "deltas without reset", put("output/deltas", {"counters": {}, "rules": {}})),
    ("nftables", "an unknown family", put("inputs/family", "inet6")),
    # fc_metrics
    ("fc_metrics", "no instance", drop("output/instance")),
    ("fc_metrics", "an instance's extra key", put("output/instance/app_name", "Firecracker")),
    ("fc_metrics", "lines as a string", put("output/lines", "3")),
    ("fc_metrics", "no lost_lines", drop("output/lost_lines")),
    ("fc_metrics", "a metric as a string", put("output/delta/vcpu/exit_io_in", "12")),
    ("fc_metrics", "a metric as a fraction", put("output/totals/vcpu/exit_io_in", 1.5)),
    ("fc_metrics", "a section that is a number", put("output/delta/vcpu", 5)),
    ("fc_metrics", "an agg's part as a string", put("output/delta/block/read_agg/sum_us", "1")),
    ("fc_metrics", "metrics_id a number", put("output/metrics_id", 7)),
    ("fc_metrics", "metrics_properties not strings", put("output/metrics_properties", {"a": 1})),
    ("fc_metrics", "utc_timestamp_ms as a string", put("output/utc_timestamp_ms", "1")),
    # probe_error
    ("probe_error", "an unknown error kind", put("error/kind", "oops")),
    ("probe_error", "an empty message", put("error/message", "")),
    ("probe_error", "an error's extra key", put("error/errno", 2)),
    (
        "probe_error",
        "the inputs of another probe",
        put("inputs", {"interface": "t", "netns": None}),
    ),
    ("probe_error", "an unknown probe", put("probeSource", "host.disk")),
    ("probe_error", "an output", put("output", {})),
    # gap
    ("gap", "nothing dropped", put("dropped", 0)),
    ("gap", "a sequence as a string", put("firstSequence", "3")),
    ("gap", "sequence 0", put("firstSequence", 0)),
    ("gap", "no reason", drop("reason")),
    ("gap", "no runId", drop("runId")),
    # agent
    ("agent", "connected without the delivery figures", drop("published")),
    ("agent", "a delivery figure without connected", drop("connected")),
    ("agent", "an unknown error kind counted", put("probeErrorsByKind", {"oops": 1})),
    ("agent", "a figure no schema names", put("eventsPerSecond", 3)),
    ("agent", "a duration as a string", put("tickDurationMs/p99", "3.5")),
    ("agent", "a negative count", put("ticks", -1)),
    ("agent", "a cell id: agent events have none", put("cellId", "cell-1")),
]


@pytest.mark.parametrize(
    ("kind", "what", "mutate"), INVALID, ids=[f"{k}: {w}" for k, w, _ in INVALID]
)
def test_data_the_daemon_does_not_make_is_refused(kind: str, what: str, mutate: Mutation) -> None:
    data = sample(kind)
    assert is_valid(kind, data)
    broken = copy.deepcopy(data)
    mutate(broken)
    assert not is_valid(kind, broken), what


VALID: list[tuple[str, str, Mutation]] = [
    ("cgroup", "a key the kernel adds", put("output/cpu_stat/nr_new_thing", 5)),
    ("cgroup", "a pressure file with no full line", drop("output/io_pressure/full")),
    (
        "cgroup",
        "deltas of the files present",
        put(
            "output/deltas",
            {"cpu_stat": {"usage_usec": 10}, "memory_events": {"oom": 0}, "reset": False},
        ),
    ),
    ("cgroup", "a reading the kernel signalled", put("output/trigger", "memory.events")),
    ("tap_link", "no carrier attribute from the kernel", put("output/carrier", None)),
    ("tap_link", "a transition", put("output/transitions", [{**UNTIMED, "at": STAMP}])),
    ("tap_link", "the host's namespace", put("inputs/netns", None)),
    ("tap_link", "deltas after a reset", put("output/deltas", {"stats": STATS, "reset": True})),
    ("nftables", "no counters found", put("output/counters", {})),
    (
        "nftables",
        "deltas by rule handle",
        put("output/deltas", {"counters": {}, "rules": {"6": FIGURES}, "reset": True}),
    ),
    ("fc_metrics", "a section the VMM adds", put("output/delta/net_eth1", {"rx_count": 1})),
    ("fc_metrics", "no totals in this reading", drop("output/totals")),
    ("fc_metrics", "the VMM's id and properties", put("output/metrics_properties", {"az": "1"})),
    ("fc_metrics", "no line read yet", put("output/utc_timestamp_ms", None)),
    ("fc_metrics", "an empty delta", put("output/delta", {})),
    ("probe_error", "the bare probe name (the seed's API)", put("probeSource", "cgroup")),
    ("agent", "a shard", put("shard", "1/4")),
]


@pytest.mark.parametrize(("kind", "what", "mutate"), VALID, ids=[f"{k}: {w}" for k, w, _ in VALID])
def test_what_the_kernel_the_vmm_and_the_daemon_may_send_is_valid(
    kind: str, what: str, mutate: Mutation
) -> None:
    data = copy.deepcopy(sample(kind))
    mutate(data)
    assert is_valid(kind, data), what


def test_the_agent_figures_of_a_daemon_without_a_connection_are_valid() -> None:
    data = agent_data(CapturingSink())
    assert "connected" not in data
    assert is_valid("agent", data)


# -- the checks on whole events ----------------------------------------------------------------


def an_event() -> dict[str, Any]:
    """A valid reading event, whole."""
    event: dict[str, Any] = golden_events()[0]
    return event


def test_formats_are_really_checked() -> None:
    """Plain jsonschema passes any value of a format it has no checker for."""
    assert set(CHECKED_FORMATS) <= set(format_checker().checkers)
    event = an_event()
    check_event(orjson.dumps(event))
    for attribute, bad in (
        ("time", "2026-02-30T10:15:02.123Z"),  # date-time
        ("source", "cellos host telemetry"),  # uri-reference
        ("dataschema", "not a uri"),  # uri
    ):
        broken = {**event, attribute: bad}
        with pytest.raises(ContractError, match=f"CloudEvents JSON schema: at {attribute}"):
            check_event(orjson.dumps(broken))
    broken = copy.deepcopy(event)
    broken["data"]["hostReceivedAt"] = "2026-02-30T10:15:02.123Z"
    with pytest.raises(ContractError, match="data: at hostReceivedAt"):
        check_event(orjson.dumps(broken))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cellosseq": "17"}, "cellosseq '17' is not a CloudEvents Integer"),
        ({"cellosseq": 2**31}, "is not a CloudEvents Integer"),
        ({"cellosseq": 0}, "is not a CloudEvents Integer"),
        ({"type": f"{HOST_PROBE_EVENT_TYPE_PREFIX}.nftables"}, "is not that of dataschema"),
        ({"dataschema": "urn:cellos:schema:host.v1.cgroup:2"}, "names none of the package's"),
        ({"dataschema": "urn:cellos:schema:host.v1.common:1"}, "names none of the package's"),
        ({"subject": "cell-other"}, "subject 'cell-other' is not"),
        ({"id": ""}, "CloudEvents JSON schema: at id"),
        ({"cellosBoot": "x"}, "Extension attribute 'cellosBoot' should only contain lowercase"),
    ],
)
def test_an_event_breaking_its_envelope_is_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=message):
        check_event(orjson.dumps({**an_event(), **change}))


def test_a_gap_or_agent_event_carries_no_cellosseq() -> None:
    gap = gap_event(ATTRIBUTION, "host.cgroup", 3, 5, "buffer_full", BOOT).to_dict()
    check_event(orjson.dumps(gap))
    with pytest.raises(ContractError, match="a gap event carries cellosseq"):
        check_event(orjson.dumps({**gap, "cellosseq": 1}))


def test_made_up_readings_leave_only_the_data_of_a_probes_events_unchecked() -> None:
    reading = an_event()
    reading["data"]["output"] = {"n": 1}
    with pytest.raises(ContractError, match="'missing' is a required property"):
        check_event(orjson.dumps(reading))
    check_event(orjson.dumps(reading), made_up_readings=True)
    with pytest.raises(ContractError, match="CloudEvents JSON schema"):
        check_event(orjson.dumps({**reading, "time": "yesterday"}), made_up_readings=True)
    gap = gap_event(ATTRIBUTION, "host.cgroup", 3, 5, "buffer_full", BOOT).to_dict()
    gap["data"]["dropped"] = 0
    with pytest.raises(ContractError, match="data: at dropped"):
        check_event(orjson.dumps(gap), made_up_readings=True)


# -- cellos-probed schema ----------------------------------------------------------------------


def test_schema_prints_one_types_schema() -> None:
    result = run_cli("schema", "fc_metrics")
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout) == load_schema("fc_metrics")


def test_schema_without_a_type_prints_every_types_schema_keyed_by_type() -> None:
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    printed = orjson.loads(result.stdout)
    assert list(printed) == list(EVENT_KINDS)
    for kind, schema in printed.items():
        assert schema["$id"] == schema_id(kind)
        # whole: it validates with nothing else at hand
        validator = Draft202012Validator(schema, format_checker=format_checker())
        assert validator.is_valid(sample(kind))


def test_schema_of_an_unknown_type_is_a_usage_error() -> None:
    result = run_cli("schema", "disk")
    assert result.returncode == 2
    assert result.stdout == b""
    assert b"argument TYPE: invalid choice: 'disk' (choose from 'cgroup'" in result.stderr
    assert b"Traceback" not in result.stderr
    assert b"schema" in run_cli("--help").stdout


def test_once_prints_events_that_honour_their_contract(tmp_path: Path) -> None:
    """``once`` runs in its own process, out of reach of the suite's check on built events."""
    FakeCgroup(tmp_path / "cg" / "ok").write()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\nhost_id = "host-a"\n[paths]\ncgroup_root = "{tmp_path / "cg"}"\n'
        + "".join(
            f'[[cell]]\nid = "{cell}"\nrun_id = "r"\nspec_signature_hash = "h"\n'
            f'[cell.cgroup]\npath = "{cell}"\n'
            for cell in ("ok", "gone")
        )
    )
    result = run_cli("once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    events = [check_event(line) for line in result.stdout.splitlines()]
    assert sorted(kind_of(event) for event in events) == ["cgroup", "probe_error"]
