"""The JSON Schema (2020-12) of every event type's ``data``, shipped in the package.

An event's ``dataschema`` attribute is its schema's ``$id``:
``urn:cellos:schema:host.v1.<type>:<n>``, ``<n>`` raised on any incompatible
change of that type's ``data``.
"""

from __future__ import annotations

from typing import Final

#: every event type the daemon sends, by the last segment of its CloudEvents type
EVENT_KINDS: Final = ("cgroup", "tap_link", "nftables", "fc_metrics", "probe_error", "gap", "agent")

#: each type's schema version: raise it on any incompatible change of that type's data
SCHEMA_VERSIONS: Final = dict.fromkeys(EVENT_KINDS, 1)


def schema_id(kind: str) -> str:
    """The ``$id`` of ``kind``'s schema, which its events carry as ``dataschema``."""
    return f"urn:cellos:schema:host.v1.{kind}:{SCHEMA_VERSIONS[kind]}"
