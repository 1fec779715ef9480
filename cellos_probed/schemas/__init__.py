"""The JSON Schema (2020-12) of every event type's ``data``, shipped in the package.

An event's ``dataschema`` attribute is its schema's ``$id``:
``urn:cellos:schema:host.v1.<type>:<n>``, ``<n>`` raised on any incompatible
change of that type's ``data``.

The files beside this module are the schemas as written: one per type, and
``common.json`` (``urn:cellos:schema:host.v1.common:1``), the definitions
they share, which they refer to by ``$ref``; :func:`schema_documents` gives
them by ``$id``, for a validator's registry. :func:`load_schema` gives a
type's schema whole, the common definitions among its own ``$defs`` and
referred to there, so that it validates alone in any validator. (Embedded as
a resource of their own, with their ``$id``, they would be as valid, but
Python's ``jsonschema`` then searches the whole document at every ``$ref``:
ten times the cost of each event's validation.) Loading needs no JSON Schema
library: the package publishes its schemas, its consumers (and its tests)
validate.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Final

import orjson

#: every event type the daemon sends, by the last segment of its CloudEvents type
EVENT_KINDS: Final = ("cgroup", "tap_link", "nftables", "fc_metrics", "probe_error", "gap", "agent")

#: each type's schema version: raise it on any incompatible change of that type's data
SCHEMA_VERSIONS: Final = dict.fromkeys(EVENT_KINDS, 1)

#: the document of definitions the types' schemas share (not an event type)
COMMON: Final = "common"


def schema_id(kind: str) -> str:
    """The ``$id`` of ``kind``'s schema, which its events carry as ``dataschema``."""
    return f"urn:cellos:schema:host.v1.{kind}:{SCHEMA_VERSIONS[kind]}"


def _document(name: str) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(
        resources.files(__name__).joinpath(f"{name}.json").read_bytes()
    )
    return document


def load_schema(kind: str) -> dict[str, Any]:
    """``kind``'s schema, with the common definitions it refers to embedded.

    A fresh object each call: the caller may change it. An unknown ``kind``
    is a ``ValueError`` naming the types there are.
    """
    if kind not in SCHEMA_VERSIONS:
        raise ValueError(f"unknown event type {kind!r}: one of {', '.join(EVENT_KINDS)}")
    schema = _document(kind)
    common = _document(COMMON)
    schema["$defs"] = {**schema.get("$defs", {}), **common["$defs"]}
    localised: dict[str, Any] = _local_refs(schema, f"{common['$id']}#")
    return localised


def _local_refs(node: Any, common: str) -> Any:
    """``node`` with each ``$ref`` into the common definitions made a reference within
    the document (``<common $id>#/$defs/x`` -> ``#/$defs/x``)."""
    if isinstance(node, dict):
        return {
            key: "#" + value.removeprefix(common)
            if key == "$ref" and value.startswith(common)
            else _local_refs(value, common)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_local_refs(item, common) for item in node]
    return node


def all_schemas() -> dict[str, dict[str, Any]]:
    """Every type's schema (as :func:`load_schema` gives it), by type."""
    return {kind: load_schema(kind) for kind in EVENT_KINDS}


def schema_documents() -> dict[str, dict[str, Any]]:
    """Every schema file as written, the common definitions' too, by its ``$id``."""
    documents = [_document(name) for name in (*EVENT_KINDS, COMMON)]
    return {document["$id"]: document for document in documents}
