"""A synthetic profile: round step-time figures, so expected latencies are hand-computable."""

from __future__ import annotations

import pytest

from pdserve.bench.request import RequestSpec
from pdserve.engine.step_time import StepTimeModel
from pdserve.planner.profile import Profile, TransportCost
from pdserve.planner.simulate import SimRequest
from pdserve.planner.workload import at_rate, sim_requests

# 5 ms a step, 0.5 ms a prompt token, 2 ms a decode row: a 400-token prompt takes 205 ms
STEP = StepTimeModel(base_s=0.005, per_prefill_token_s=0.0005, per_prefill_pair_s=0.0,
                     per_decode_row_s=0.002, per_decode_context_s=0.0)
HOP_S = 0.001


def synthetic_profile(kv_cache_tokens: int = 65536) -> Profile:
    return Profile(device="synthetic", model="synthetic", dtype="float32",
                   parallelism="cpu_threads", step_time={1: STEP}, kv_bytes_per_token=1000,
                   kv_cache_tokens=kv_cache_tokens,
                   transports={"host": TransportCost(0.001, 1e9)}, router_overhead_s=HOP_S)


def fixed_requests(n: int, prompt: int, output: int, rate: float, arrival: str = "poisson"
                   ) -> list[SimRequest]:
    base = sim_requests([RequestSpec("", prompt, output)] * n, [0.0] * n, None)
    return at_rate(base, rate, seed=0, arrival=arrival)


@pytest.fixture
def profile() -> Profile:
    return synthetic_profile()
