"""Sweeps: one stage per request rate or concurrency, and an automatic rate sweep.

The automatic sweep first measures saturation throughput (all requests offered at once,
capped at --max-concurrency if given), then runs rates evenly spaced below it, so the
curve covers the range where a deployment is usable rather than guessed rates.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve.bench.overload import OverloadRule
from pdserve.bench.runner import LoadSpec

# Runs one stage under `load` and returns its result JSON (see report.build_result).
StageFn = Callable[[LoadSpec], dict[str, Any]]


@dataclass
class SweepResult:
    """All stages of a sweep, in the order run."""

    kind: str  # "request_rate" | "concurrency" | "auto"
    label: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    saturation: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def auto_rates(saturation_rps: float, n: int) -> list[float]:
    """`n` rates evenly spaced strictly below saturation: sat·k/(n+1), k = 1..n."""
    return [round(saturation_rps * k / (n + 1), 4) for k in range(1, n + 1)]


def _stage_load(base: LoadSpec, **changes: Any) -> LoadSpec:
    load = dataclasses.replace(base, **changes)
    if load.overload is not None:  # each stage judges its own backlog
        load.overload = dataclasses.replace(load.overload, samples=[])
    return load


def rate_sweep(stage: StageFn, base: LoadSpec, rates: list[float], label: str) -> SweepResult:
    """One stage per request rate, lowest first; once a stage is over-saturated the
    higher rates are skipped (they would only measure a growing queue)."""
    out = SweepResult("request_rate", label)
    for i, rate in enumerate(sorted(rates)):
        print(f"[sweep] stage {i + 1}/{len(rates)}: request rate {rate} req/s", file=sys.stderr)
        result = stage(_stage_load(base, request_rate=float(rate)))
        out.stages.append(result)
        if result.get("early_stop_reason"):
            out.skipped = [f"request rate {r}" for r in sorted(rates)[i + 1 :]]
            break
    return out


def concurrency_sweep(
    stage: StageFn, base: LoadSpec, concurrencies: list[int], label: str
) -> SweepResult:
    """One closed-loop stage per concurrency (requests offered as fast as slots free)."""
    out = SweepResult("concurrency", label)
    for i, c in enumerate(sorted(concurrencies)):
        print(f"[sweep] stage {i + 1}/{len(concurrencies)}: concurrency {c}", file=sys.stderr)
        out.stages.append(stage(_stage_load(base, request_rate=math.inf, max_concurrency=c)))
    return out


def auto_sweep(stage: StageFn, base: LoadSpec, num_rates: int, label: str) -> SweepResult:
    """Measure saturation throughput, then sweep `num_rates` rates below it."""
    print("[sweep] measuring saturation throughput", file=sys.stderr)
    sat = stage(_stage_load(base, request_rate=math.inf, overload=None))
    sat_rps = float(sat.get("request_throughput") or 0.0)
    if not sat_rps > 0:
        raise RuntimeError("saturation stage completed no request; nothing to sweep")
    out = rate_sweep(stage, base, auto_rates(sat_rps, num_rates), label)
    out.kind, out.saturation = "auto", sat
    return out


def default_overload() -> OverloadRule:
    """The early-stop rule sweeps use unless --no-early-stop."""
    return OverloadRule()
