"""Capped exponential backoff with jitter, for every reconnect and retry loop."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with full jitter (so a fleet does not reconnect in lockstep)."""

    __slots__ = ("base_s", "cap_s", "attempt")

    def __init__(self, base_s: float = 0.1, cap_s: float = 2.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** self.attempt))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
