"""Over-saturation: stop a stage early when the server falls ever further behind."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OverloadRule:
    """Backlog = requests due (their arrival time has passed) but not finished.

    A server that keeps up has a backlog that hovers around rate × latency (Little's law);
    an over-saturated one has a backlog that grows every window. Stop when it has grown in
    each of the last `windows` windows, to at least `min_backlog` and `growth`× its size
    at the start of those windows: the remaining requests would only measure queueing.
    """

    window_s: float = 2.0
    windows: int = 4
    min_backlog: int = 16
    growth: float = 2.0
    samples: list[int] = field(default_factory=list)

    def observe(self, backlog: int) -> str | None:
        """Feed one window's backlog; returns a reason when the stage should stop."""
        self.samples.append(backlog)
        recent = self.samples[-(self.windows + 1) :]
        if len(recent) <= self.windows:
            return None
        rising = all(b > a for a, b in zip(recent, recent[1:], strict=False))
        if rising and backlog >= self.min_backlog and backlog >= self.growth * max(recent[0], 1):
            return (
                f"over-saturated: backlog grew {recent[0]} -> {backlog} requests over "
                f"{self.windows * self.window_s:.0f}s"
            )
        return None
