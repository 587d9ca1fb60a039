"""What serving adds around the runner: the fit recovers known terms from what a client saw,
and the simulator charges them per step, per streamed token and per request."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.engine.step_time import StepShape
from pdserve.planner.layouts import SimLayout
from pdserve.planner.profile import Profile
from pdserve.planner.served import (
    MIN_FRACTION,
    OUTPUT_LEN,
    PROMPT_LEN,
    Probe,
    ServingOverhead,
    fit_overhead,
)
from pdserve.planner.simulate import simulate
from tests.planner.conftest import HOP_S, STEP, fixed_requests

OVERHEAD = ServingOverhead(step_s=0.003, row_s=0.0004, request_s=0.010, measured=True)


def _seen_decode(streams: int) -> Probe:
    shape = StepShape()
    for _ in range(streams):
        shape.add_decode(PROMPT_LEN + OUTPUT_LEN // 2)
    seen = STEP.seconds(shape) + OVERHEAD.step_s + OVERHEAD.row_s * streams
    return Probe(PROMPT_LEN, streams, 0.0, seen)


def _seen_first(prompt: int) -> Probe:
    shape = StepShape()
    shape.add_prefill(prompt, 0)
    seen = OVERHEAD.request_s + STEP.seconds(shape) + OVERHEAD.step_s + OVERHEAD.row_s
    return Probe(prompt, 1, seen, 0.0)


def test_the_fit_recovers_the_terms_a_client_would_see():
    fitted = fit_overhead(STEP, [_seen_decode(b) for b in (1, 4, 8)],
                          [_seen_first(n) for n in (32, 256)])
    assert fitted.measured
    assert fitted.step_s == pytest.approx(OVERHEAD.step_s)  # the fit recovers it exactly
    assert fitted.row_s == pytest.approx(OVERHEAD.row_s)
    assert fitted.request_s == pytest.approx(OVERHEAD.request_s)


def test_a_server_faster_than_the_runner_model_corrects_it_down_to_a_floor():
    fast = [dataclasses.replace(_seen_decode(b), decode_step_s=0.001) for b in (1, 4)]
    fitted = fit_overhead(STEP, fast, [dataclasses.replace(_seen_first(32), first_token_s=0)])
    assert fitted.step_s < 0 and fitted.row_s < 0 and fitted.request_s == 0.0
    runner_s = STEP.base_s + STEP.per_decode_row_s
    assert fitted.served_seconds(runner_s, 1) == MIN_FRACTION * runner_s
    assert len(fitted.probes) == 3  # kept in the profile: what the client saw


def test_a_runner_fit_too_steep_in_rows_is_corrected_per_row_up_to_the_probed_rows():
    # the client sees 1 ms more per stream than a batch of one, the runner model 2 ms more
    seen = [_seen_decode(1)]
    seen += [dataclasses.replace(_seen_decode(b), decode_step_s=seen[0].decode_step_s
                                 + 0.001 * (b - 1)) for b in (4, 8)]
    fitted = fit_overhead(STEP, seen, [_seen_first(32)])
    assert fitted.row_s == pytest.approx(-(STEP.per_decode_row_s - 0.001))
    assert fitted.probed_rows == 8
    for probe in seen:
        shape = StepShape()
        for _ in range(probe.streams):
            shape.add_decode(PROMPT_LEN + OUTPUT_LEN // 2)
        served = fitted.served_seconds(STEP.seconds(shape), probe.streams)
        assert served == pytest.approx(probe.decode_step_s)
    # past the probes the correction stays where the last probe put it
    runner_s = STEP.seconds(StepShape(decode_rows=16))
    assert fitted.served_seconds(runner_s, 16) == pytest.approx(
        runner_s + fitted.step_s + 8 * fitted.row_s)


def test_the_simulator_charges_serving_per_step_token_and_request(profile: Profile):
    served = dataclasses.replace(profile, serving={1: OVERHEAD})
    requests = fixed_requests(10, prompt=400, output=8, rate=0.2, arrival="constant")
    result = simulate(SimLayout(colocated=1), served, requests)
    prefill_s = STEP.base_s + 400 * STEP.per_prefill_token_s
    ttft_s = HOP_S + OVERHEAD.request_s + prefill_s + OVERHEAD.step_s + OVERHEAD.row_s
    assert result["mean_ttft_ms"] == pytest.approx(1000 * ttft_s, rel=1e-6)
    itl_s = STEP.base_s + STEP.per_decode_row_s + OVERHEAD.step_s + OVERHEAD.row_s
    assert result["mean_itl_ms"] == pytest.approx(1000 * itl_s, rel=1e-6)


def test_serving_terms_survive_the_profile_file(profile: Profile, tmp_path):
    served = dataclasses.replace(profile, serving={1: OVERHEAD})
    loaded = Profile.load(served.save(str(tmp_path / "p.json")))
    assert loaded.serving_overhead(2) == OVERHEAD  # the nearest measured count
    assert profile.serving_overhead(1) == ServingOverhead()  # none measured: nothing added
