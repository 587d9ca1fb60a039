"""Open-loop arrival schedules: absolute send offsets drawn from a seed."""

from __future__ import annotations

import math

import numpy as np

ARRIVAL_KINDS = ("poisson", "gamma", "constant")


def inter_arrival_times(
    n: int, rate: float, kind: str = "poisson", burstiness: float = 1.0, seed: int = 0
) -> np.ndarray:
    """`n` gaps (s) between arrivals at mean `rate` req/s.

    gamma: shape=burstiness, scale=1/(rate*burstiness) as in vLLM, so the mean gap is 1/rate
    and the coefficient of variation 1/sqrt(burstiness) (<1 burstier, 1 Poisson, >1 smoother).
    """
    if kind not in ARRIVAL_KINDS:
        raise ValueError(f"unknown arrival kind {kind!r}; choose from {ARRIVAL_KINDS}")
    if n <= 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(n)
    if rate <= 0:
        raise ValueError("request rate must be > 0")
    rng = np.random.default_rng(seed)
    if kind == "constant":
        return np.full(n, 1.0 / rate)
    shape = 1.0 if kind == "poisson" else burstiness
    if shape <= 0:
        raise ValueError("burstiness must be > 0")
    return rng.gamma(shape=shape, scale=1.0 / (rate * shape), size=n)


def arrival_offsets(
    n: int, rate: float, kind: str = "poisson", burstiness: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Absolute send times (s from start) of `n` requests; the first goes at 0."""
    gaps = inter_arrival_times(n, rate, kind, burstiness, seed)
    if n == 0:
        return gaps
    # Absolute times, not sleeps: a late send never shifts the ones after it.
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def arrival_offsets_for_duration(
    duration_s: float, rate: float, kind: str = "poisson", burstiness: float = 1.0, seed: int = 0
) -> np.ndarray:
    """All arrival times that fall inside [0, duration_s)."""
    if math.isinf(rate):
        raise ValueError("a duration-bound open loop needs a finite rate")
    n = max(16, int(rate * duration_s * 1.5) + 16)
    while True:
        offsets = arrival_offsets(n, rate, kind, burstiness, seed)
        if offsets[-1] >= duration_s:
            return offsets[offsets < duration_s]
        n *= 2  # same seed, longer draw: the prefix is unchanged
