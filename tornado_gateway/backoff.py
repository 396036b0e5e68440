"""Capped exponential backoff with jitter, for every reconnect and retry loop."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with jitter (so a fleet does not reconnect in lockstep).

    By default each delay is drawn from the upper half of the ceiling ("equal jitter"): the
    gateway's own retry loops want a floor, so a Redis that is down is not hammered. Clients pass
    `full_jitter=True` to draw from zero to the ceiling, which spreads a reconnect storm of many
    phones the widest (the AWS architecture blog's comparison of jitter strategies)."""

    __slots__ = ("base_s", "cap_s", "attempt", "full_jitter")

    def __init__(self, base_s: float = 0.1, cap_s: float = 2.0, *, full_jitter: bool = False) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self.full_jitter = full_jitter

    def next_delay(self) -> float:
        # The exponent stops growing at 64 (far past any cap): a client offline for hours would
        # otherwise reach 2**1024, which no float holds (OverflowError).
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 64)))
        self.attempt += 1
        return random.uniform(0.0 if self.full_jitter else ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
