"""JSON Schema (draft 2020-12) of every message, generated from the Python definitions.

The Python definitions stay the one source of truth: the client payload rules the gateway enforces
(`messages.*_SCHEMA` through `dispatch.COMMANDS`), the TypedDicts of what the gateway sends, the
service payloads' required fields, the section-4 event form. `make schema` writes the result to
`schema/gateway.schema.json`; TypeScript types are generated from that file (json-schema-to-typescript),
and `tests/test_schema.py` fails when the committed file drifts from what this module builds.

    python -m tornado_gateway.schema [--check] [PATH]
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, NotRequired, Required

from . import messages
from .dispatch import COMMANDS, EVERYONE
from .history import LATEST_VALUE_TYPES

SCHEMA_ID: Final = "https://github.com/tornado-gateway/tornado-gateway/schema/gateway.schema.json"
DEFAULT_PATH: Final = Path(__file__).resolve().parent.parent / "schema" / "gateway.schema.json"

#: Client messages that become a section-4 event on Redis (the rest only touch the connection).
EVENT_TYPES: Final = ("location_update", "dispatch_response", "receipt")

Json = dict[str, Any]


def pascal(kind: str) -> str:
    return "".join(part.capitalize() for part in kind.split("_"))


def ref(name: str) -> Json:
    return {"$ref": f"#/$defs/{name}"}


# --- Python types -> JSON Schema ----------------------------------------------------------------


def _type_schema(hint: Any) -> Json:
    origin = typing.get_origin(hint)
    if origin in (NotRequired, Required):
        return _type_schema(typing.get_args(hint)[0])
    if origin is typing.Annotated:
        base, *extras = typing.get_args(hint)
        for extra in extras:
            if isinstance(extra, type) and issubclass(extra, enum.Enum):
                return {"type": "string", "enum": [member.value for member in extra]}
        return _type_schema(base)
    if origin is typing.Literal:
        return {"type": "string", "enum": list(typing.get_args(hint))}
    if origin in (types.UnionType, typing.Union):
        return {"anyOf": [_type_schema(arg) for arg in typing.get_args(hint)]}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if hint is Any:
        return {}
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if hint in simple:
        return {"type": simple[hint]}
    if typing.is_typeddict(hint):
        return typeddict_schema(hint)
    raise TypeError(f"no JSON Schema for {hint!r}")


def typeddict_schema(cls: Any, *, closed: bool = True) -> Json:
    """An object schema from a TypedDict: its fields in order, `NotRequired` ones optional (read from
    the hints: with postponed annotations, Python 3.11's `__required_keys__` cannot see them)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    schema: Json = {"type": "object", "properties": {name: _type_schema(hint) for name, hint in hints.items()},
                    "required": [name for name, hint in hints.items() if typing.get_origin(hint) is not NotRequired]}
    schema["additionalProperties"] = not closed
    return schema


def rules_schema(rules: messages.Schema) -> Json:
    """The payload schema of a client message, from the rules the gateway enforces. Unknown fields
    are accepted and dropped by the gateway, so they are allowed here too."""
    return {"type": "object", "properties": {name: dict(rule) for name, (_, _, rule) in rules.items()},
            "required": [name for name, (_, needed, _) in rules.items() if needed]}


def titled(name: str, schema: Json, description: str | None = None) -> Json:
    head: Json = {"title": name}
    if description:
        head["description"] = description
    return head | schema


# --- messages -----------------------------------------------------------------------------------

ID: Final[Json] = {"type": "string", "minLength": 1, "maxLength": messages.MAX_ID_LENGTH}
MS: Final[Json] = {"type": "integer", "description": "milliseconds since the Unix epoch"}
SEQ: Final[Json] = {"type": "integer", "minimum": 1,
                    "description": "per-user sequence number of a recorded message (PROTOCOL.md 7.1)"}
RECEIPT: Final[Json] = {"const": True, "description": "the app answers with a `receipt` once it handled it (7.5)"}


def _message(kind: str, payload: str, fields: Mapping[str, Json], required: list[str]) -> Json:
    properties: Json = {"type": {"const": kind}, "payload": ref(payload)} | dict(fields)
    return {"type": "object", "properties": properties, "required": ["type", "payload", *required],
            "additionalProperties": False}


def server_envelope(kind: str, *, service: bool) -> Json:
    fields: Json = {"id": {"type": "string"}, "timestamp": MS}
    if service:
        recorded = kind not in LATEST_VALUE_TYPES
        fields |= ({"seq": SEQ} if recorded else {}) | {"expiresAt": MS, "receipt": RECEIPT}
    return _message(kind, pascal(kind) + "Payload", fields, ["id", "timestamp"])


def client_envelope(kind: str) -> Json:
    return _message(kind, pascal(kind) + "Payload", {"id": ID}, [])


def publish_envelope(kind: str) -> Json:
    """What a service sends: `POST /broadcast/user/{id}` body, `gateway_publish`'s message, or a
    plain `PUBLISH gateway:user:{id}` envelope."""
    fields: Json = {"id": ID, "timestamp": MS, "expiresAt": MS, "receipt": {"type": "boolean"}}
    return _message(kind, pascal(kind) + "Payload", fields, [])


def event_form(kind: str) -> Json:
    schema = typeddict_schema(messages.InboundEvent)
    schema["properties"]["type"] = {"const": kind}
    schema["properties"]["payload"] = ref(pascal(kind) + "Payload")
    return schema


def _roles(kind: str) -> str:
    roles = COMMANDS[kind].roles
    return "any userType" if roles == EVERYONE else " and ".join(sorted(roles))


def _union(name: str, members: list[str], description: str) -> Json:
    return {"title": name, "description": description, "oneOf": [ref(member) for member in members]}


def build() -> Json:
    defs: Json = {}
    server, client, publish, events = [], [], [], []
    for kind, payload_type in messages.GATEWAY_PAYLOADS.items():
        defs[pascal(kind) + "Payload"] = titled(pascal(kind) + "Payload", typeddict_schema(payload_type),
                                                 payload_type.__doc__ if payload_type.__doc__ else None)
        defs[pascal(kind) + "Message"] = titled(pascal(kind) + "Message", server_envelope(kind, service=False))
        server.append(pascal(kind) + "Message")
    for kind, payload_type in messages.SERVICE_PAYLOADS.items():
        latest = " Latest-value type: delivered live, never recorded (no seq)." if kind in LATEST_VALUE_TYPES else ""
        defs[pascal(kind) + "Payload"] = titled(pascal(kind) + "Payload", typeddict_schema(payload_type, closed=False),
                                                 "Required fields; any other fields pass through unchanged.")
        defs[pascal(kind) + "Message"] = titled(pascal(kind) + "Message", server_envelope(kind, service=True),
                                                 f"Sent by services.{latest}")
        defs[pascal(kind) + "Publish"] = titled(pascal(kind) + "Publish", publish_envelope(kind))
        server.append(pascal(kind) + "Message")
        publish.append(pascal(kind) + "Publish")
    for kind, command in COMMANDS.items():
        defs[pascal(kind) + "Payload"] = titled(pascal(kind) + "Payload", rules_schema(command.schema))
        defs[pascal(kind) + "Message"] = titled(pascal(kind) + "Message", client_envelope(kind),
                                                 f"Sent by clients ({_roles(kind)}).")
        client.append(pascal(kind) + "Message")
        if kind in EVENT_TYPES:
            defs[pascal(kind) + "Event"] = titled(pascal(kind) + "Event", event_form(kind))
            events.append(pascal(kind) + "Event")
    defs["ServerMessage"] = _union("ServerMessage", server, "Every frame the gateway sends to a client.")
    defs["ClientMessage"] = _union("ClientMessage", client, "Every frame a client may send.")
    defs["ServiceMessage"] = _union("ServiceMessage", publish, "What a service publishes for a user.")
    defs["GatewayEvent"] = _union("GatewayEvent", events,
                                  "A client message as it reaches Redis: channel gateway:events:<type> "
                                  "(and, for dispatch_response and receipt, field `data` of the stream).")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "TornadoGateway",
            "description": "Generated by `make schema` from tornado_gateway/messages.py: do not edit by hand.",
            "anyOf": [ref(name) for name in ("ServerMessage", "ClientMessage", "ServiceMessage", "GatewayEvent")],
            "$defs": defs}


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--check", action="store_true", help="fail if the file differs from the definitions")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.path.exists() or args.path.read_text() != text:
            print(f"{args.path} is out of date: run `make schema`", file=sys.stderr)
            return 1
        return 0
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(text)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
