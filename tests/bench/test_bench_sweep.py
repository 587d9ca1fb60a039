"""Sweep orchestration, with a stand-in stage function (no HTTP)."""

from __future__ import annotations

import math

import pytest

from pdserve.bench.overload import OverloadRule
from pdserve.bench.runner import LoadSpec
from pdserve.bench.sweep import auto_sweep, concurrency_sweep, rate_sweep


class FakeStage:
    """Serves at most `capacity` req/s; over-saturated (early stop) above it."""

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity
        self.loads: list[LoadSpec] = []

    def __call__(self, load: LoadSpec) -> dict:
        self.loads.append(load)
        offered = load.request_rate if math.isfinite(load.request_rate) else math.inf
        over = offered > self.capacity
        return {
            "request_rate": load.request_rate if math.isfinite(load.request_rate) else "inf",
            "max_concurrency": load.max_concurrency,
            "request_throughput": min(offered, self.capacity),
            "early_stop_reason": "over-saturated" if over and load.overload else None,
        }


BASE = LoadSpec(num_prompts=10, overload=OverloadRule(), progress=False)


def test_rate_sweep_runs_rates_in_order_and_skips_after_saturation():
    stage = FakeStage(capacity=5)
    out = rate_sweep(stage, BASE, [8, 1, 4, 16], "x")
    assert [s["request_rate"] for s in out.stages] == [1, 4, 8]
    assert out.skipped == ["request rate 16"]


def test_each_stage_gets_a_fresh_overload_rule():
    stage = FakeStage(capacity=100)
    rate_sweep(stage, BASE, [1, 2], "x")
    a, b = (load.overload for load in stage.loads)
    assert a is not b and a.samples == [] and BASE.overload.samples == []


def test_concurrency_sweep_is_closed_loop():
    stage = FakeStage(capacity=100)
    out = concurrency_sweep(stage, BASE, [4, 1], "x")
    assert [load.max_concurrency for load in stage.loads] == [1, 4]
    assert all(math.isinf(load.request_rate) for load in stage.loads)
    assert out.kind == "concurrency"


def test_auto_sweep_measures_saturation_then_spaces_rates_below_it():
    stage = FakeStage(capacity=10)
    out = auto_sweep(stage, BASE, 4, "x")
    assert out.saturation["request_throughput"] == 10
    assert [s["request_rate"] for s in out.stages] == pytest.approx([2, 4, 6, 8])
    assert stage.loads[0].overload is None  # the saturation stage is over-saturated on purpose
    assert not out.skipped


def test_overload_rule_needs_sustained_growth():
    rule = OverloadRule(window_s=1, windows=3, min_backlog=8)
    assert [rule.observe(b) for b in (2, 3, 2, 4, 5)] == [None] * 5  # noise, not a trend
    rule = OverloadRule(window_s=1, windows=3, min_backlog=8)
    reasons = [rule.observe(b) for b in (2, 4, 8, 16)]
    assert reasons[:3] == [None] * 3 and "over-saturated" in reasons[3]
