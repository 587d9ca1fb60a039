"""A histogram the engine keeps across steps and ships in its stats, for /metrics to expose."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class StepHistogram:
    """Counts per bucket (`bounds` are upper bounds, a last +Inf bucket added), and the sum.
    Cumulative since the engine started, as Prometheus histograms are."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> StepHistogram:
        return StepHistogram(self.bounds, list(self.counts), self.sum)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of observations <= le) per bucket, "+Inf" last: Prometheus's buckets."""
        out, total = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts):
            total += n
            out.append((bound, total))
        return out


# vLLM's buckets for vllm:iteration_tokens_total (tokens computed by one engine step)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# pdserve:kv_transfer_seconds: one KV pull of a prompt, from a millisecond to a minute
KV_TRANSFER_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
                       10.0, 30.0, 60.0)
