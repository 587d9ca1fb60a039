"""A closed-form first cut of what the simulator predicts (docs/PLANNER.md derives it):
the step-time model's roofline terms, Little's law for the decode batch, an M/D/1 queue for
prefills, and the KV link time. Fixed prompt length L and output length O, Poisson arrivals.

It explains the P/D benefit boundary; the simulator (simulate.py), which runs the real
scheduler, is what the planner ranks by. tests/planner check that the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.engine.step_time import StepShape, StepTimeModel


@dataclass
class Estimate:
    """Mean TTFT and ITL (seconds) and each busy instance's utilisation."""

    ttft_s: float
    itl_s: float
    utilisation: float


def prefill_seconds(m: StepTimeModel, prompt: int) -> float:
    """A whole prompt in one step (it fits the token budget)."""
    shape = StepShape()
    shape.add_prefill(prompt, 0)
    return m.seconds(shape)


def prefill_work(m: StepTimeModel, prompt: int) -> float:
    """What a prompt adds to a step that runs anyway (no base cost)."""
    return prefill_seconds(m, prompt) - m.base_s


def decode_step_seconds(m: StepTimeModel, batch: float, context: float) -> float:
    """A decode step of `batch` rows (a mean: the batched cost phases in from 1 to 2 rows)."""
    batched = m.per_batched_step_s * min(max(batch - 1.0, 0.0), 1.0)
    wide = m.per_wide_step_s if m.wide_rows and batch >= m.wide_rows else 0.0
    return m.base_s + batched + wide + batch * (m.per_decode_row_s
                                                + m.per_decode_context_s * context)


def md1_wait(rate: float, service_s: float) -> float:
    """Mean wait in an M/D/1 queue (Pollaczek-Khinchine); infinite at or past saturation."""
    rho = rate * service_s
    return float("inf") if rho >= 1 else rho * service_s / (2 * (1 - rho))


def colocated(m: StepTimeModel, rate: float, prompt: int, output: int,
              hop_s: float = 0.0) -> Estimate:
    """One colocated instance at `rate` req/s.

    Decode gaps: a step of the decode batch B (Little: B = rate * O * ITL), stretched by the
    prefills that join it: those arriving during its decode life D and those queued behind
    its own prefill, D = (O-1) Td(B) + rate (D + Tq) Wp with Tq its prefill's time in queue
    and service; ITL = D / (O-1).
    TTFT: the router's hop, the rest of the step in flight when the instance is busy (half a
    gap), then a step of the decode batch plus the prompt, queued behind other prefills
    (M/D/1)."""
    wp, context = prefill_work(m, prompt), prompt + output / 2
    tp = prefill_seconds(m, prompt)
    if rate * wp >= 1 or output < 2:
        return Estimate(float("inf") if rate * wp >= 1 else tp + hop_s, float("inf"), 1.0)
    queued = tp + md1_wait(rate, tp)  # prefills that arrive meanwhile run during its decode
    itl = decode_step_seconds(m, 1, context)
    batch = 0.0
    for _ in range(50):  # the fixed point B <-> ITL
        batch = rate * output * itl
        step = decode_step_seconds(m, max(batch, 1.0), context)
        itl = (step + rate * queued * wp / (output - 1)) / (1 - rate * wp)
    busy = 1 - math.exp(-rate * (tp + output * itl))  # P(some request is in the instance)
    ttft = hop_s + busy * (itl / 2 + decode_step_seconds(m, batch, context) - m.base_s) \
        + tp + md1_wait(rate, tp)
    return Estimate(ttft, itl, busy)


def disaggregated(p: StepTimeModel, d: StepTimeModel, rate_p: float, rate_d: float,
                  prompt: int, output: int, link_s: float, hop_s: float = 0.0) -> Estimate:
    """One prefill instance at `rate_p` and one decode instance at `rate_d` req/s.

    TTFT: P's prefill step, queued behind other prefills (M/D/1), plus the router's hop.
    ITL: D's decode step at its batch (Little), never stretched by a prefill; the first gap
    also carries the hop back to D and the KV pull (`link_s`)."""
    tp = prefill_seconds(p, prompt)
    ttft = tp + md1_wait(rate_p, tp) + hop_s
    context = prompt + output / 2
    itl = decode_step_seconds(d, 1, context)
    for _ in range(50):
        itl = decode_step_seconds(d, max(rate_d * output * itl, 1.0), context)
    if output > 1:
        itl = (itl * (output - 1) + link_s + 2 * hop_s) / (output - 1)
    return Estimate(ttft, itl, rate_p * tp)
