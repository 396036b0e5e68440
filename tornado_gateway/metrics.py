"""StatsD metrics, aggregated in memory and flushed once a second.

A UDP send per message would cost a syscall on the hot path, so counters are
summed locally, timers are sampled (at most `MAX_TIMER_SAMPLES` per name per
flush) and gauges keep their last value; `flush()` sends them in one StatsD
pipeline. No method here blocks or raises: a metrics outage must never become
a gateway outage.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import statsd

log = logging.getLogger(__name__)

MAX_TIMER_SAMPLES = 200

# Catalogue (README "Metrics" lists each with its meaning).
CONNECTIONS_OPENED = "connections.opened"
CONNECTIONS_CLOSED = "connections.closed.{reason}"
CONNECTIONS_ACTIVE = "connections.active.{user_type}"
CONNECTIONS_TOTAL = "connections.active.total"
USERS_UNIQUE = "users.unique"
CONNECT_REJECTED = "connections.rejected.{code}"
AUTH_FAILURES = "auth.failures"
MESSAGES_IN = "messages.in.{type}"
MESSAGES_OUT = "messages.out.{type}"
MESSAGES_DROPPED = "messages.dropped.{reason}"
ERRORS = "errors.{code}"
BROADCAST_REQUESTS = "broadcast.requests.{status}"
REDIS_PUBLISH_MS = "redis.publish_ms"
REDIS_ERRORS = "redis.errors"
REDIS_RECONNECTS = "redis.reconnects"
HEARTBEAT_TICK_MS = "heartbeat.tick_ms"
HEARTBEATS_SENT = "heartbeats.sent"
MESSAGES_RECORDED = "messages.recorded"
MESSAGES_DUPLICATE = "messages.duplicate"
MESSAGES_REPLAYED = "messages.replayed"
MESSAGES_EXPIRED = "messages.expired"
RESUMES = "resumes.{outcome}"
DELIVERY_MS = "delivery_ms.{type}"
MESSAGES_GAP_FILLED = "messages.gap_filled"
GAPS_UNFILLED = "messages.gaps_unfilled"
PROBE_MS = "redis.probe_ms"
PROBE_FAILURES = "redis.probe_failures"


class Metrics:
    __slots__ = ("_client", "_counters", "_gauges", "_timers")

    def __init__(self, host: str | None, port: int, prefix: str) -> None:
        self._client: statsd.StatsClient | None = None
        if host:
            try:
                self._client = statsd.StatsClient(host, port, prefix=prefix)
            except Exception:  # noqa: BLE001 - an unresolvable host disables metrics, it must not stop startup
                log.warning("statsd host %s:%s unusable; metrics disabled", host, port)
        self._counters: defaultdict[str, int] = defaultdict(int)
        self._gauges: dict[str, float] = {}
        self._timers: defaultdict[str, list[float]] = defaultdict(list)

    def incr(self, name: str, count: int = 1) -> None:
        self._counters[name] += count

    def gauge(self, name: str, value: float) -> None:
        self._gauges[name] = value

    def timing(self, name: str, ms: float) -> None:
        samples = self._timers[name]
        if len(samples) < MAX_TIMER_SAMPLES:
            samples.append(ms)

    def flush(self) -> None:
        counters, gauges, timers = self._counters, self._gauges, self._timers
        self._counters, self._gauges, self._timers = defaultdict(int), {}, defaultdict(list)
        if self._client is None:
            return
        try:
            pipe = self._client.pipeline()
            for name, count in counters.items():
                pipe.incr(name, count)
            for name, value in gauges.items():
                pipe.gauge(name, value)
            for name, samples in timers.items():
                for ms in samples:
                    pipe.timing(name, ms)
            pipe.send()
        except Exception:
            log.debug("statsd flush failed", exc_info=True)
