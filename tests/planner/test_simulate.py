"""The simulator: the real Scheduler on a virtual clock reproduces known queueing behaviour."""

from __future__ import annotations

import pytest

from pdserve.bench.compare import compare_files
from pdserve.bench.report import save_result
from pdserve.config import SchedulerConfig
from pdserve.engine.scheduler import Scheduler
from pdserve.planner.corun import CoRunSlowdown
from pdserve.planner.layouts import SimLayout
from pdserve.planner.simulate import SimOptions, SimRequest, Simulation, simulate
from tests.planner.conftest import HOP_S, STEP, fixed_requests, synthetic_profile

COLOCATED = SimLayout(colocated=1)
PD = SimLayout(prefill=1, decode=1)


def test_at_low_rate_ttft_is_the_prefill_time(profile):
    requests = fixed_requests(10, prompt=400, output=8, rate=0.2, arrival="constant")
    result = simulate(COLOCATED, profile, requests)
    prefill_ms = 1000 * (HOP_S + STEP.base_s + 400 * STEP.per_prefill_token_s)
    assert result["completed"] == 10
    assert result["mean_ttft_ms"] == pytest.approx(prefill_ms, rel=1e-6)
    assert result["mean_itl_ms"] == pytest.approx(1000 * (STEP.base_s + STEP.per_decode_row_s))


def test_pd_itl_ignores_prefill_load_while_colocated_itl_grows(profile):
    itl = {}
    for prompt in (100, 1600):
        requests = fixed_requests(60, prompt=prompt, output=32, rate=1.0)
        for layout in (COLOCATED, PD):
            itl[layout.label(), prompt] = simulate(layout, profile, requests)["median_itl_ms"]
    assert itl["1xC/1", 1600] > 1.5 * itl["1xC/1", 100]  # prefills stall the decodes
    assert itl["1P/1+1D/1", 1600] == pytest.approx(itl["1P/1+1D/1", 100], rel=0.1)


def test_ttft_grows_as_the_prefill_queue_fills(profile):
    ttft = [simulate(PD, profile, fixed_requests(80, 400, 4, rate))["mean_ttft_ms"]
            for rate in (0.5, 2.5, 4.5)]  # P is 10%, 51% and 92% busy
    assert ttft[0] < ttft[1] < ttft[2]
    assert ttft[2] > 2 * ttft[0]


def test_each_instance_runs_the_real_scheduler_and_preempts_when_kv_is_short():
    tight = synthetic_profile(kv_cache_tokens=1024)  # 64 blocks of 16
    requests = fixed_requests(12, prompt=200, output=200, rate=50.0)
    sim = Simulation(COLOCATED, tight, requests)
    done = sim.run()
    scheduler = sim.instances["colocated-0"].scheduler
    assert type(scheduler) is Scheduler
    assert scheduler.num_preemptions > 0
    assert all(len(r.chunk_s) == 200 for r in done)
    assert sim.instances["colocated-0"].pool.num_free_blocks == 64


def test_long_prompts_are_chunked_by_the_token_budget(profile):
    options = SimOptions(scheduler=SchedulerConfig(max_num_batched_tokens=256))
    requests = fixed_requests(1, prompt=1000, output=2, rate=1.0)
    result = simulate(COLOCATED, profile, requests, options)
    four_chunks_ms = 1000 * (HOP_S + 4 * STEP.base_s + 1000 * STEP.per_prefill_token_s)
    assert result["mean_ttft_ms"] == pytest.approx(four_chunks_ms)


def test_pd_frees_the_prefill_instances_kv_after_the_pull(profile):
    sim = Simulation(PD, profile, fixed_requests(20, 300, 16, rate=5.0))
    sim.run()
    prefill = sim.instances["prefill-0"]
    assert not prefill.held and prefill.pool.num_free_blocks == prefill.pool.num_blocks


def test_predictions_are_bench_json_that_compare_reads(profile, tmp_path):
    requests = fixed_requests(20, 300, 16, rate=2.0)
    paths = [save_result(simulate(layout, profile, requests, slos_ms={"ttft": 500}),
                         str(tmp_path / f"{i}.json")) for i, layout in enumerate((COLOCATED, PD))]
    table = compare_files(paths)
    assert "1xC/1 vs 1P/1+1D/1" in table and "| mean_ttft_ms ↓ |" in table
    assert "| request_goodput ↑ |" in table


def test_prompts_under_the_threshold_skip_the_prefill_instance(profile):
    layout = SimLayout(prefill=1, decode=1, pd_min_prompt_tokens=500)
    sim = Simulation(layout, profile, fixed_requests(10, 300, 8, rate=2.0))
    done = sim.run()
    assert sim.instances["prefill-0"].num_steps == 0  # served whole on D, as the router does
    assert all(len(r.chunk_s) == 8 for r in done)


def _sharing_profile(prefill: float, decode: float):
    shared = synthetic_profile()
    shared.corun = {1: CoRunSlowdown(prefill, decode, measured=True, shapes=16)}
    return shared


def _at(*arrivals: float, prompt: int = 400, output: int = 8) -> list[SimRequest]:
    return [SimRequest(i, [7] * prompt, output, t) for i, t in enumerate(arrivals)]


def test_a_busy_neighbour_slows_the_steps_it_overlaps_and_only_those():
    two = SimLayout(colocated=2)
    shared = _sharing_profile(prefill=1.0, decode=1.5)
    together = simulate(two, shared, _at(0.0, 0.0))  # one on each instance, in lockstep
    alone_itl_ms = 1000 * (STEP.base_s + STEP.per_decode_row_s)
    assert together["mean_itl_ms"] == pytest.approx(1.5 * alone_itl_ms)
    # the prefill terms keep their speed, the step's base slows as a decode row does
    prefill_ms = 1000 * (HOP_S + 1.5 * STEP.base_s + 400 * STEP.per_prefill_token_s)
    assert together["mean_ttft_ms"] == pytest.approx(prefill_ms)
    apart = simulate(two, shared, _at(0.0, 100.0))
    assert apart["mean_itl_ms"] == pytest.approx(alone_itl_ms)
    unmeasured = synthetic_profile()
    unmeasured.corun = {1: CoRunSlowdown(1.0, 1.5, measured=False)}
    assert simulate(two, unmeasured, _at(0.0, 0.0))["mean_itl_ms"] == \
        pytest.approx(alone_itl_ms)


def test_a_step_is_retimed_when_a_neighbour_starts_midway():
    sim = Simulation(SimLayout(colocated=2), _sharing_profile(2.0, 2.0), _at(0.0, 0.1))
    first, _ = sim.run()
    # alone for 0.1 s of its 0.205 s prefill, then at half speed: 0.105 s of work in 0.21 s
    assert first.chunk_s[0] == pytest.approx(HOP_S + 0.1 + 2 * 0.105)
