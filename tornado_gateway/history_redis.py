"""History in Redis: one function library per prefix, one atomic function call per step.

Why a Redis FUNCTION library rather than EVALSHA scripts: services in any language record with
`FCALL gateway_publish 1 <userId> <message JSON>` without shipping or hashing a script, and
Redis Cluster routes that call by its one key, the bare userId. The function derives the real key
names from it (`redis_keys.Keys.history*`, the same hash slot by construction); they are not
passed as keys, so the call stays the one-liner section 7.1 documents.

Seq assignment, dedupe, append, trim, expiry refresh and the PUBLISH happen in one call: two
instances recording for one user at once cannot hand out the same seq or leave a gap, and a
record is never published without being stored (or stored without being published).

Services call the functions without the gateway's settings, so HISTORY_SIZE, HISTORY_TTL,
MAX_MESSAGE_SIZE and the prefix are baked into the rendered source; every instance sharing a
prefix must run with the same values (the last one to load wins).

The Lua decodes a message only to validate it and never re-encodes it (cjson turns [] into {}
and rounds numbers to 14 digits); records are built by string concatenation around the
producer's bytes, in the format `history.record_bytes` documents.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any, Final

from .bus import BusUnavailable
from .history import (
    EMPTY_USER_REASON,
    EXPIRED_REASON,
    EXPIRES_AT_REASON,
    INVALID_MESSAGE_PREFIX,
    LATEST_VALUE_TYPES,
    MAX_SAFE_INTEGER,
    NOT_JSON_REASON,
    SPLICE_ID,
    SPLICE_KEYS,
    SPLICE_TIMESTAMP,
    UNKNOWN_TYPE_REASON,
    Position,
    RecordResult,
    Replay,
    refusal,
    require_since,
)
from .messages import MAX_ID_LENGTH, SERVICE_REQUIRED_FIELDS
from .redis_keys import Keys
from .resp import Commands, PipelinedClient, RedisReplyError, RedisUnavailable

log = logging.getLogger(__name__)

#: What Redis answers (after "ERR ") when a function is not loaded: Redis restarted
#: empty, or someone ran FUNCTION FLUSH.
FUNCTION_NOT_FOUND: Final = "Function not found"

UNRECORDABLE_USER_REASON: Final = ("this userId has a '}' but no hash tag: on a Redis Cluster its history cannot "
                                   "share the slot of the bare userId, so messages to it are not recorded")

# The library body; render_library() puts the constants (FN, HISTORY_HEAD, HISTORY_SIZE, ...) above it.
# KEYS[1] of every function is the bare userId: see the module docstring.
LIBRARY_BODY: Final = r"""
local DIGITS = '0123456789abcdefghijklmnopqrstuvwxyz'
local ASCII_ONLY = '^[^\128-\255]*$'
local EXPIRES_AT = '^{"recorded":{"seq":%d+,"epoch":"%w*","expiresAt":(%d+)'

-- A global costs a table lookup or two at every use (30 ns: a microsecond per call, all told), so the
-- ones used on every call are upvalues, bound by every function before anything else (a library's
-- load-time code cannot reach the globals).
local call, find, byte, sub, type, tonumber, next, null = nil, nil, nil, nil, nil, nil, nil, nil
local function bind_globals()
  call, find, byte, sub, type, tonumber, next = redis.call, string.find, string.byte, string.sub, _G.type, _G.tonumber,
    _G.next
  null = cjson.null
end

-- A cjson of the library's own, with invalid numbers off: the shared one takes NaN, Infinity, hex
-- and +1, which the gateway's parser refuses (the message would be stored, then never delivered).
-- This replaced a Lua walk over the text outside strings that cost a quarter of the function.
-- Made on first use: a library's load-time code cannot reach cjson.
local strict_json = nil
local function decode(raw)
  if not strict_json then
    strict_json = cjson.new()
    strict_json.decode_invalid_numbers(false)
  end
  return pcall(strict_json.decode, raw)
end

-- Whether `letter` follows a digit somewhere in raw. Plain searches (memchr) and a look at the byte
-- before: an unanchored pattern search costs about 20 ns per byte of the message.
local function after_digit(raw, letter)
  local i = find(raw, letter, 2, true)
  while i do
    local before = byte(raw, i - 1)
    if before >= 48 and before <= 57 then return true end
    i = find(raw, letter, i + 1, true)
  end
  return false
end

-- It still turns 1e999 (or 309 digits) into inf; only an exponent or a long digit run can
-- overflow, so the walk over the decoded message is left to those.
local function may_overflow(raw)
  return after_digit(raw, 'e') or after_digit(raw, 'E') or (#raw > 300 and find(raw, LONG_DIGITS) ~= nil)
end

-- cjson passes string bytes through unchecked; a WebSocket text frame must be UTF-8. All-ASCII (the
-- common case) is one anchored match, a third of the cost of searching for the first high byte.
local function utf8_ok(raw)
  if find(raw, ASCII_ONLY) then return true end
  local i = find(raw, '[\128-\255]')
  while i do
    local lead, extra = byte(raw, i), nil
    if lead >= 194 and lead <= 223 then extra = 1
    elseif lead >= 224 and lead <= 239 then extra = 2
    elseif lead >= 240 and lead <= 244 then extra = 3
    else return false end
    for k = 1, extra do
      local byte = byte(raw, i + k)
      if not byte or byte < 128 or byte > 191 then return false end
    end
    local second = byte(raw, i + 1)  -- no overlong forms, no surrogates, nothing past U+10FFFF
    if (lead == 224 and second < 160) or (lead == 237 and second > 159) or (lead == 240 and second < 144)
        or (lead == 244 and second > 143) then
      return false
    end
    i = find(raw, '[\128-\255]', i + extra + 1)
  end
  return true
end

local function all_finite(value)
  if type(value) == 'number' then return value == value and value ~= math.huge and value ~= -math.huge end
  if type(value) == 'table' then
    for _, item in pairs(value) do
      if not all_finite(item) then return false end
    end
  end
  return true
end

local function absent(value) return value == nil or value == null end

local function integral(value)
  return type(value) == 'number' and value == math.floor(value) and value >= 0 and value <= MAX_SAFE_INTEGER
end

local function utf8_length(text)
  local _, count = string.gsub(text, '[^\128-\191]', '')
  return count
end

local function int_text(number) return string.format('%.0f', number) end

-- text + 1 for the decimal text of a whole number: most of the time without a number-to-text
-- conversion (printf, 0.4 us; the seq is kept and sent as text).
local NEXT_DIGIT = {['0'] = '1', ['1'] = '2', ['2'] = '3', ['3'] = '4', ['4'] = '5', ['5'] = '6', ['6'] = '7',
                    ['7'] = '8', ['8'] = '9'}
local function next_text(text)
  local digit = NEXT_DIGIT[sub(text, -1)]
  if digit then return sub(text, 1, -2) .. digit end
  return int_text(tonumber(text) + 1)
end

local function base36(number)
  local out = ''
  repeat
    local digit = number % 36
    out = sub(DIGITS, digit + 1, digit + 1) .. out
    number = (number - digit) / 36
  until number == 0
  return out
end

local function now_ms(time) return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) end

-- now_ms(time) as text, made of TIME's own digits (no number conversions).
local function now_text(time)
  local micros = time[2]
  if #micros < 6 then micros = sub('00000', #micros) .. micros end
  return time[1] .. sub(micros, 1, 3)
end

-- The keys of a history expire HISTORY_TTL after its last record at the earliest, and at most
-- TTL_MARGIN_S later: the expiry is not refreshed on every record but once per TTL_MARGIN_S window
-- of the clock (the seconds of TIME without their last TTL_MARGIN_DIGITS digits), to the end of
-- the window plus HISTORY_TTL. Every record in that window is then kept for HISTORY_TTL at least.
-- TTL_MARGIN_DIGITS < 0 (HISTORY_TTL under 10 s): refreshed on every record, to now + HISTORY_TTL.
local function ttl_window(time)
  if TTL_MARGIN_DIGITS < 0 then return nil end
  if TTL_MARGIN_DIGITS == 0 then return time[1] end
  return sub(time[1], 1, -1 - TTL_MARGIN_DIGITS)
end

local function expiry_text(window, time)
  if not window then return int_text(now_ms(time) + HISTORY_TTL_MS) end
  return int_text((tonumber(window) + 1) * TTL_MARGIN_S * 1000 + HISTORY_TTL_MS)
end

-- Seconds then microseconds (4 digits), base 36, like history.epoch_at.
local function new_epoch(time)
  local micros = base36(tonumber(time[2]))
  return base36(tonumber(time[1])) .. string.rep('0', 4 - #micros) .. micros
end

-- Redis Cluster's hash tag rule, as Keys.hash_tag.
local function hash_tag(text)
  local open = find(text, '{', 1, true)
  if not open then return nil end
  local close = find(text, '}', open + 1, true)
  if not close or close == open + 1 then return nil end
  return sub(text, open + 1, close - 1)
end

-- The list and meta keys of a user, named as Keys.history and history_meta; ids_key below is
-- Keys.history_ids, made only when needed (a string made is 0.1 us, and most records need no ids).
local function history_keys(user_id)
  if not find(user_id, '}', 1, true) then
    local list = HISTORY_HEAD .. user_id .. '}'
    return list, list .. ':meta'
  end
  local head = HISTORY_HEAD .. (hash_tag(user_id) or '') .. '}:'
  return head .. 'list:' .. user_id, head .. 'meta:' .. user_id
end

local function ids_key(user_id)
  if not find(user_id, '}', 1, true) then return HISTORY_HEAD .. user_id .. '}:ids' end
  return HISTORY_HEAD .. (hash_tag(user_id) or '') .. '}:ids:' .. user_id
end

-- Keys.user_channel: in a cluster the channel carries the userId's hash tag, so the SPUBLISH stays
-- in the slot this call was routed to.
local function user_channel(user_id)
  if not CLUSTER then return USER_HEAD .. user_id end
  if not find(user_id, '}', 1, true) then return USER_HEAD .. '{' .. user_id .. '}' end
  return USER_HEAD .. '{' .. (hash_tag(user_id) or '') .. '}:' .. user_id
end

-- What the record needs of a valid message: its type, producer id (or nil), expiresAt (or nil),
-- timestamp as text and the decoded message; for an invalid one nil and the reason (the same words as
-- history.check_message). Values, not a table: one table less per call.
local function check_message(raw, time)
  if type(raw) ~= 'string' then return nil, NOT_JSON_REASON end
  if #raw > MAX_MESSAGE_SIZE then
    return nil, 'message is ' .. #raw .. ' bytes, over MAX_MESSAGE_SIZE (' .. MAX_MESSAGE_SIZE .. ')'
  end
  local ok, message = decode(raw)
  if not ok or not utf8_ok(raw) or (may_overflow(raw) and not all_finite(message)) then
    return nil, NOT_JSON_REASON
  end
  if type(message) ~= 'table' or not find(raw, '^[ \t\n\r]*{') then return nil, 'body must be a JSON object' end
  local kind = message.type
  if type(kind) ~= 'string' or not REQUIRED[kind] then return nil, UNKNOWN_TYPE_REASON .. ' ' .. TYPE_NAMES end
  local payload = message.payload
  if type(payload) ~= 'table' or type((next(payload))) == 'number' then return nil, 'payload must be an object' end
  local required, missing = REQUIRED[kind], nil
  for i = 1, #required do
    if absent(payload[required[i]]) then
      missing = missing or {}
      missing[#missing + 1] = required[i]
    end
  end
  if missing then return nil, kind .. ' payload is missing ' .. table.concat(missing, ', ') end
  local id, expires, stamp = message.id, message.expiresAt, message.timestamp
  if id == null then
    id = nil
  elseif id ~= nil and (type(id) ~= 'string' or id == '' or utf8_length(id) > MAX_ID_LENGTH) then
    return nil, 'id must be a UTF-8 string of 1..' .. MAX_ID_LENGTH .. ' characters'
  end
  if expires == null then
    expires = nil
  elseif expires ~= nil then
    if not integral(expires) then return nil, EXPIRES_AT_REASON end
    if expires <= now_ms(time) then return nil, EXPIRED_REASON end
  end
  if type(stamp) == 'number' and stamp == stamp and stamp >= 0 and stamp <= MAX_SAFE_INTEGER then
    stamp = int_text(math.floor(stamp))
  else
    stamp = now_text(time)
  end
  return kind, id, expires, stamp, message
end

-- history.splice_flags, as text for the record's head, or nil: whether the gateway may send the
-- producer's bytes with a tail appended (SPLICE_ID, SPLICE_TIMESTAMP, both, or '0': only seq).
local function splice_flags(raw, message, expires)
  if byte(raw, -1) ~= 125 then return nil end  -- '}'
  for key, value in next, message do
    if not SPLICE_KEYS[key] or value == null then return nil end
  end
  local receipt, stamp = message.receipt, message.timestamp
  if receipt ~= nil and receipt ~= true then return nil end
  if expires and not find(raw, '"expiresAt":' .. int_text(expires), 1, true) then return nil end
  if stamp == nil then
    if message.id == nil then return SPLICE_BOTH end
    return SPLICE_TIMESTAMP
  end
  if not integral(stamp) or not find(raw, '"timestamp":' .. int_text(stamp), 1, true) then return nil end
  if message.id == nil then return SPLICE_ID end
  return '0'
end

-- A producer id as a JSON string, as history.record_bytes (ujson) writes it: cjson also escapes '/'
-- and DEL, so the runs between those are encoded on their own and the two are left as they are.
local function id_json(id)
  if not find(id, '[/\127]') then return cjson.encode(id) end
  return '"' .. string.gsub(id, '[^/\127]+', function(run) return sub(cjson.encode(run), 2, -2) end) .. '"'
end

-- history.record_bytes, byte for byte, in one concatenation; the id is the producer's (escaped by
-- id_json) or, without one, made of epoch and seq (nothing to escape).
local function record_text(seq_text, epoch, id, expires, stamp, raw, kind, splice)
  local expiry, id_text = '', nil
  if expires then expiry = ',"expiresAt":' .. int_text(expires) end
  if id then id_text = id_json(id) else id_text = '"' .. epoch .. '-' .. seq_text .. '"' end
  if splice then
    return '{"recorded":{"seq":' .. seq_text .. ',"epoch":"' .. epoch .. '"' .. expiry .. ',"type":"' .. kind
      .. '","splice":' .. splice .. ',"id":' .. id_text .. ',"timestamp":' .. stamp .. '},"message":' .. raw .. '}'
  end
  return '{"recorded":{"seq":' .. seq_text .. ',"epoch":"' .. epoch .. '"' .. expiry .. ',"timestamp":'
    .. stamp .. ',"id":' .. id_text .. '},"message":' .. raw .. '}'
end

-- A Redis restored from an RDB snapshot (no AOF) may have taken a user's seq back while the epoch
-- survived: new messages would reuse seqs that clients already had, and be skipped by them. Such a
-- run of Redis gets its run id as generation, and a history written under another generation counts
-- as lost (a new epoch, `recovered: false`). Worked out on the first call after the library is
-- loaded, which Redis does afresh at every start. With AOF what comes back is what was acknowledged:
-- the generation stays ''. A clean RDB restart (nothing lost) pays a needless `recovered: false`.
-- A replica promoted by a failover (Sentinel, REPLICAOF NO ONE) holds what asynchronous replication
-- had brought it when the old primary died, AOF or not: the same problem, so its replication id,
-- new at the promotion, is the generation. Redis marks a promoted node with `second_repl_offset`.
-- Not kept while the node is a replica: a read-only call there must not settle it before a promotion.
local generation = nil
local function run_generation()
  if generation ~= nil then return generation end
  local replication = call('INFO', 'replication')
  local found
  if (string.match(replication, 'second_repl_offset:(%-?%d+)') or '-1') ~= '-1' then
    found = string.match(replication, 'master_replid:(%w+)') or ''
  else
    local persistence = call('INFO', 'persistence')
    local loaded = tonumber(string.match(persistence, 'rdb_last_load_keys_loaded:(%d+)') or '0')
    if string.match(persistence, 'aof_enabled:(%d)') == '1' or loaded == 0 then
      found = ''
    else
      found = string.match(call('INFO', 'server'), 'run_id:(%w+)') or ''
    end
  end
  if find(replication, 'role:master', 1, true) then generation = found end
  return found
end

-- The epoch, the last seq (as text), whether producer ids may be kept in this epoch, and the clock
-- window of the last expiry refresh (see ttl_window): an epoch starts with `noids` 1, so a history
-- written before that field existed still has its ids looked up. A history of another generation
-- is none at all (see run_generation).
local function current_epoch(meta)
  local row = call('HMGET', meta, 'epoch', 'seq', 'noids', 'gen', 'ttlw')
  if not row[1] or (row[4] or '') ~= run_generation() then return nil, '0', false, nil end
  return row[1], row[2] or '0', row[3] ~= '1', row[5]
end

-- A new run of the history; leftovers of an old run (a list that outlived its meta) carry its seqs.
local function start_epoch(user_id, list, meta, time)
  local epoch, window = new_epoch(time), ttl_window(time)
  call('DEL', list, ids_key(user_id))
  call('HSET', meta, 'epoch', epoch, 'seq', 0, 'noids', 1, 'gen', run_generation(), 'ttlw', window or '')
  call('PEXPIREAT', meta, expiry_text(window, time))
  return epoch, '0', false, window
end

-- seq, duplicate 0/1, epoch (false: delivered live, not recorded), the producer's id or nil, and the
-- seq as text; or nil and the reason the message is refused. Values, not a table (see check_message).
local function record(user_id, raw)
  if type(user_id) ~= 'string' or user_id == '' then return nil, EMPTY_USER_REASON end
  local time = call('TIME')
  local kind, id, expires, stamp, message = check_message(raw, time)
  if not kind then return nil, id end
  if HISTORY_SIZE == 0 or LATEST_VALUE[kind] then
    call(PUBLISH_COMMAND, user_channel(user_id), raw)
    return 0, 0, false, id
  end
  local list, meta = history_keys(user_id)
  local epoch, last, has_ids, refreshed = current_epoch(meta)
  if not epoch then epoch, last, has_ids, refreshed = start_epoch(user_id, list, meta, time) end
  if id then  -- looked up even when `noids` says none: an older release may be recording too
    local original = call('ZSCORE', ids_key(user_id), id)
    if original then return tonumber(original), 1, epoch, id end
  end
  -- Every call counts (about a microsecond each, a number-to-text conversion 0.4): the trim, the
  -- expiry refresh and everything about producer ids happen only when there is something to do.
  local seq_text = next_text(last)
  local seq = tonumber(seq_text)
  local window = ttl_window(time)
  local refresh = window == nil or window ~= refreshed
  local new_ids = id and not has_ids
  if refresh and new_ids then
    call('HSET', meta, 'seq', seq_text, 'ttlw', window or '', 'noids', '0')
  elseif refresh then
    call('HSET', meta, 'seq', seq_text, 'ttlw', window or '')
  elseif new_ids then
    call('HSET', meta, 'seq', seq_text, 'noids', '0')
  else
    call('HSET', meta, 'seq', seq_text)
  end
  has_ids = has_ids or new_ids
  local data = record_text(seq_text, epoch, id, expires, stamp, raw, kind, splice_flags(raw, message, expires))
  -- Trimmed in batches: the list holds up to HISTORY_SIZE + TRIM_SLACK records, since_function
  -- serves the last HISTORY_SIZE of them.
  local length = call('RPUSH', list, data)
  if length > HISTORY_SIZE + TRIM_SLACK then call('LTRIM', list, TRIM_START, '-1') end
  local expiry = nil  -- when every key of the history expires: the end of the refreshed window + HISTORY_TTL
  if refresh or length == 1 or has_ids then expiry = expiry_text(window, time) end
  if has_ids then
    local ids = ids_key(user_id)
    if id then call('ZADD', ids, seq_text, id) end
    if seq > HISTORY_SIZE then call('ZREMRANGEBYSCORE', ids, '-inf', int_text(seq - HISTORY_SIZE)) end
    call('PEXPIREAT', ids, expiry)
  end
  if refresh or length == 1 then call('PEXPIREAT', list, expiry) end  -- 1: the list is new
  if refresh then call('PEXPIREAT', meta, expiry) end
  call(PUBLISH_COMMAND, user_channel(user_id), data)
  return seq, 0, epoch, id, seq_text
end

local function refused(reason) return redis.error_reply(INVALID_MESSAGE_PREFIX .. reason) end

local function one_key(keys)
  if not call then bind_globals() end
  if #keys ~= 1 then return redis.error_reply('ERR expects exactly 1 key: the userId') end
end

-- FCALL <prefix>_record 1 <userId> <message JSON> -> {seq, duplicate 0/1, epoch or nil, message id}
local function record_function(keys, args)
  local bad = one_key(keys)
  if bad then return bad end
  local seq, duplicate, epoch, id, seq_text = record(keys[1], args[1])
  if not seq then return refused(duplicate) end
  if not id then id = epoch and (epoch .. '-' .. seq_text) or '' end
  return {seq, duplicate, epoch, id}
end

-- FCALL <prefix>_publish 1 <userId> <message JSON> -> seq (0: delivered live, not recorded)
local function publish_function(keys, args)
  local bad = one_key(keys)
  if bad then return bad end
  local seq, reason = record(keys[1], args[1])
  if not seq then return refused(reason) end
  return seq
end

-- FCALL <prefix>_position 1 <userId> -> {epoch, seq}; the epoch is created when there is none.
local function position_function(keys)
  local bad = one_key(keys)
  if bad then return bad end
  local list, meta = history_keys(keys[1])
  local epoch, seq = current_epoch(meta)
  if not epoch then epoch, seq = start_epoch(keys[1], list, meta, call('TIME')) end
  return {epoch, tonumber(seq)}
end

-- FCALL_RO <prefix>_since 1 <userId> <epoch> <since> -> {recoverable 0/1, epoch ('' if none), seq, records...}
local function since_function(keys, args)
  local bad = one_key(keys)
  if bad then return bad end
  local after = tonumber(args[2])
  if not after or after < 0 or after ~= math.floor(after) then
    return redis.error_reply('ERR since must be an integer >= 0')
  end
  local list, meta = history_keys(keys[1])
  local epoch, seq_text = current_epoch(meta)
  if not epoch then return {0, '', 0} end
  local seq = tonumber(seq_text)
  local kept = math.min(call('LLEN', list), HISTORY_SIZE)
  if epoch ~= args[1] or after > seq or after < seq - kept then return {0, epoch, seq} end
  local reply = {1, epoch, seq}
  if after == seq then return reply end
  local now = now_ms(call('TIME'))
  for _, data in ipairs(call('LRANGE', list, after - seq, -1)) do
    local expires = tonumber(string.match(data, EXPIRES_AT))
    if not expires or expires > now then reply[#reply + 1] = data end
  end
  return reply
end

redis.register_function(FN .. '_record', record_function)
redis.register_function(FN .. '_publish', publish_function)
redis.register_function(FN .. '_position', position_function)
redis.register_function{function_name = FN .. '_since', callback = since_function, flags = {'no-writes'}}
"""


def lua_string(text: str) -> str:
    """A Lua literal for any text: bytes outside a safe set become decimal escapes."""
    safe = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:.-, "
    return "'" + "".join(chr(b) if b in safe else f"\\{b}" for b in text.encode()) + "'"


def ttl_margin_digits(ttl_s: float) -> int:
    """How the function keeps HISTORY_TTL (see ttl_window in the Lua): the expiry is refreshed once
    per 10**n s window of the clock, n returned here, so a history is dropped between HISTORY_TTL
    and HISTORY_TTL + 10**n s after its last record (at most a tenth of HISTORY_TTL, at most 10 s).
    -1: refreshed on every record (HISTORY_TTL under 10 s). Two PEXPIREs per record cost 2 us."""
    return 1 if ttl_s >= 100 else 0 if ttl_s >= 10 else -1


def trim_slack(size: int) -> int:
    """Records the list may hold beyond HISTORY_SIZE before it is trimmed back to HISTORY_SIZE
    (a tenth): an LTRIM per record cost 1.5 us; readers never see more than HISTORY_SIZE."""
    return size // 10


def render_library(keys: Keys, *, size: int, ttl_s: float, max_message_size: int) -> tuple[str, str]:
    """The library source for these settings, and its version (a hash of the source).

    The version is served by `<prefix>_history_version`, so `load()` can tell in one cheap call
    whether Redis already runs exactly this source."""
    if size < 0 or ttl_s <= 0 or max_message_size <= 0:
        raise ValueError("HISTORY_SIZE must be >= 0, HISTORY_TTL and MAX_MESSAGE_SIZE > 0")
    margin_digits = ttl_margin_digits(ttl_s)
    required = ", ".join(f"[{lua_string(kind)}] = {{{', '.join(map(lua_string, fields))}}}"
                         for kind, fields in SERVICE_REQUIRED_FIELDS.items())
    latest = ", ".join(f"[{lua_string(kind)}] = true" for kind in sorted(LATEST_VALUE_TYPES))
    splice_keys = ", ".join(f"[{lua_string(key)}] = true" for key in sorted(SPLICE_KEYS))
    constants = "\n".join([
        f"local FN = {lua_string(keys.function_prefix())}",
        f"local HISTORY_HEAD = {lua_string(keys.prefix + ':history:{')}",
        f"local USER_HEAD = {lua_string(keys.prefix + ':user:')}",
        f"local CLUSTER = {'true' if keys.cluster else 'false'}",
        f"local PUBLISH_COMMAND = {lua_string('SPUBLISH' if keys.cluster else 'PUBLISH')}",
        f"local HISTORY_SIZE = {size}",
        f"local HISTORY_TTL_MS = {max(1, round(ttl_s * 1000))}",
        f"local TTL_MARGIN_DIGITS = {margin_digits}",
        f"local TTL_MARGIN_S = {10 ** max(0, margin_digits)}",
        f"local TRIM_SLACK = {trim_slack(size)}",
        f"local SPLICE_KEYS = {{{splice_keys}}}",
        f"local SPLICE_ID, SPLICE_TIMESTAMP = '{SPLICE_ID}', '{SPLICE_TIMESTAMP}'",
        f"local SPLICE_BOTH = '{SPLICE_ID | SPLICE_TIMESTAMP}'",
        f"local TRIM_START = '{-size}'",
        f"local MAX_MESSAGE_SIZE = {max_message_size}",
        f"local MAX_ID_LENGTH = {MAX_ID_LENGTH}",
        f"local MAX_SAFE_INTEGER = {MAX_SAFE_INTEGER}",
        f"local LONG_DIGITS = '{'%d' * 300}'",  # a 300-digit run (load-time code cannot call string.rep)
        f"local REQUIRED = {{{required}}}",
        f"local TYPE_NAMES = {lua_string(', '.join(SERVICE_REQUIRED_FIELDS))}",
        f"local LATEST_VALUE = {{{latest}}}",
        f"local INVALID_MESSAGE_PREFIX = {lua_string(INVALID_MESSAGE_PREFIX)}",
        f"local NOT_JSON_REASON = {lua_string(NOT_JSON_REASON)}",
        f"local UNKNOWN_TYPE_REASON = {lua_string(UNKNOWN_TYPE_REASON)}",
        f"local EXPIRES_AT_REASON = {lua_string(EXPIRES_AT_REASON)}",
        f"local EXPIRED_REASON = {lua_string(EXPIRED_REASON)}",
        f"local EMPTY_USER_REASON = {lua_string(EMPTY_USER_REASON)}",
    ])
    source = f"#!lua name={keys.history_library()}\n{constants}\n{LIBRARY_BODY}"
    version = hashlib.sha1(source.encode()).hexdigest()
    source += (f"redis.register_function{{function_name = FN .. '_history_version', "
               f"callback = function() return '{version}' end, flags = {{'no-writes'}}}}\n")
    return source, version


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _data(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class RedisHistory:
    """`History` over the library; the gateway calls `load()` at start and after every reconnect.

    Calls ride the gateway's pipelined hiredis connection (resp.PipelinedClient), not redis-py's
    pool: a connect storm makes one `position` call per connection, and through the pool each
    concurrent call checked out (or opened) a connection of its own. Measured side by side with
    the release before (docs/BENCHMARKS.md), moving the calls here took memory per idle connection
    from 3.52 to 3.15 KB and CPU per new connection from 0.55 to 0.49 ms."""

    def __init__(self, commands: Commands, keys: Keys, size: int, ttl_s: float,
                 max_message_size: int) -> None:
        self._commands = commands
        self._keys = keys
        self._source, self._version = render_library(keys, size=size, ttl_s=ttl_s, max_message_size=max_message_size)
        self._record = keys.function("record")
        self._position = keys.function("position")
        self._since = keys.function("since")
        self._version_function = keys.function("history_version")

    async def load(self) -> None:
        """Make sure Redis runs this exact library; one read-only call when it already does.

        FUNCTION LOAD REPLACE is atomic, so instances loading at once, or a service calling the
        function meanwhile, see either the old library or the new one. Raises BusUnavailable."""
        try:
            nodes = await self._commands.nodes()  # in a Redis Cluster, every primary
            await asyncio.gather(*(self._load_on(node) for node in nodes))
        except (RedisUnavailable, RedisReplyError) as exc:
            raise BusUnavailable(f"loading the history functions failed: {exc}") from None

    async def _load_on(self, node: PipelinedClient) -> None:
        if await self._loaded_version(node) == self._version:
            return
        await node.call("FUNCTION", "LOAD", "REPLACE", self._source)
        log.info("loaded Redis function library %s (version %s)", self._keys.history_library(), self._version[:12])

    async def _loaded_version(self, node: PipelinedClient) -> str | None:
        try:
            return _text(await node.call("FCALL_RO", self._version_function, 0))
        except RedisReplyError as exc:
            if FUNCTION_NOT_FOUND in str(exc):
                return None
            raise

    async def record(self, user_id: str, message: bytes | str) -> RecordResult:
        if not self._keys.recordable(user_id):
            raise refusal(UNRECORDABLE_USER_REASON)
        seq, duplicate, epoch, message_id = await self._call(self._record, user_id, message)
        return RecordResult(seq=int(seq), epoch=None if epoch is None else _text(epoch), duplicate=bool(duplicate),
                            message_id=_text(message_id), recorded=int(seq) > 0)

    async def position(self, user_id: str) -> Position:
        epoch, seq = await self._call(self._position, user_id)
        return Position(epoch=_text(epoch), seq=int(seq))

    async def since(self, user_id: str, epoch: str, since: int) -> Replay:
        require_since(since)
        recoverable, current, seq, *records = await self._call(self._since, user_id, epoch, since, read_only=True)
        return Replay(recoverable=bool(recoverable), epoch=_text(current), seq=int(seq),
                      records=[_data(record) for record in records])

    async def _call(self, function: str, user_id: str, *args: str | bytes | int, read_only: bool = False) -> Any:
        """One FCALL; a missing library (Redis restarted empty, FUNCTION FLUSH) is loaded and the call retried once."""
        command = "FCALL_RO" if read_only else "FCALL"
        if not self._keys.recordable(user_id):
            raise BusUnavailable(UNRECORDABLE_USER_REASON)
        for attempt in (1, 2):
            try:
                return await self._commands.call(command, function, 1, user_id, *args)
            except RedisReplyError as exc:
                text = str(exc)
                if text.startswith(INVALID_MESSAGE_PREFIX):
                    raise refusal(text.removeprefix(INVALID_MESSAGE_PREFIX)) from None
                if FUNCTION_NOT_FOUND not in text or attempt == 2:
                    raise BusUnavailable(text) from None
                log.warning("history functions missing in Redis (restarted empty or flushed?): loading them")
            except RedisUnavailable as exc:
                raise BusUnavailable(str(exc)) from None
            await self.load()
        raise AssertionError("unreachable")
