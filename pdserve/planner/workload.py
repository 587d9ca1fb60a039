"""The requests a simulation replays: the bench's workloads at the bench's arrival times.

The same `WorkloadConfig`, seed and `LoadSpec` give the very prompts and send times that
`pdserve bench run` would use (bench/workloads, bench/runner.py `plan`), so a prediction and
a measurement are of the same run.
"""

from __future__ import annotations

import math
from typing import Any

from pdserve.bench.request import RequestSpec
from pdserve.bench.runner import LoadSpec, plan
from pdserve.bench.workloads import WorkloadConfig, build_workload
from pdserve.planner.simulate import SimRequest


def sim_requests(specs: list[RequestSpec], arrivals: list[float], tokenizer: Any | None
                 ) -> list[SimRequest]:
    """Specs at their arrival times; prompts tokenized (prefix caching then sees the real
    shared prefixes) or, without a tokenizer, distinct ids of the prompt's length."""
    out = []
    for i, (spec, t) in enumerate(zip(specs, arrivals, strict=True)):
        if tokenizer is not None:
            ids = tokenizer.encode(spec.prompt, add_special_tokens=False) or [1]
        else:
            ids = [(i * 7919 + k) % 30000 + 1 for k in range(spec.prompt_len)]
        out.append(SimRequest(i, ids, spec.output_len, t, spec.category, dict(spec.slo_ms)))
    return out


def workload_requests(workload: WorkloadConfig, tokenizer: Any, request_rate: float = math.inf,
                      arrival: str = "poisson", burstiness: float = 1.0) -> list[SimRequest]:
    """The bench's requests for `workload` sent at `request_rate` (its seed for both)."""
    specs = build_workload(workload, tokenizer)
    n = workload.num_prompts or len(specs)
    load = LoadSpec(request_rate=request_rate, arrival=arrival, burstiness=burstiness,
                    num_prompts=n, seed=workload.seed)
    items = list(plan(specs, load))
    return sim_requests([s for _, s, _ in items], [t for _, _, t in items], tokenizer)


def at_rate(requests: list[SimRequest], request_rate: float, seed: int = 0,
            arrival: str = "poisson", burstiness: float = 1.0) -> list[SimRequest]:
    """The same requests re-timed at another rate (a rate sweep without re-tokenizing)."""
    from pdserve.bench.arrivals import arrival_offsets

    times = arrival_offsets(len(requests), request_rate, arrival, burstiness, seed)
    return [SimRequest(r.index, r.prompt_ids, r.output_len, float(t), r.category, r.slo_ms)
            for r, t in zip(requests, times, strict=True)]
