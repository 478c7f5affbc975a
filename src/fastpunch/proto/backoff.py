"""Reconnect delays: exponential backoff with full jitter (pure, RNG injected).

Attempt n waits a uniform random time in [0, min(cap, base * 2**n)], so a
fleet that lost its CCS at the same instant does not come back in one wave.
"""

from __future__ import annotations

import random as _random
from typing import Callable


class Backoff:
    def __init__(self, base: float = 0.5, cap: float = 30.0,
                 uniform: Callable[[float, float], float] = _random.uniform) -> None:
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap")
        self.base, self.cap, self.uniform = base, cap, uniform
        self.attempt = 0

    def ceiling(self) -> float:
        return min(self.cap, self.base * (2 ** min(self.attempt, 32)))

    def next_delay(self) -> float:
        delay = self.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
