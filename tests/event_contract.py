"""What a consumer may rely on in every event, checked on each event the suite builds.

:func:`check_event` takes an event's structured-mode JSON and checks that

- its ``data`` is valid against the schema its ``dataschema`` names (the
  package's schema files in a ``referencing`` registry, formats checked, and
  an integer written as ``1.0`` refused);
- the whole event is valid against the official CloudEvents JSON schema
  (``tests/data/cloudevents.schema.json``, formats checked: plain
  ``jsonschema`` skips ``date-time`` and ``uri-reference`` unless its format
  extras are installed, so :func:`format_checker` refuses to run without them);
- the official CloudEvents SDK (``cloudevents`` on PyPI) parses it, with
  every attribute equal to ours and ``cellosseq`` an integer extension;
- its ``type``, ``dataschema``, ``subject`` and ``cellosseq`` agree as DESIGN.md says.

Validators are made once per process. ``tests/conftest.py`` calls this
where events are built; ``tests/test_schemas.py`` tests the checks themselves.
"""

from __future__ import annotations

import functools
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from cloudevents.core.formats.json import JSONFormat
from jsonschema import Draft7Validator, Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from cellos_probed.events import HOST_PROBE_EVENT_TYPE_PREFIX
from cellos_probed.schemas import EVENT_KINDS, schema_documents, schema_id

CLOUDEVENTS_SCHEMA = Path(__file__).parent / "data" / "cloudevents.schema.json"
#: the formats the official schema and ours use, which must really be checked
CHECKED_FORMATS = ("date-time", "uri", "uri-reference")
#: a CloudEvents Integer is a signed 32-bit number
CLOUDEVENTS_INTEGER_MAX = 2**31 - 1
#: the daemon's own kinds: their events carry no cellosseq
UNCOUNTED = ("gap", "agent")

KIND_BY_SCHEMA = {schema_id(kind): kind for kind in EVENT_KINDS}


class ContractError(AssertionError):
    """An event breaks its contract; the message says which part and where."""


def format_checker() -> FormatChecker:
    checker = Draft202012Validator.FORMAT_CHECKER
    absent = [name for name in CHECKED_FORMATS if name not in checker.checkers]
    if absent:  # jsonschema would pass any value: the check would check nothing
        raise RuntimeError(
            f"jsonschema cannot check formats {absent}: install jsonschema[format-nongpl] "
            "(make setup)"
        )
    return checker


@functools.cache
def registry() -> Registry[Any]:
    """The package's schema documents, as written, by ``$id``."""
    return Registry().with_resources(
        (uri, DRAFT202012.create_resource(document)) for uri, document in schema_documents().items()
    )


#: JSON Schema's integer is any number with no fraction (1.0 too); ours are written as
#: integers, and a consumer in a typed language reads 1.0 as a float: here 1.0 is not one
StrictIntegers = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: type(value) is int
    ),
)


@functools.cache
def data_validator(dataschema: str) -> Draft202012Validator:
    """The validator of the schema ``dataschema`` names, resolved through :func:`registry`."""
    validator: Draft202012Validator = StrictIntegers(
        registry().contents(dataschema), registry=registry(), format_checker=format_checker()
    )
    return validator


@functools.cache
def envelope_validator() -> Draft7Validator:
    schema = orjson.loads(CLOUDEVENTS_SCHEMA.read_bytes())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema, format_checker=format_checker())


def _fail(part: str, error: Any, event: dict[str, Any]) -> None:
    where = "/".join(str(step) for step in error.absolute_path) or "(root)"
    raise ContractError(
        f"{part}: at {where}: {error.message[:500]} "
        f"(event type {event.get('type')}, dataschema {event.get('dataschema')})"
    )


def check_data(dataschema: str, data: Any, event: dict[str, Any] | None = None) -> None:
    """``data`` is valid against the schema ``dataschema`` names, which must be one of ours."""
    if dataschema not in KIND_BY_SCHEMA:
        raise ContractError(f"dataschema {dataschema!r} names none of the package's schemas")
    error = best_match(data_validator(dataschema).iter_errors(data))
    if error is not None:
        _fail("data", error, event or {"dataschema": dataschema})


def check_event(payload: bytes, *, made_up_readings: bool = False) -> dict[str, Any]:
    """Every check above on one event's JSON; the event parsed. ``made_up_readings``:
    the data of a probe's events (readings, probe errors) is the test's invention and
    is not checked against its schema (``gap`` and ``agent`` data still are)."""
    event: dict[str, Any] = orjson.loads(payload)
    error = best_match(envelope_validator().iter_errors(event))
    if error is not None:
        _fail("CloudEvents JSON schema", error, event)
    dataschema = event.get("dataschema")
    kind = KIND_BY_SCHEMA.get(dataschema) if isinstance(dataschema, str) else None
    if kind is None:
        raise ContractError(f"dataschema {dataschema!r} names none of the package's schemas")
    if event["type"] != f"{HOST_PROBE_EVENT_TYPE_PREFIX}.{kind}":
        raise ContractError(f"type {event['type']!r} is not that of dataschema {dataschema!r}")
    data = event.get("data")
    if not (made_up_readings and kind not in UNCOUNTED):
        check_data(dataschema, data, event)
    if isinstance(data, dict):
        owner = data.get("hostId" if kind == "agent" else "cellId")
        subject = event.get("subject")
        if subject != owner:
            raise ContractError(f"subject {subject!r} is not the {kind} event's {owner!r}")
    _check_sequence(event, kind)
    _check_sdk_parse(payload, event)
    return event


def _check_sequence(event: dict[str, Any], kind: str) -> None:
    count = event.get("cellosseq")
    if kind in UNCOUNTED:
        if "cellosseq" in event:
            raise ContractError(f"a {kind} event carries cellosseq")
        return
    if type(count) is not int or not 1 <= count <= CLOUDEVENTS_INTEGER_MAX:
        raise ContractError(f"cellosseq {count!r} is not a CloudEvents Integer from 1")


def _check_sdk_parse(payload: bytes, event: dict[str, Any]) -> None:
    parsed = JSONFormat().read(None, payload)  # raises on what the SDK refuses
    attributes = dict(parsed.get_attributes())
    expected = {name: value for name, value in event.items() if name != "data"}
    time = attributes.pop("time", None)
    wanted_time = expected.pop("time", None)
    if wanted_time is not None and time != datetime.fromisoformat(wanted_time):
        raise ContractError(f"the SDK reads time {wanted_time!r} as {time!r}")
    if attributes != expected:
        raise ContractError(f"the SDK reads the attributes as {attributes!r}, not {expected!r}")
    if "cellosseq" in event and type(parsed.get_extension("cellosseq")) is not int:
        raise ContractError("the SDK does not read cellosseq as an integer")
    if parsed.get_data() != event.get("data"):
        raise ContractError("the SDK reads another data")
