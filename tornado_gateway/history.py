"""Recorded messages (PROTOCOL.md section 7): per-user `seq`, `epoch`, history, replay, expiry, dedupe.

`History` is the interface the gateway talks to; `MemoryHistory` is the embedded single-instance
version (`REDIS_URL=memory://`) and `history_redis.RedisHistory` the real one, whose every record
is one Redis function call so that instances recording for the same user at once can never hand
out the same seq or leave a gap.

What is stored and published for a recorded message is a *record*: the producer's message JSON,
byte for byte, wrapped by string concatenation (never decoded and re-encoded, which would turn
`[]` into `{}` in Lua or round big numbers)::

    {"recorded":{"seq":7,"epoch":"t5x9k21a3f","expiresAt":1767000060000,"timestamp":1767000000000,
                 "id":"<message id>"},"message":<the producer's JSON, verbatim>}

`expiresAt` is present only when the message has one. A plain v1 envelope always has a top-level
`type` and a record never does, which is how `decode_record` tells them apart on a user channel.

A message that can reach clients as its own bytes plus a tail is recorded with a head that also has
`type` and `splice` (added after 31017ce; a gateway that does not know them reads the record as
before), with `id` and `timestamp` moved to its end::

    {"recorded":{"seq":7,"epoch":"t5x9k21a3f","type":"ride_request","splice":3,"id":"t5x9k21a3f-7",
                 "timestamp":1767000000000},"message":<the producer's JSON, verbatim>}

That is when its top-level keys are envelope fields (SPLICE_KEYS), none null, `receipt` (if any) is
true, and its `timestamp` and `expiresAt` (if any) are written as the integers the head holds. The
gateway then makes the frame from the producer's bytes without their last `}`, the head's own
`,"id":...` (if `splice` has SPLICE_ID) and `,"timestamp":...` (SPLICE_TIMESTAMP) text, and
`,"seq":7}`, instead of parsing and re-encoding the message. The recording step validated those
bytes strictly (JSON, UTF-8, finite numbers), which is what the re-encoding was for. Any other
message is parsed and re-encoded. The prefix up to `expiresAt` is the same in both forms: the since
function reads `expiresAt` there.
Live-only messages (latest-value types, or `HISTORY_SIZE=0`) are published verbatim, as a plain
envelope without `seq`, exactly like a service's own `PUBLISH`.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import ujson

from .errors import ErrorCode, ValidationError
from .flow import LATEST_WINS
from .messages import SERVICE_REQUIRED_FIELDS, dumps, now_ms, validate_service_message

#: Delivered live and never recorded: a replayed old position or ETA is worse than none (7.1).
LATEST_VALUE_TYPES: Final[frozenset[str]] = frozenset(LATEST_WINS)

#: Every refusal of the Redis functions starts with this, so callers in any language can map it.
INVALID_MESSAGE_PREFIX: Final = "INVALID_MESSAGE "

#: Reasons shared word for word by the Python check and the Lua one; their start selects the error code.
NOT_JSON_REASON: Final = "message is not valid JSON"
UNKNOWN_TYPE_REASON: Final = "type must be one of"
EXPIRES_AT_REASON: Final = "expiresAt must be an integer (ms since the epoch)"
EXPIRED_REASON: Final = "expiresAt has already passed"
EMPTY_USER_REASON: Final = "userId must not be empty"

#: Largest integer a double (Lua's only number type, and JavaScript's) holds exactly.
MAX_SAFE_INTEGER: Final = 2**53 - 1

_BASE36: Final = "0123456789abcdefghijklmnopqrstuvwxyz"

#: What a record starts with, and what ends its head (record_bytes).
RECORD_START: Final = b'{"recorded":'
RECORD_MESSAGE: Final = b',"message":'

#: The top-level keys a message may have and still be spliced; what `splice` says to append.
SPLICE_KEYS: Final = frozenset({"type", "payload", "id", "timestamp", "expiresAt", "receipt"})
SPLICE_ID: Final = 1
SPLICE_TIMESTAMP: Final = 2
SPLICE_ID_TEXT: Final = b',"id":'
SPLICE_TIMESTAMP_TEXT: Final = b',"timestamp":'


@dataclass(frozen=True, slots=True)
class RecordResult:
    """What `History.record` did with one message.

    `recorded` is false for live-only messages (then `seq` is 0 and `epoch` None); a duplicate is
    recorded (earlier), with the original `seq`. `message_id` is the id clients see: the producer's
    `id`, or one derived from epoch and seq; empty for a live-only message without an `id` (the
    gateway assigns one when it delivers it, as for a plain PUBLISH)."""

    seq: int
    epoch: str | None
    duplicate: bool
    message_id: str
    recorded: bool


@dataclass(frozen=True, slots=True)
class Position:
    """The user's current epoch and last recorded seq (0 if none): what `connected` reports."""

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Replay:
    """The answer to a resume request (7.2).

    `records` are the stored records with seq > `since`, oldest first, without those whose
    `expiresAt` has passed; empty when not recoverable. `epoch` is "" when the user has no
    history at all (then nothing is recoverable)."""

    recoverable: bool
    epoch: str
    seq: int
    records: list[bytes]


@dataclass(slots=True)
class Record:
    """A decoded record: either `frame` and `kind` (a record that can be spliced, see the module
    docstring; its message is not parsed) or `message`, the producer's message as ujson parses it
    ([] and big ints kept).

    Not frozen: one is built per recorded message delivered, and a frozen dataclass's __init__
    (object.__setattr__ per field) cost 0.9 us against 0.36 (timeit, this machine)."""

    seq: int
    epoch: str
    id: str
    timestamp: int
    message: dict[str, Any] | None
    expires_at: int | None = None
    frame: bytes | None = None
    kind: str | None = None


@dataclass(frozen=True, slots=True)
class CheckedMessage:
    """A service message that passed `check_message`, still as the producer's bytes."""

    raw: bytes
    kind: str
    producer_id: str | None
    timestamp: int
    expires_at: int | None
    splice: int | None


class History(Protocol):
    async def load(self) -> None:
        """Make the recording step available (Redis: the function library, again after Redis came
        back empty). Raises BusUnavailable while it cannot."""

    async def record(self, user_id: str, message: bytes | str) -> RecordResult:
        """Validate, number, store and publish one service message (the JSON `POST /broadcast` accepts).

        Raises ValidationError (with the reason) for a message the broadcast API would refuse, or
        whose `expiresAt` is not an integer or has passed. Latest-value types and `HISTORY_SIZE=0`
        are published live without a seq. A producer `id` already in the history is neither
        stored nor published again: the original seq comes back with `duplicate` set."""

    async def position(self, user_id: str) -> Position:
        """The user's epoch and last seq, creating the epoch if there is none.

        A user's epoch exists from the first connection on, so a client that got seq 0 and lost
        its socket before the first message can still resume with since=0."""

    async def since(self, user_id: str, epoch: str, since: int) -> Replay:
        """The records after `since`, if every one of them is still kept under `epoch`.

        Not recoverable when the epoch differs, `since` is beyond the current seq, or records
        after `since` were already trimmed. Raises ValueError for a negative `since`."""


# --- checks shared by both backends ----------------------------------------------------------


def check_message(message: bytes | str, *, max_message_size: int, now: int) -> CheckedMessage:
    """The broadcast API's checks plus the section 7 ones; the Lua in history_redis mirrors them.

    Also refuses what ujson parses but the gateway could not send on (NaN, Infinity, lone
    surrogates): the stored bytes are delivered, so they must be deliverable."""
    raw = _as_bytes(message)
    if len(raw) > max_message_size:
        raise ValidationError(f"message is {len(raw)} bytes, over MAX_MESSAGE_SIZE ({max_message_size})")
    data = _parse(raw)
    kind, _payload, producer_id, _stamp = validate_service_message(data)
    expires_at = _expires_at(data.get("expiresAt"), now)
    return CheckedMessage(raw=raw, kind=kind, producer_id=producer_id,
                          timestamp=producer_timestamp(data.get("timestamp"), now), expires_at=expires_at,
                          splice=splice_flags(data, raw, expires_at))


def _as_bytes(message: bytes | str) -> bytes:
    if isinstance(message, bytes):
        return message
    try:
        return message.encode()
    except UnicodeEncodeError:
        raise ValidationError(NOT_JSON_REASON, ErrorCode.INVALID_JSON) from None


def _parse(raw: bytes) -> Any:
    try:
        data = ujson.loads(raw)
        dumps(data)
    except (ValueError, OverflowError, RecursionError):  # UnicodeError is a ValueError
        raise ValidationError(NOT_JSON_REASON, ErrorCode.INVALID_JSON) from None
    return data


def _is_integral(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value == math.floor(value) and 0 <= value <= MAX_SAFE_INTEGER


def _expires_at(value: Any, now: int) -> int | None:
    if value is None:
        return None
    if not _is_integral(value):
        raise ValidationError(EXPIRES_AT_REASON)
    if value <= now:
        raise ValidationError(EXPIRED_REASON)
    return int(value)


def producer_timestamp(value: Any, now: int) -> int:
    """The producer's `timestamp` when it is a usable number (floored to ms), else now."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return now
    if not (math.isfinite(value) and 0 <= value <= MAX_SAFE_INTEGER):
        return now
    return math.floor(value)


def refusal(reason: str) -> ValidationError:
    """The ValidationError for a refusal reason, with the error code `POST /broadcast` would use."""
    if reason.startswith(NOT_JSON_REASON):
        return ValidationError(reason, ErrorCode.INVALID_JSON)
    if reason.startswith(UNKNOWN_TYPE_REASON):
        return ValidationError(reason, ErrorCode.UNKNOWN_TYPE)
    return ValidationError(reason)


def require_user(user_id: str) -> None:
    if not user_id:
        raise ValidationError(EMPTY_USER_REASON)


def require_since(since: int) -> None:
    if since < 0:
        raise ValueError("since must be an integer >= 0")


# --- the record format -----------------------------------------------------------------------


def generated_id(epoch: str, seq: int) -> str:
    """The id of a recorded message that came without one: unique per message, the same on every replay."""
    return f"{epoch}-{seq}"


def splice_flags(message: dict[str, Any], raw: bytes, expires_at: int | None) -> int | None:
    """What the gateway appends to `raw` to make the client frame (SPLICE_ID, SPLICE_TIMESTAMP), or
    None when the message must be parsed and re-encoded (the module docstring says when); the Lua
    mirrors it. `expires_at` is the checked one."""
    if raw[-1:] != b"}" or not SPLICE_KEYS.issuperset(message) or None in message.values():
        return None
    receipt, stamp = message.get("receipt"), message.get("timestamp")
    if receipt is not None and receipt is not True:
        return None
    if expires_at is not None and b'"expiresAt":%d' % expires_at not in raw:
        return None
    flags = 0 if "id" in message else SPLICE_ID
    if stamp is None:
        return flags | SPLICE_TIMESTAMP
    if not _is_integral(stamp) or b'"timestamp":%d' % stamp not in raw:
        return None
    return flags


def record_bytes(seq: int, epoch: str, message_id: str, timestamp: int, expires_at: int | None,
                 message: bytes, kind: str | None = None, splice: int | None = None) -> bytes:
    """Wrap the producer's bytes without touching them; the Lua builds the same bytes."""
    expiry = f',"expiresAt":{expires_at}' if expires_at is not None else ""
    start = f'{{"recorded":{{"seq":{seq},"epoch":"{epoch}"{expiry}'
    if splice is None:
        head = f'{start},"timestamp":{timestamp},"id":{dumps(message_id)}}}'
    else:
        head = f'{start},"type":"{kind}","splice":{splice},"id":{dumps(message_id)},"timestamp":{timestamp}}}'
    return head.encode() + RECORD_MESSAGE + message + b"}"


def spliced_frame(data: bytes, head_end: int, splice: int, seq: int) -> bytes | None:
    """The client frame of a spliced record (`head_end`: where its head's `}` ends); None if the
    head is not laid out as record_bytes writes it."""
    tail = b',"seq":%d}' % seq
    if splice & (SPLICE_ID | SPLICE_TIMESTAMP):
        first = SPLICE_ID_TEXT if splice & SPLICE_ID else SPLICE_TIMESTAMP_TEXT
        start = data.find(first, len(RECORD_START), head_end)
        stop = head_end - 1 if splice & SPLICE_TIMESTAMP else data.find(SPLICE_TIMESTAMP_TEXT, start, head_end)
        if start < 0 or stop < 0 or data.count(b',"', start, stop) != (2 if splice == 3 else 1):
            return None  # one field each: no more of the head than asked for
        tail = data[start:stop] + tail
    return data[head_end + len(RECORD_MESSAGE):-2] + tail


def decode_record(data: bytes) -> Record | None:
    """The record in `data`, or None when it is something else (a plain envelope, or not JSON).

    Only the head is parsed when the record can be spliced; otherwise ujson keeps [] and integers
    beyond 64 bits as they are, so the payload the gateway re-encodes from `message` is the one the
    producer sent. Run for every recorded message delivered: lookups that raise and `type() is`
    checks (which also keep bools out) instead of `.get()` and isinstance. The head ends at the first
    `,"message":`: inside a JSON string a quote is always escaped, so that text is never in one."""
    if not data.startswith(RECORD_START) or not data.endswith(b"}"):
        return None
    end = data.find(RECORD_MESSAGE, len(RECORD_START))
    if end < 0:
        return None
    try:
        head = ujson.loads(data[len(RECORD_START):end])
        seq, epoch, message_id, stamp = head["seq"], head["epoch"], head["id"], head["timestamp"]
    except (ValueError, OverflowError, RecursionError, KeyError, TypeError, IndexError):
        return None
    if type(seq) is not int or type(stamp) is not int or type(epoch) is not str or type(message_id) is not str:
        return None
    expires_at = head.get("expiresAt")
    if type(expires_at) is not int:
        expires_at = None
    splice, kind = head.get("splice"), head.get("type")
    if type(splice) is int and kind in SERVICE_REQUIRED_FIELDS:
        frame = spliced_frame(data, end, splice, seq)
        if frame is not None:
            return Record(seq, epoch, message_id, stamp, None, expires_at, frame, kind)
    try:
        message = ujson.loads(data[end + len(RECORD_MESSAGE):-1])
    except (ValueError, OverflowError, RecursionError):
        return None
    if type(message) is not dict:
        return None
    return Record(seq, epoch, message_id, stamp, message, expires_at)


def base36(number: int) -> str:
    digits = ""
    while True:
        number, digit = divmod(number, 36)
        digits = _BASE36[digit] + digits
        if number == 0:
            return digits


def epoch_at(micros: int) -> str:
    """Seconds then microseconds (4 digits), base 36: compact, and new for every loss of a history."""
    seconds, rest = divmod(micros, 1_000_000)
    return base36(seconds) + base36(rest).rjust(4, "0")


# --- the embedded version --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Kept:
    seq: int
    data: bytes
    expires_at: int | None
    producer_id: str | None


@dataclass(slots=True)
class _UserHistory:
    epoch: str
    deadline: float  # monotonic: when the whole history is dropped (HISTORY_TTL after the last record)
    seq: int = 0
    records: collections.deque[_Kept] = field(default_factory=collections.deque)
    ids: dict[str, int] = field(default_factory=dict)


class MemoryHistory:
    """Single-instance history for development without Redis, with the Redis version's behaviour.

    `publish(user_id, data)` is how recorded and live messages reach the embedded bus: it is
    called once per delivered message, synchronously, like the Redis function's PUBLISH."""

    def __init__(self, size: int, ttl_s: float, publish: Callable[[str, bytes], None], *,
                 max_message_size: int = 65536) -> None:
        if size < 0 or ttl_s <= 0:
            raise ValueError("HISTORY_SIZE must be >= 0 and HISTORY_TTL > 0")
        self._size = size
        self._ttl_s = ttl_s
        self._publish = publish
        self._max_message_size = max_message_size
        # Ordered by deadline (every refresh moves a user to the end), so dropping the expired
        # ones is a pop from the front and memory stays bounded by the users of the last TTL.
        self._users: collections.OrderedDict[str, _UserHistory] = collections.OrderedDict()
        self._last_epoch_us = 0

    async def load(self) -> None:
        return None  # nothing outside this process to load into

    async def record(self, user_id: str, message: bytes | str) -> RecordResult:
        require_user(user_id)
        checked = check_message(message, max_message_size=self._max_message_size, now=now_ms())
        if self._size == 0 or checked.kind in LATEST_VALUE_TYPES:
            self._publish(user_id, checked.raw)
            return RecordResult(seq=0, epoch=None, duplicate=False, message_id=checked.producer_id or "",
                                recorded=False)
        user = self._current(user_id) or self._start(user_id)
        if checked.producer_id is not None and checked.producer_id in user.ids:
            return RecordResult(seq=user.ids[checked.producer_id], epoch=user.epoch, duplicate=True,
                                message_id=checked.producer_id, recorded=True)
        user.seq += 1
        message_id = checked.producer_id or generated_id(user.epoch, user.seq)
        data = record_bytes(user.seq, user.epoch, message_id, checked.timestamp, checked.expires_at, checked.raw,
                            checked.kind, checked.splice)
        self._append(user, _Kept(user.seq, data, checked.expires_at, checked.producer_id))
        self._refresh(user_id, user)
        self._publish(user_id, data)
        return RecordResult(seq=user.seq, epoch=user.epoch, duplicate=False, message_id=message_id, recorded=True)

    async def position(self, user_id: str) -> Position:
        user = self._current(user_id) or self._start(user_id)
        return Position(epoch=user.epoch, seq=user.seq)

    async def since(self, user_id: str, epoch: str, since: int) -> Replay:
        require_since(since)
        user = self._current(user_id)
        if user is None:
            return Replay(recoverable=False, epoch="", seq=0, records=[])
        if epoch != user.epoch or since > user.seq or since < user.seq - len(user.records):
            return Replay(recoverable=False, epoch=user.epoch, seq=user.seq, records=[])
        now = now_ms()
        records = [kept.data for kept in user.records
                   if kept.seq > since and (kept.expires_at is None or kept.expires_at > now)]
        return Replay(recoverable=True, epoch=user.epoch, seq=user.seq, records=records)

    def _current(self, user_id: str) -> _UserHistory | None:
        self._drop_expired()
        return self._users.get(user_id)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        while self._users:
            user_id, user = next(iter(self._users.items()))
            if user.deadline > now:
                return
            del self._users[user_id]

    def _start(self, user_id: str) -> _UserHistory:
        user = _UserHistory(epoch=self._new_epoch(), deadline=0.0)
        self._refresh(user_id, user)
        return user

    def _refresh(self, user_id: str, user: _UserHistory) -> None:
        user.deadline = time.monotonic() + self._ttl_s
        self._users[user_id] = user
        self._users.move_to_end(user_id)

    def _append(self, user: _UserHistory, kept: _Kept) -> None:
        user.records.append(kept)
        if kept.producer_id is not None:
            user.ids[kept.producer_id] = kept.seq
        while len(user.records) > self._size:
            trimmed = user.records.popleft()
            if trimmed.producer_id is not None:
                user.ids.pop(trimmed.producer_id, None)

    def _new_epoch(self) -> str:
        """Time-based like the Redis one; never the same twice in this process."""
        self._last_epoch_us = max(time.time_ns() // 1000, self._last_epoch_us + 1)
        return epoch_at(self._last_epoch_us)
