"""Rate limits: token buckets per connection (inbound messages) and per client IP (upgrades). Pure.

Time is passed in (`now`, monotonic seconds) so the arithmetic is tested without sleeping.
"""

from __future__ import annotations

STRIKE_WINDOW_S = 10.0
IP_IDLE_FORGET_S = 60.0


class TokenBucket:
    """`rate` tokens per second up to `burst`; each message takes one."""

    __slots__ = ("at", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.at = now

    def take(self, rate: float, burst: float, now: float) -> bool:
        self.tokens = min(burst, self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class MessageLimiter:
    """Per-connection inbound limit, and the "persistent abuse" rule that turns into 4429."""

    __slots__ = ("bucket", "strikes", "window_start")

    def __init__(self, burst: float, now: float) -> None:
        self.bucket = TokenBucket(burst, now)
        self.strikes = 0
        self.window_start = now

    def allow(self, rate: float, burst: float, now: float) -> bool:
        return self.bucket.take(rate, burst, now)

    def strike(self, now: float, close_after: int) -> bool:
        """Count a rejected message; True when the client should be disconnected."""
        if now - self.window_start > STRIKE_WINDOW_S:
            self.window_start = now
            self.strikes = 0
        self.strikes += 1
        return close_after > 0 and self.strikes >= close_after


class ConnectLimiter:
    """Upgrade attempts per client IP. Buckets of IPs idle for a minute are forgotten (bounded memory)."""

    __slots__ = ("_buckets", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, ip: str, now: float) -> bool:
        if not self.enabled:
            return True
        bucket = self._buckets.get(ip)
        if bucket is None:
            bucket = self._buckets[ip] = TokenBucket(self.burst, now)
        return bucket.take(self.rate, self.burst, now)

    def prune(self, now: float) -> None:
        idle = [ip for ip, bucket in self._buckets.items() if now - bucket.at > IP_IDLE_FORGET_S]
        for ip in idle:
            del self._buckets[ip]

    def __len__(self) -> int:
        return len(self._buckets)
