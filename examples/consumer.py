"""A minimal consumer of cellos-probed events: validate each, account for every reading.

    cellos-probed schema > schemas.json
    python consumer.py 'dev.cellos.events.cell.observability.host.v1.>' schemas.json

Exit 1 on an invalid event or a hole in ``cellosseq`` that no ``gap`` event
declared. Needs nats-py and jsonschema only (see docs/consuming.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import defaultdict
from typing import Any

import nats
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from nats.errors import Error as NatsError
from referencing import Registry
from referencing.jsonschema import DRAFT202012

Key = tuple[str, str, str, str]  # cellosagentboot, hostId, cellId, probeSource
ATTRIBUTES = ("id", "type", "subject", "dataschema", "cellosagentboot")  # what this one reads


def load_validators(path: str) -> dict[str, Draft202012Validator]:
    """One validator per schema ``$id``; the registry resolves a ``$ref`` to any of them."""
    with open(path, encoding="utf-8") as file:
        by_type = json.load(file)  # {"cgroup": {...}, "gap": {...}, ...}
    if not isinstance(by_type, dict):
        raise ValueError(f"{path}: not the JSON object `cellos-probed schema` prints")
    schemas = list(by_type.values())
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], DRAFT202012.create_resource(schema)) for schema in schemas
    )
    formats = Draft202012Validator.FORMAT_CHECKER
    return {
        schema["$id"]: Draft202012Validator(schema, registry=registry, format_checker=formats)
        for schema in schemas
    }


class Consumer:
    def __init__(self, validators: dict[str, Draft202012Validator]) -> None:
        self.validators = validators
        self.ids: set[str] = set()
        self.seen: dict[Key, set[int]] = defaultdict(set)
        self.declared: dict[Key, set[int]] = defaultdict(set)  # by gap events
        self.events = self.invalid = self.duplicates = 0

    def problem(self, subject: str, event: Any, headers: dict[str, str]) -> str | None:
        """Why ``event`` is not a valid structured-mode cellos event, or None."""
        if headers.get("Content-Type") != "application/cloudevents+json":
            return "no Content-Type: application/cloudevents+json header"
        if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
            return "not a CloudEvent with a data object"
        missing = [name for name in ATTRIBUTES if not isinstance(event.get(name), str)]
        if missing:
            return f"attributes missing or not strings: {', '.join(missing)}"
        if "cellosseq" in event and type(event["cellosseq"]) is not int:
            return "cellosseq is not an integer"
        validator = self.validators.get(event["dataschema"])
        if validator is None:
            return f"unknown dataschema {event.get('dataschema')!r}"
        error = best_match(validator.iter_errors(event["data"]))
        if error is not None:
            return f"data{error.json_path[1:]}: {error.message}"
        # <prefix>.<kind>.<hostId>.<cellId>, <prefix>.agent.<hostId>: the data must agree
        data = event["data"]
        named = [data["hostId"]] + ([] if event["type"].endswith(".agent") else [data["cellId"]])
        if subject.split(".")[-len(named) :] != named or event["subject"] != named[-1]:
            return f"on {subject}, but data names {'/'.join(named)}"
        return None

    def add(self, subject: str, payload: bytes, headers: dict[str, str]) -> str:
        """Account for one message; return its line."""
        self.events += 1
        try:
            event = json.loads(payload)
        except ValueError:
            event = None
        if isinstance(event, dict) and event.get("id") in self.ids:
            self.duplicates += 1  # JetStream may redeliver: the id says it is the same event
            return f"DUPLICATE {event['id']} (skipped)"
        problem = self.problem(subject, event, headers)
        if problem is not None:
            self.invalid += 1
            name = event.get("id", "?") if isinstance(event, dict) else f"{len(payload)} bytes"
            return f"INVALID {name}: {problem}"
        self.ids.add(event["id"])
        data, kind = event["data"], event["type"].rsplit(".", 1)[-1]
        if kind == "agent":  # the daemon's own figures: no cell, no cellosseq
            return f"ok    {data['hostId']} agent"
        key = (event["cellosagentboot"], data["hostId"], data["cellId"], data["probeSource"])
        where = f"{data['hostId']}/{data['cellId']} {data['probeSource']}"
        if kind == "gap":
            first, last = data["firstSequence"], data["lastSequence"]
            self.declared[key].update(range(first, last + 1))
            return f"gap   {where} lost #{first}..#{last} ({data['reason']})"
        self.seen[key].add(event["cellosseq"])  # readings and probe_error share the count
        return f"ok    {where} {kind} #{event['cellosseq']}"

    def undeclared(self) -> dict[Key, list[int]]:
        """Per key, the values missing since the first received that no gap declared
        (a live subscription starts where it joined; a new boot starts again at 1)."""
        holes = {}
        for key, values in self.seen.items():
            missing = set(range(min(values), max(values) + 1)) - values - self.declared[key]
            if missing:
                holes[key] = sorted(missing)
        return holes


async def consume(args: argparse.Namespace, consumer: Consumer) -> None:
    enough = asyncio.Event()

    async def on_message(msg: Any) -> None:
        if not enough.is_set():
            print(consumer.add(msg.subject, msg.data, msg.headers or {}), flush=True)
            if consumer.events >= args.count:
                enough.set()

    async def report(error: Exception) -> None:  # instead of nats-py's tracebacks
        print(f"consumer: nats: {error!r}", file=sys.stderr)

    client = await nats.connect(args.server, max_reconnect_attempts=1, error_cb=report)
    await client.subscribe(args.subject, cb=on_message)
    await client.flush()  # the server has the subscription: nothing published from now is missed
    print(f"subscribed to {args.subject} on {args.server}", file=sys.stderr, flush=True)
    try:
        await asyncio.wait_for(enough.wait(), args.seconds)
    except TimeoutError:
        pass
    await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("subject", help="NATS subject, wildcards allowed")
    parser.add_argument("schemas", help="the output of `cellos-probed schema`")
    parser.add_argument("--server", default="nats://127.0.0.1:4222")
    parser.add_argument("--count", type=int, default=1000, help="stop after this many events")
    parser.add_argument("--seconds", type=float, default=60.0, help="or after this long")
    args = parser.parse_args()
    try:
        consumer = Consumer(load_validators(args.schemas))
        asyncio.run(consume(args, consumer))
    except (OSError, ValueError, KeyError, NatsError) as exc:
        print(f"consumer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    holes = consumer.undeclared()
    for (boot, host, cell, probe), missing in holes.items():
        print(f"UNDECLARED HOLE {host}/{cell} {probe} boot {boot}: cellosseq {missing}")
    print(
        f"summary: events {consumer.events}, duplicates {consumer.duplicates}, "
        f"invalid {consumer.invalid}, holes undeclared {sum(map(len, holes.values()))}"
    )
    return 1 if consumer.invalid or holes else 0


if __name__ == "__main__":
    sys.exit(main())
