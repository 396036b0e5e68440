"""Fuzzing the inbound WebSocket path of a real gateway process with Hypothesis.

Every generated frame goes over a real WebSocket to a real gateway, followed by a probe
(`heartbeat_ack` with an id). Messages of one connection are processed in order, so everything
that arrives before the probe's `ack` is the gateway's answer to the fuzzed frame, and the probe's
`ack` itself proves that the connection survived. The expected answer comes from `expected_answer`,
a small pure oracle written from docs/PROTOCOL.md (rules below), not from the gateway's code.

The oracle's rules, in the order the contract implies:

1. A binary frame, or text that is not JSON, is `INVALID_JSON`. "Not JSON" is decided with Python's
   `json` module (which, like the gateway's parser, accepts the literals NaN, Infinity and -Infinity).
   The generators only produce text on which that module and the gateway's parser agree, and nesting
   deeper than the parser's limit (1024 levels) counts as not parseable.
2. JSON that is not an object, whose `type` is not a non-empty string, whose `payload` is present
   and not an object, or whose `id` is present (not null) and not a string of 1..128 characters is
   `INVALID_MESSAGE`. A missing `payload` counts as `{}`.
3. A `type` that is not `heartbeat_ack`, `location_update` or `dispatch_response` is `UNKNOWN_TYPE`.
4. `location_update` and `dispatch_response` from a rider or a restaurant are `FORBIDDEN`.
5. A payload that fails its type's schema is `INVALID_MESSAGE`: numbers must be finite ints or floats
   (not booleans) within their range; an integer too large for a double (about 2**1024) is not a finite
   number either; strings have their lengths; `action` is accept or reject; `isAvailable` a boolean.
   Unknown fields are ignored.
6. Otherwise the frame is accepted: an `ack` with its id, or nothing when it had no id.

An `error` frame carries `ref` = the frame's `id` when the frame was JSON and its `id` is a string of
at most 128 characters; it never carries one for INVALID_JSON. A text frame that is not UTF-8 closes the
connection with 1007 (docs/PROTOCOL.md); everything else keeps it open.

Numbers must be finite and integers within +-2^63; strings (ids included) must be encodable as UTF-8
(a JSON `\\ud800` escape decodes to a lone surrogate, which is not). The regression tests at the end
pin the minimal inputs of the bugs this fuzzer found (INTERNAL for huge integers and lone surrogates,
and a dropped connection for a surrogate in `id`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from tests.helpers import Client, GatewayProcess, unique

USER_TYPES = ("driver", "rider", "restaurant", "delivery_partner")
MOVING = ("driver", "delivery_partner")
CLIENT_TYPES = ("heartbeat_ack", "location_update", "dispatch_response")
MAX_ID_LENGTH = 128
PARSER_DEPTH_LIMIT = 1024

# Rate limits off: the fuzzer sends far more than a well-behaved client, and rate limiting is not
# what these properties are about (0 disables a limit).
NO_RATE_LIMITS = {"RATE_LIMIT_PER_SECOND": "0", "RATE_LIMIT_BURST": "0", "RATE_LIMIT_CLOSE_AFTER": "0"}

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- the oracle -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answer:
    kind: str  # "ack", "error" or "none"
    code: str = ""
    ref: str | None = None  # the ack's id, or the error's expected ref


def is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return -(2**63) < value < 2**63
    return math.isfinite(value)


def utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def number_ok(low: float | None = None, high: float | None = None) -> Callable[[Any], bool]:
    return lambda v: is_number(v) and (low is None or v >= low) and (high is None or v <= high)


def text_ok(max_length: int, *, non_empty: bool = True) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and (bool(v) or not non_empty) and len(v) <= max_length and utf8(v)


# field -> (check, required), from the table "Client messages" in docs/PROTOCOL.md.
SCHEMAS: dict[str, dict[str, tuple[Callable[[Any], bool], bool]]] = {
    "heartbeat_ack": {"timestamp": (number_ok(), False)},
    "location_update": {
        "latitude": (number_ok(-90, 90), True),
        "longitude": (number_ok(-180, 180), True),
        "heading": (number_ok(0, 360), False),
        "speed": (number_ok(0), False),
        "accuracy": (number_ok(0), False),
        "timestamp": (number_ok(0), True),
        "isAvailable": (lambda v: isinstance(v, bool), False),
        "tripId": (text_ok(MAX_ID_LENGTH), False),
    },
    "dispatch_response": {
        "requestId": (text_ok(MAX_ID_LENGTH), True),
        "action": (lambda v: isinstance(v, str) and v in ("accept", "reject"), True),
        "reason": (text_ok(1024, non_empty=False), False),
    },
}


def expected_answer(frame: str | bytes, user_type: str) -> Answer:
    """What the contract says the gateway answers to `frame` from a `user_type` connection."""
    if isinstance(frame, bytes):
        return Answer("error", "INVALID_JSON")
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        return Answer("error", "INVALID_JSON")
    ident = data.get("id") if isinstance(data, dict) else None
    ref = ident if isinstance(ident, str) and len(ident) <= MAX_ID_LENGTH and utf8(ident) else None

    def error(code: str) -> Answer:
        return Answer("error", code, ref)

    if not isinstance(data, dict):
        return error("INVALID_MESSAGE")
    kind = data.get("type")
    payload = data.get("payload", {})
    if not isinstance(kind, str) or not kind or not isinstance(payload, dict):
        return error("INVALID_MESSAGE")
    if ident is not None and (not isinstance(ident, str) or not 0 < len(ident) <= MAX_ID_LENGTH or not utf8(ident)):
        return error("INVALID_MESSAGE")
    if kind not in SCHEMAS:
        return error("UNKNOWN_TYPE")
    if kind in ("location_update", "dispatch_response") and user_type not in MOVING:
        return error("FORBIDDEN")
    for name, (check, required) in SCHEMAS[kind].items():
        if (name not in payload and required) or (name in payload and not check(payload[name])):
            return error("INVALID_MESSAGE")
    return Answer("ack", ref=ident) if ident is not None else Answer("none")


# --- talking to the gateway -------------------------------------------------------------------


def write(client: Client, data: str | bytes, *, binary: bool = False) -> None:
    """Queue a frame as it is (bytes with binary=False go out as a text frame, not validated)."""
    future = client.ws.write_message(data, binary=binary)
    future.add_done_callback(lambda f: f.exception())  # a write to a dropped connection is not an error here


class Prober:
    """One connection per user type, kept across Hypothesis examples and reopened when dropped."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.clients: dict[str, Client] = {}
        self.sent = 0

    async def client(self, user_type: str) -> Client:
        if user_type not in self.clients:
            self.clients[user_type] = await self.gateway.connect(unique("fuzz"), user_type, device_id="fuzz")
        return self.clients[user_type]

    def forget(self, user_type: str) -> None:
        client = self.clients.pop(user_type, None)
        if client is not None:
            client.close()

    async def exchange(self, frame: str | bytes, user_type: str, *, binary: bool = False) -> list[dict[str, Any]]:
        """Send `frame`, then a probe; return the frames that answered `frame` (the probe's ack excluded)."""
        client = await self.client(user_type)
        client.frames.clear()
        self.sent += 1
        probe = f"probe-{self.sent}"
        write(client, frame, binary=binary)
        write(client, json.dumps({"type": "heartbeat_ack", "payload": {}, "id": probe}))
        replies: list[dict[str, Any]] = []
        try:
            while True:
                reply = await client.recv(timeout=5)
                if reply["type"] == "ack" and reply["payload"] == {"id": probe}:
                    return replies
                replies.append(reply)
        except (ConnectionError, TimeoutError) as exc:
            code = client.ws.close_code
            self.forget(user_type)
            raise AssertionError(f"connection lost after {frame!r:.300} (close code {code}, got {replies})") from exc
        finally:
            assert self.gateway.proc is not None and self.gateway.proc.poll() is None, "the gateway process died"

    def close(self) -> None:
        for user_type in list(self.clients):
            self.forget(user_type)


@pytest.fixture
async def prober(make_gateway: Callable[..., GatewayProcess]) -> AsyncIterator[Prober]:
    gateway = make_gateway(NO_RATE_LIMITS)
    probe = Prober(gateway)
    yield probe
    probe.close()
    assert gateway.proc is not None and gateway.proc.poll() is None, "the gateway process died"


def assert_answer(expected: Answer, replies: list[dict[str, Any]], frame: str | bytes) -> None:
    where = f"frame {frame!r:.400}"
    if expected.kind == "none":
        assert replies == [], f"{where}: expected no answer, got {replies}"
        return
    assert len(replies) == 1, f"{where}: expected exactly one {expected}, got {replies}"
    reply = replies[0]
    assert set(reply) == {"type", "payload", "id", "timestamp"}, f"{where}: not an envelope: {reply}"
    if expected.kind == "ack":
        assert (reply["type"], reply["payload"]) == ("ack", {"id": expected.ref}), f"{where}: expected ack: {reply}"
        return
    assert reply["type"] == "error", f"{where}: expected error {expected.code}, got {reply}"
    payload = reply["payload"]
    assert payload["code"] == expected.code, f"{where}: expected {expected.code}, got {payload}"
    assert isinstance(payload["message"], str) and payload["message"], f"{where}: error without message: {payload}"
    assert payload.get("ref") == expected.ref, f"{where}: expected ref {expected.ref!r}, got {payload}"


async def check(prober: Prober, frame: str | bytes, user_type: str = "driver", *, binary: bool = False) -> None:
    expected = expected_answer(frame, user_type)
    event(f"expected answer: {expected.kind} {expected.code}".strip())  # shown by --hypothesis-show-statistics
    assert_answer(expected, await prober.exchange(frame, user_type, binary=binary), frame)


# --- strategies -------------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([10**400, -(10**400), 2**1024, -(2**1024), 2**1024 - 1, 10**4000])
INTS = st.one_of(st.integers(), st.integers(min_value=-(2**1100), max_value=2**1100), HUGE_INTS)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([1.7976931348623157e308, -1.7976931348623157e308, 5e-324, -0.0]))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, st.text(max_size=30))
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)


def mostly(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any], tenths: int = 8) -> st.SearchStrategy[Any]:
    """`usual` about `tenths` times in ten, else `other`: keeps valid frames common enough to reach every rule."""
    return st.integers(0, 9).flatmap(lambda n: usual if n < tenths else other)


VALID_IDS = st.text(min_size=1, max_size=MAX_ID_LENGTH)
BAD_IDS = st.one_of(st.just(""), st.text(min_size=MAX_ID_LENGTH + 1, max_size=MAX_ID_LENGTH + 40), JSON_VALUES)


def around(low: float | None, high: float | None) -> st.SearchStrategy[Any]:
    """Numbers inside, at and just beyond a range, as ints and floats."""
    edges = [v for b in (low, high) if b is not None for v in (b, math.nextafter(b, -math.inf),
                                                                math.nextafter(b, math.inf), int(b))]
    inside = st.floats(min_value=low, max_value=high, allow_nan=False)
    return st.one_of(inside, st.integers(min_value=None if low is None else math.ceil(low),
                                         max_value=None if high is None else math.floor(high)),
                     st.sampled_from(edges or [0]))


VALID_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "heartbeat_ack": {"timestamp": around(0, None)},
    "location_update": {
        "latitude": around(-90, 90), "longitude": around(-180, 180), "heading": around(0, 360),
        "speed": around(0, None), "accuracy": around(0, None), "timestamp": around(0, None),
        "isAvailable": st.booleans(), "tripId": st.text(min_size=1, max_size=MAX_ID_LENGTH),
    },
    "dispatch_response": {
        "requestId": st.text(min_size=1, max_size=MAX_ID_LENGTH), "action": st.sampled_from(["accept", "reject"]),
        "reason": st.text(max_size=1030),
    },
}


def payloads(kind: str) -> st.SearchStrategy[Any]:
    """Payloads for `kind`: its fields, each usually valid, sometimes missing or a random (wrongly typed) value,
    plus unknown fields; or any JSON value at all."""
    fields = VALID_FIELDS.get(kind, {})

    @st.composite
    def known(draw: st.DrawFn) -> dict[str, Any]:
        payload = draw(st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=3))
        for name, valid in fields.items():
            if draw(st.integers(0, 9)) < 8:
                payload[name] = draw(mostly(valid, JSON_VALUES, 9))
            else:
                payload.pop(name, None)
        return payload

    return mostly(known(), JSON_VALUES, 9)


TYPES = mostly(st.sampled_from(CLIENT_TYPES),
               st.one_of(st.sampled_from(["ack", "error", "heartbeat", "connected", "HEARTBEAT_ACK", "ride_request",
                                          "heartbeat_ack ", ""]), st.text(max_size=20), JSON_VALUES), 7)


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(TYPES)
    frame: dict[str, Any] = {"type": kind} if draw(st.integers(0, 19)) else {}
    if draw(st.integers(0, 9)):
        frame["payload"] = draw(payloads(kind if isinstance(kind, str) else ""))
    choice = draw(st.integers(0, 9))
    if choice < 5:
        frame["id"] = draw(VALID_IDS)
    elif choice < 7:
        frame["id"] = draw(BAD_IDS)
    elif choice < 8:
        frame["id"] = None
    frame.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in frame), JSON_VALUES, max_size=2)))
    return frame


# Text without digits, quotes or '-', so Python's json and the gateway's (more lenient) parser agree
# on whether it is JSON: the leniency (leading zeros, "1.", raw control characters in strings) lives there.
GARBAGE = st.text(alphabet=st.sampled_from(list("[]{}:, \n\tNaIfinitytruefalsnul<>#;'xyz\\/é😀")), max_size=40)


@st.composite
def not_json(draw: st.DrawFn) -> str:
    valid = json.dumps(draw(st.one_of(st.lists(JSON_VALUES, min_size=1, max_size=3),
                                      st.dictionaries(st.text(max_size=5), JSON_VALUES, min_size=1, max_size=3))))
    return draw(st.one_of(
        st.just(valid[:-1]),                                           # truncated container
        st.sampled_from(["x", "<", "'", "#", "//", "{,"]).map(lambda junk: junk + valid),
        st.sampled_from(["x", ",", "}", "]", "{}", "\x00"]).map(lambda junk: valid + junk),
        st.just(valid.replace('"', "'")),                              # single quotes
        GARBAGE,
        st.sampled_from(["", " ", "nan", "inf", "-NaN", "+1", ".5", "tru", "undefined", "{'type': 'heartbeat_ack'}",
                         '{"type": "heartbeat_ack",}', '{"type" "heartbeat_ack"}', '"\\x"', "\ufeff{}"]),
    ))


# --- properties -------------------------------------------------------------------------------


@FUZZ
@given(value=JSON_VALUES, user_type=st.sampled_from(USER_TYPES))
async def test_any_json_value_gets_its_contract_answer_and_the_connection_survives(
        prober: Prober, value: Any, user_type: str) -> None:
    await check(prober, json.dumps(value), user_type)


@settings(FUZZ, max_examples=300)
@given(frame=envelopes(), user_type=st.sampled_from(USER_TYPES))
async def test_envelopes_of_every_type_get_their_contract_answer_and_the_connection_survives(
        prober: Prober, frame: dict[str, Any], user_type: str) -> None:
    await check(prober, json.dumps(frame), user_type)


BOUNDS: dict[str, tuple[float, float | None]] = {"latitude": (-90, 90), "longitude": (-180, 180), "heading": (0, 360),
                                                "speed": (0, None), "accuracy": (0, None), "timestamp": (0, None)}
REQUIRED_NUMBERS = ("latitude", "longitude", "timestamp")


def within(low: float, high: float | None) -> st.SearchStrategy[Any]:
    floats = st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)
    ints = st.integers(min_value=int(low), max_value=None if high is None else int(high))
    edges = [low, *([] if high is None else [high]), *([-0.0] if low == 0 else [])]
    return mostly(st.sampled_from(edges), st.one_of(floats, ints), 4)  # the bounds themselves, often


def beyond(low: float, high: float | None) -> st.SearchStrategy[Any]:
    outside = [math.nextafter(low, -math.inf), low - 1]
    if high is not None:
        outside += [math.nextafter(high, math.inf), high + 1]
    return st.sampled_from(outside) | st.floats(max_value=low, exclude_max=True, allow_nan=False,
                                                allow_infinity=False)


@st.composite
def location_payloads(draw: st.DrawFn) -> dict[str, Any]:
    """Every number within its bounds, or exactly one of them just beyond."""
    payload = {name: draw(within(*bounds)) for name, bounds in BOUNDS.items()
               if name in REQUIRED_NUMBERS or draw(st.booleans())}
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(payload)))
        payload[name] = draw(beyond(*BOUNDS[name]))
    return payload


@settings(FUZZ, max_examples=200)
@given(payload=location_payloads(), user_type=st.sampled_from(MOVING))
async def test_location_updates_within_their_bounds_are_acked_and_beyond_them_invalid(
        prober: Prober, payload: dict[str, Any], user_type: str) -> None:
    await check(prober, json.dumps({"type": "location_update", "id": "loc", "payload": payload}), user_type)


@FUZZ
@given(text=not_json(), user_type=st.sampled_from(USER_TYPES))
async def test_text_that_is_not_json_gets_invalid_json_and_the_connection_survives(
        prober: Prober, text: str, user_type: str) -> None:
    assume(expected_answer(text, user_type).code == "INVALID_JSON")  # the garbage text is sometimes JSON ("[]")
    await check(prober, text, user_type)


@settings(FUZZ, max_examples=100)
@given(data=st.one_of(st.binary(max_size=200), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                      st.just(b'{"type": "heartbeat_ack", "payload": {}, "id": "bin"}')))
async def test_binary_frames_get_invalid_json_and_the_connection_survives(prober: Prober, data: bytes) -> None:
    await check(prober, data, binary=True)


@settings(FUZZ, max_examples=60)
@given(depth=st.one_of(st.integers(1, 600), st.integers(PARSER_DEPTH_LIMIT + 1, 10_000)),
       opener=st.sampled_from(["[", '{"a":']), balanced=st.booleans(), inside_payload=st.booleans(),
       user_type=st.sampled_from(USER_TYPES))
async def test_deep_nesting_gets_invalid_json_beyond_the_parser_limit_and_the_connection_survives(
        prober: Prober, depth: int, opener: str, balanced: bool, inside_payload: bool, user_type: str) -> None:
    closer = "]" if opener == "[" else "}"
    leaf = "[]" if opener == "[" else "{}"
    nested = opener * depth + leaf + closer * depth if balanced else opener * depth
    frame = ('{"type": "heartbeat_ack", "id": "deep", "payload": {"unknown": ' + nested + "}}"
             if inside_payload else nested)
    assert len(frame) < 65536, "frames stay under MAX_MESSAGE_SIZE (above it the answer is close 1009)"
    total_depth = depth + 1 + (2 if inside_payload else 0)
    if not balanced or total_depth > PARSER_DEPTH_LIMIT:
        expected = Answer("error", "INVALID_JSON")
    elif inside_payload:
        expected = Answer("ack", ref="deep")  # unknown fields are ignored, however deep
    else:
        expected = Answer("error", "INVALID_MESSAGE")  # JSON, but not an object / not an envelope
    assert_answer(expected, await prober.exchange(frame, user_type), frame)


NON_FINITE_LITERALS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400 + ".0", "1E+999"]
NUMBER_TARGETS = [("heartbeat_ack", "timestamp"),
                  *(("location_update", f) for f in ("latitude", "longitude", "heading", "speed", "accuracy",
                                                     "timestamp"))]
UNKNOWN_TARGETS = [("heartbeat_ack", "unknown"), ("location_update", "altitude")]


@settings(FUZZ, max_examples=100)
@given(literal=st.sampled_from(NON_FINITE_LITERALS), target=st.sampled_from(NUMBER_TARGETS + UNKNOWN_TARGETS))
async def test_nan_infinity_and_overflowing_literals_are_refused_in_number_fields_and_ignored_elsewhere(
        prober: Prober, literal: str, target: tuple[str, str]) -> None:
    kind, field = target
    payload: dict[str, Any] = {"latitude": 1.5, "longitude": 2.5, "timestamp": 1767000000000} \
        if kind == "location_update" else {}
    payload[field] = "<literal>"
    frame = json.dumps({"type": kind, "id": "n1", "payload": payload}).replace('"<literal>"', literal)
    expected = expected_answer(frame, "driver")
    assert expected == (Answer("error", "INVALID_MESSAGE", "n1") if target in NUMBER_TARGETS
                        else Answer("ack", ref="n1"))  # the raw literal parsed as meant
    await check(prober, frame, "driver")


INVALID_UTF8 = st.sampled_from([b"\xff", b"\xfe", b"\xc0\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80",
                                b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xbf\xbf"])


@settings(FUZZ, max_examples=40)
@given(head=st.text(max_size=20).map(str.encode), bad=INVALID_UTF8, tail=st.text(max_size=20).map(str.encode),
       inside_json=st.booleans())
async def test_invalid_utf8_in_a_text_frame_closes_that_connection_with_1007_and_the_gateway_keeps_serving(
        prober: Prober, head: bytes, bad: bytes, tail: bytes, inside_json: bool) -> None:
    data = head + bad + tail
    bystander = await prober.client("rider")  # another connection, open before the bad frame
    if inside_json:
        data = b'{"type": "heartbeat_ack", "id": "' + data.replace(b'"', b"").replace(b"\\", b"") + b'"}'
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    client = await prober.client("driver")
    write(client, data)  # the bytes as they are, with the text opcode
    code, frames = await client.closed(timeout=5)
    prober.forget("driver")
    assert code == 1007, f"expected close code 1007 (invalid UTF-8), got {code}"
    assert [f for f in frames if f["type"] != "heartbeat"] == [], "no answer to a frame that is not UTF-8"
    assert prober.gateway.proc is not None and prober.gateway.proc.poll() is None, "the gateway process died"
    assert (await prober.gateway.http("GET", "/health"))[0] == 200
    await check(prober, json.dumps({"type": "heartbeat_ack", "id": "after"}), "driver")  # a new connection works
    assert prober.clients["rider"] is bystander
    await check(prober, json.dumps({"type": "heartbeat_ack", "id": "bystander"}), "rider")  # and the others too


# --- regressions: the minimal inputs of the bugs this fuzzer found --------------------------


async def test_integer_beyond_double_range_in_a_number_field_is_invalid_message(prober: Prober) -> None:
    frame = '{"type": "heartbeat_ack", "id": "big", "payload": {"timestamp": 1' + "0" * 400 + "}}"
    replies = await prober.exchange(frame, "rider")
    assert [(r["type"], r["payload"]["code"], r["payload"].get("ref")) for r in replies] == [
        ("error", "INVALID_MESSAGE", "big")]


@pytest.mark.parametrize(("kind", "payload"), [
    ("location_update", {"latitude": 1, "longitude": 2, "timestamp": 1, "tripId": "\ud800"}),
    ("dispatch_response", {"requestId": "\ud800", "action": "accept"}),
    ("dispatch_response", {"requestId": "r1", "action": "reject", "reason": "\udc00"}),
])
async def test_lone_surrogate_in_a_forwarded_string_field_is_invalid_message(
        prober: Prober, kind: str, payload: dict[str, Any]) -> None:
    frame = json.dumps({"type": kind, "id": "s1", "payload": payload})  # ASCII: the surrogate as a \u escape
    replies = await prober.exchange(frame, "driver")
    assert [(r["type"], r["payload"]["code"]) for r in replies] == [("error", "INVALID_MESSAGE")]


@pytest.mark.parametrize("frame", [
    {"type": "heartbeat_ack", "id": "\ud800"},
    {"type": "no_such_type", "id": "\ud800"},
    {"type": "heartbeat_ack", "payload": 5, "id": "\udc00"},
])
async def test_lone_surrogate_in_the_id_gets_an_error_and_keeps_the_connection(
        prober: Prober, frame: dict[str, Any]) -> None:
    replies = await prober.exchange(json.dumps(frame), "driver")
    assert [(r["type"], r["payload"]["code"]) for r in replies] == [("error", "INVALID_MESSAGE")]
