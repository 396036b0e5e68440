"""Where the Redis CPU of one `FCALL <prefix>_publish` goes: the history library as the gateway loads it, next to
variants of it with one part taken out, and a plain PUBLISH (issue #9: a recorded message within 1.5x the CPU of a
PUBLISH; docs/BENCHMARKS.md, "the floor of a recording function").

A variant is the library with a few lines of `history_redis.LIBRARY_BODY` replaced; none of them is a correct
function (they skip validation, keep no seq, ...), they only price a part. When the library changes so that a
variant's lines are no longer there, the script says which and stops: edit the variant, do not trust an old table.

One run: a redis-server of its own (scripts/redis_costs.start_redis, stopped by pid), a subscriber holding the
users' channels and draining them (the gateway's side of every PUBLISH), then rounds in which every case sends the
same number of `ride_status` messages to random users in pipelines of `--depth`, interleaved so that a machine that
gets busier shifts every case alike. The figure is Redis's own CPU (used_cpu_user + used_cpu_sys) per call, less
its idle CPU, median of the rounds.

    python scripts/function_floor.py                 # ~1 minute
    python scripts/function_floor.py --rounds 7 --calls 100000
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench import calibrate  # noqa: E402 - needs ROOT on sys.path when run as a file
from scripts.redis_costs import (  # noqa: E402
    KEYS,
    OwnRedis,
    Resp,
    encode,
    idle_cpu_per_s,
    run_pipelined,
    start_redis,
    stop_redis,
    subscriber,
)
from tornado_gateway.history_redis import LIBRARY_BODY, render_library  # noqa: E402

USERS = 3_000  # as bench.py --quick
RECORD = "local function record(user_id, raw)\n"
CHECK = "  local kind, id, expires, stamp, message = check_message(raw, time)\n"
READ_META = "  local epoch, last, has_ids, refreshed = current_epoch(meta)\n"
WRITE_SEQ = "    call('HSET', meta, 'seq', seq_text)\n"
APPEND = "  local length = call('RPUSH', list, data)\n"


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    replacements: tuple[tuple[str, str], ...]


VARIANTS = (
    Variant("publish_only", "FCALL of a function that only PUBLISHes the message: the price of a function call",
            ((RECORD, RECORD + "  call(PUBLISH_COMMAND, user_channel(user_id), raw)\n  do return 1 end\n"),)),
    Variant("time_publish", "... and reads TIME first",
            ((RECORD, RECORD + "  local time = call('TIME')\n  call(PUBLISH_COMMAND, user_channel(user_id), raw)\n"
              "  do return 1 end\n"),)),
    Variant("no_validation", "the library without validating the message (no decode, no checks)",
            ((CHECK, "  local kind, id, expires, stamp, message = 'ride_status', nil, nil, now_text(time), {}\n"),)),
    Variant("decode_only", "the library validating by the JSON decode alone",
            ((CHECK, "  local ok, message = decode(raw)\n"
                     "  local kind, id, expires, stamp = message.type, nil, nil, now_text(time)\n"),)),
    Variant("no_meta", "the library without reading and writing the user's meta hash (HMGET + HSET)",
            ((READ_META, "  local epoch, last, has_ids, refreshed = 'e', '5', false, ttl_window(time)\n"),
             (WRITE_SEQ, "\n"))),
    Variant("no_append", "the library without appending the record to the history list (RPUSH)",
            ((APPEND, "  local length = 5\n"),)),
)


def variant_source(variant: Variant) -> str:
    body = LIBRARY_BODY
    for old, new in variant.replacements:
        if body.count(old) != 1:
            raise SystemExit(f"variant {variant.name}: the library no longer has exactly one {old.strip()!r}; "
                             "update the variant")
        body = body.replace(old, new)
    source, _ = render_library(KEYS, size=100, ttl_s=300, max_message_size=65536)
    return source.replace(LIBRARY_BODY, body)


def message(n: int) -> bytes:
    """What bench.py's FCALL step sends: a ride_status without producer id or timestamp."""
    return (b'{"type":"ride_status","payload":{"rideId":"r","status":"driver_arriving","sentAt":1764567890123456,'
            b'"n":%d,"phase":"fcall-16000"}}' % n)


def commands(kind: str, calls: int, rng: random.Random) -> list[bytes]:
    users = [f"u{rng.randrange(USERS)}" for _ in range(calls)]
    if kind == "publish":
        return [encode("PUBLISH", KEYS.user_channel(u), message(i)) for i, u in enumerate(users)]
    return [encode("FCALL", KEYS.function("publish"), 1, u, message(i)) for i, u in enumerate(users)]


def measure(own: OwnRedis, conn: Resp, sources: dict[str, str], args: argparse.Namespace,
            idle: float) -> dict[str, list[float]]:
    rng = random.Random(7)
    samples: dict[str, list[float]] = {name: [] for name in ("publish", *sources)}
    for round_ in range(args.rounds):
        for name in samples:
            if name != "publish":
                own.control.call("FUNCTION", "LOAD", "REPLACE", sources[name])
                own.control.call("FLUSHDB")
            kind = "publish" if name == "publish" else "fcall"
            sample = run_pipelined(own, conn, commands(kind, args.calls, rng), args.depth, [kind], 1, idle)
            samples[name].append(sample.total_us)
        print(f"round {round_ + 1}/{args.rounds}: "
              + ", ".join(f"{name} {values[-1]:.2f}" for name, values in samples.items()), flush=True)
    return samples


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--calls", type=int, default=60_000, help="calls per case per round (default 60,000)")
    parser.add_argument("--depth", type=int, default=32, help="commands per pipeline (default 32)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sources = {"library": render_library(KEYS, size=100, ttl_s=300, max_message_size=65536)[0]}
    sources.update((variant.name, variant_source(variant)) for variant in VARIANTS)
    calibration = calibrate()
    own = start_redis(cluster=False)
    try:
        _sub, _drain = subscriber(own, "SUBSCRIBE", [KEYS.user_channel(f"u{i}") for i in range(USERS)])
        conn = Resp(own.port)
        samples = measure(own, conn, sources, args, idle_cpu_per_s(own))
    finally:
        stop_redis(own)
    what = {"publish": "PUBLISH of the same message (live-only)",
            "library": "FCALL of the library as the gateway loads it"}
    what.update((variant.name, variant.what) for variant in VARIANTS)
    print(f"\nRedis CPU per call, median of {args.rounds} interleaved rounds of {args.calls:,} calls "
          f"(pipelines of {args.depth}, {USERS:,} subscribed users; calibration {calibration:.0f} ms)\n")
    print("| case | Redis us per call | rounds |\n| --- | ---: | --- |")
    for name, values in samples.items():
        print(f"| {what[name]} | {statistics.median(values):.2f} | {' '.join(f'{v:.2f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
