"""The closed-form first cut (docs/PLANNER.md) against the simulator, on a few points."""

from __future__ import annotations

import pytest

from pdserve.planner.closed_form import colocated, disaggregated
from pdserve.planner.layouts import SimLayout
from pdserve.planner.simulate import simulate
from tests.planner.conftest import HOP_S, STEP, fixed_requests

POINTS = [(400, 32, 0.5), (400, 32, 2.0), (1600, 32, 0.3), (100, 64, 4.0), (800, 16, 1.0)]


@pytest.mark.parametrize(("prompt", "output", "rate"), POINTS)
def test_closed_form_agrees_with_the_simulator(profile, prompt, output, rate):
    requests = fixed_requests(150, prompt, output, rate)
    colo = simulate(SimLayout(colocated=1), profile, requests)
    pd = simulate(SimLayout(prefill=1, decode=1), profile, requests)
    est_colo = colocated(STEP, rate, prompt, output, HOP_S)
    est_pd = disaggregated(STEP, STEP, rate, rate, prompt, output,
                           profile.transfer_seconds(prompt), HOP_S)
    assert 1000 * est_colo.ttft_s == pytest.approx(colo["mean_ttft_ms"], rel=0.1)
    assert 1000 * est_pd.ttft_s == pytest.approx(pd["mean_ttft_ms"], rel=0.1)
    assert 1000 * est_pd.itl_s == pytest.approx(pd["mean_itl_ms"], rel=0.2)
    # the colocated ITL is the rough one: arrivals cluster (see docs/PLANNER.md)
    assert 1000 * est_colo.itl_s == pytest.approx(colo["mean_itl_ms"], rel=0.35)


def test_both_see_the_itl_benefit_grow_with_rate_times_prompt_length(profile):
    gains_sim, gains_cf = [], []
    for rate in (0.25, 1.0, 2.0):
        requests = fixed_requests(100, 400, 32, rate)
        colo = simulate(SimLayout(colocated=1), profile, requests)["mean_itl_ms"]
        pd = simulate(SimLayout(prefill=1, decode=1), profile, requests)["mean_itl_ms"]
        gains_sim.append(colo / pd)
        est = colocated(STEP, rate, 400, 32).itl_s / disaggregated(
            STEP, STEP, rate, rate, 400, 32, 0.0).itl_s
        gains_cf.append(est)
    assert gains_sim == sorted(gains_sim) and gains_cf == sorted(gains_cf)
