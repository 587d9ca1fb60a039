"""A host's typical speed from repeated timings: the mean of the ones that were not stalls.

The profile used to keep the fastest of two timings (and of two serving probes) taken back to
back. On a shared VM that records the host's best moments: on the 2-core EPYC of 2026-12-07
one lone stream read 52, 48, 54, 68, 64, 61 ms a token over three minutes, and a validation
run predicted from the fastest under-predicted 34 of its 36 mean figures (by 18% at the
median). A run sees the host's average, so the profile spreads its repeats out (the runner's
timings in passes over every shape, half the time limit apart; the serving probes in rounds)
and averages them; only a stall (another process's burst: one timing far above the shape's
fastest) is dropped.
"""

from __future__ import annotations

import statistics

STALL_FACTOR = 1.5  # this far above its fastest repeat (or the fit: measure.fit_timed): a stall


def typical(samples: list[float]) -> float:
    """The mean of `samples` within STALL_FACTOR of the fastest."""
    if not samples:
        raise ValueError("no timings to average")
    floor = min(samples)
    return statistics.fmean(s for s in samples if s <= STALL_FACTOR * floor)
