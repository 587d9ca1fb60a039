"""Fits a StepTimeModel by timing a few dummy steps of varied shapes on the real runner.

The steps write into free, uncached blocks (what they write is never read), so it runs at
engine start, before any request. On CPU the shapes are kept small to stay within a few
seconds; the model is linear in the shape, so it extrapolates to the full token budget.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass

import torch

from pdserve.engine.request import Request
from pdserve.engine.sampler import sample
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from pdserve.engine.step_time import StepShape, StepTimeModel

log = logging.getLogger(__name__)

CPU_MAX_PREFILL = 128  # tokens: a CPU prefill costs ~1 ms a token even for a small model
CPU_MAX_ROWS = 16


@dataclass
class StepSpec:
    """A dummy step: prefill chunks as (tokens, cached before) and decode rows' contexts."""

    prefills: list[tuple[int, int]]
    decodes: list[int]

    def shape(self) -> StepShape:
        shape = StepShape()
        for n, computed in self.prefills:
            shape.add_prefill(n, computed)
        for ctx in self.decodes:
            shape.add_decode(ctx)
        return shape


def calibration_specs(max_tokens: int, max_rows: int, max_len: int) -> list[StepSpec]:
    """Shapes that vary each term of the model on its own and together."""
    p, r = max(min(max_tokens, max_len // 2), 4), max(max_rows, 2)
    ctx_short, ctx_long = min(64, max_len // 4), min(1024, max_len // 2)
    prefill_ctx = min(4 * p, max_len - p)  # a later chunk of a long prompt
    return [
        StepSpec([], [ctx_short]),
        StepSpec([], [ctx_short] * (r // 4 or 1)),
        StepSpec([], [ctx_short] * r),
        StepSpec([], [ctx_long] * r),
        StepSpec([(p // 4, 0)], []),
        StepSpec([(p // 2, 0)], []),
        StepSpec([(p, 0)], []),
        StepSpec([(p // 4, prefill_ctx)], []),
        StepSpec([(p // 2, 0)], [ctx_short] * (r // 2)),
        StepSpec([(p // 4, prefill_ctx)], [ctx_long] * (r // 4 or 1)),
    ]


def sampled_specs(count: int, max_tokens: int, max_rows: int, max_len: int,
                  seed: int = 0) -> list[StepSpec]:
    """`count` random shapes for a planner's profile: prefill-only, decode-only and mixed
    steps, sizes log-uniform (small steps are as common as large ones), contexts uniform."""
    rng = random.Random(seed)

    def log_uniform(hi: int) -> int:
        return max(1, int(round(math.exp(rng.uniform(0.0, math.log(max(hi, 1)))))))

    specs = []
    for i in range(count):
        kind = i % 3  # 0 prefill, 1 decode, 2 mixed: each term varies alone and together
        prefills, decodes = [], []
        if kind != 1:
            n = log_uniform(max_tokens)
            prefills.append((n, rng.randint(0, max(max_len - n - 1, 0)) if rng.random() < 0.5
                             else 0))
        if kind != 0:
            contexts = max(max_len // 2, 2)
            decodes = [rng.randint(1, contexts) for _ in range(log_uniform(max_rows))]
        specs.append(StepSpec(prefills, decodes))
    return specs


def calibrate(runner, num_blocks: int, block_size: int, max_tokens: int, max_seqs: int,
              max_len: int, device: torch.device, time_limit_s: float = 3.0) -> StepTimeModel:
    """Time each spec (median of up to three rounds, as many as `time_limit_s` allows, at
    least one) after warming the kernels on a mixed step, and fit."""
    if device.type == "cpu":
        max_tokens, max_seqs = min(max_tokens, CPU_MAX_PREFILL), min(max_seqs, CPU_MAX_ROWS)
    specs = calibration_specs(max_tokens, max_seqs, max_len)
    start = time.perf_counter()
    times: list[list[float]] = [[] for _ in specs]
    timed_step(runner, specs[-2], num_blocks, block_size, device)  # warm-up, untimed
    for _ in range(3):
        round_start = time.perf_counter()
        for spec, spent in zip(specs, times):
            spent.append(timed_step(runner, spec, num_blocks, block_size, device))
        now = time.perf_counter()
        if now - start + (now - round_start) > time_limit_s:  # no time for another round
            break
    model = StepTimeModel.fit([s.shape() for s in specs], [statistics.median(t) for t in times])
    log.info("step-time model from %d steps in %.2f s: %s", len(specs) * len(times[0]) + 1,
             time.perf_counter() - start, model)
    return model


def timed_step(runner, spec: StepSpec, num_blocks: int, block_size: int,
               device: torch.device) -> float:
    """Seconds one dummy step of `spec` takes on `runner` (model forward and sampling)."""
    blocks = itertools.cycle(range(num_blocks))  # distinct blocks while they last
    step = SchedulerOutput()
    params = SamplingParams(max_tokens=1)
    for i, (n, computed) in enumerate(spec.prefills):
        step.scheduled.append(ScheduledRequest(_dummy(f"p{i}", computed + n, computed, params,
                                                      blocks, block_size), n))
    for i, ctx in enumerate(spec.decodes):
        step.scheduled.append(ScheduledRequest(_dummy(f"d{i}", ctx, ctx - 1, params, blocks,
                                                      block_size), 1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    logits = runner.execute(step)
    sample(logits, [s.request for s in step.scheduled if s.samples], [])  # reads tokens back
    return time.perf_counter() - start


def _dummy(rid: str, num_tokens: int, num_computed: int, params: SamplingParams,
           blocks, block_size: int) -> Request:
    request = Request(f"calibrate-{rid}", [1] * num_tokens, params)
    request.num_computed_tokens = num_computed
    request.block_ids = [next(blocks) for _ in range(-(-num_tokens // block_size))]
    return request
