"""`pdserve plan profile`: time the engine's own runner on sampled step shapes and fit.

One engine is built (its weights, KV cache and runner); for each thread count (or, on a
GPU, the one tensor-parallel size it was built with) the sampled shapes are timed and a
StepTimeModel fitted, with engine/calibrate.py's timing and step_time.py's fit.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import torch

from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig
from pdserve.engine.calibrate import StepSpec, sampled_specs, timed_step
from pdserve.engine.engine import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    Engine,
    kv_bytes_per_block,
    resolve_device,
)
from pdserve.engine.step_time import StepShape, StepTimeModel
from pdserve.planner.corun import measure_corun
from pdserve.planner.profile import Profile, default_transports, describe_device
from pdserve.planner.served import (
    REPEATS,
    fit_overhead,
    measure_router_overhead,
    measure_serving,
    split_probes,
)
from pdserve.planner.typical import STALL_FACTOR, typical

log = logging.getLogger(__name__)


@dataclass
class ProfileSpec:
    """What to time: the model, thread counts (CPU), and the size of the sample."""

    model: str | None = None  # None: the embedded SmolLM2
    device: str = "auto"
    dtype: str = "auto"
    threads: tuple[int, ...] = (1, 2)  # CPU: one fit per count; GPU: ignored
    tensor_parallel_size: int = 1
    num_shapes: int = 150  # per thread count
    max_prefill_tokens: int = 512  # largest prefill chunk timed (the fit extrapolates)
    max_decode_rows: int = 32
    max_context: int = 2048
    kv_cache_memory: int = 256 * 2**20  # bytes, CPU only (a GPU measures its free memory)
    time_limit_s: float = 240.0  # per thread count: stop sampling here, fit what was timed
    repeats: int = 2  # timings per shape, in passes over all shapes; averaged (typical.py)
    seed: int = 0
    served: bool = True  # also measure what a real server adds (planner/served.py)
    corun: bool = True  # CPU: also measure how much a neighbour instance slows a step
    probe_repeats: int = REPEATS  # serving probes: rounds over all shapes, averaged
    tokenizer: str | None = None  # the served probes' --tokenizer (a preset without the
    # embedded model's package)


def measure_profile(spec: ProfileSpec) -> Profile:
    """Build the engine once, time `spec.num_shapes` sampled steps per thread count, fit."""
    cpu = resolve_device(spec.device).type == "cpu"
    args = EngineArgs(model=spec.model, device=spec.device, dtype=spec.dtype,
                      tensor_parallel_size=spec.tensor_parallel_size,
                      cache=CacheConfig(kv_cache_memory=spec.kv_cache_memory if cpu else None),
                      scheduler=SchedulerConfig(max_model_len=spec.max_context + 16))
    profile = _profile_and_close(Engine(args), spec)
    _release_device()  # the served probes start an instance of their own on this device
    if spec.served:
        cpu_threads = profile.parallelism == "cpu_threads"
        profile.serving = measure_serving(profile.step_time, cpu_threads, spec.model,
                                          tokenizer=spec.tokenizer,
                                          repeats=spec.probe_repeats)
        for units, overhead in profile.serving.items():
            log.info("serving on %d: %s", units, overhead)
        first = min(profile.step_time)
        profile.router_overhead_s, probes = measure_router_overhead(
            first if profile.parallelism == "cpu_threads" else None, spec.model,
            tokenizer=spec.tokenizer)
        profile.router_overhead_measured = True
        log.info("the router adds %.1f ms to a first token: %s",
                 1e3 * profile.router_overhead_s, probes)
    return profile


def _profile_and_close(engine: Engine, spec: ProfileSpec) -> Profile:
    try:
        return _profile(engine, spec)
    finally:
        engine.close()


def _release_device() -> None:
    """Free what the profile's engine held (weights, KV cache, CUDA graphs): on a GPU an
    instance measures the free memory at start, and would find none."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        log.info("after the profile: %.1f GiB of GPU memory still reserved here",
                 torch.cuda.memory_reserved() / 2**30)


def _profile(engine: Engine, spec: ProfileSpec) -> Profile:
    cpu = engine.device.type == "cpu"
    units = spec.threads if cpu else (spec.tensor_parallel_size,)
    block = engine.args.cache.block_size
    models, errors, samples, corun = {}, {}, {}, {}
    specs = sampled_specs(spec.num_shapes, spec.max_prefill_tokens, spec.max_decode_rows,
                          spec.max_context, spec.seed)
    for n in units:
        if cpu:
            torch.set_num_threads(n)
        models[n], errors[n], samples[n] = _fit(engine, spec, specs, block)
        log.info("%s=%d: %s (median error %.1f%%)", "threads" if cpu else "tp", n, models[n],
                 100 * errors[n])
        if cpu and spec.corun:
            corun[n] = measure_corun(engine, n, specs, spec.repeats)
    cfg = engine.model_config
    per_block = kv_bytes_per_block(cfg, block, engine.dtype, 1)
    return Profile(
        device=describe_device(engine.device), model=engine.model_name,
        dtype=str(engine.dtype).removeprefix("torch."),
        parallelism="cpu_threads" if cpu else "tensor_parallel",
        step_time=models, kv_bytes_per_token=per_block // block, block_size=block,
        kv_cache_tokens=_served_kv_tokens(engine, per_block),
        max_model_len=cfg.max_position_embeddings,
        transports=default_transports(engine.device), num_shapes=spec.num_shapes,
        fit_error=errors, samples=samples, corun=corun,
        created=datetime.now(UTC).isoformat(timespec="seconds"))


def _served_kv_tokens(engine: Engine, per_block: int) -> int:
    """KV tokens an instance serves with: `pdserve serve`'s default budget on CPU (the
    profile's own engine used a smaller one), what this engine measured on a GPU."""
    block = engine.args.cache.block_size
    if engine.device.type == "cpu":
        return DEFAULT_CPU_KV_CACHE_BYTES // per_block * block
    return engine.num_blocks * block


def _fit(engine: Engine, spec: ProfileSpec, specs: list[StepSpec], block: int
         ) -> tuple[StepTimeModel, float, list[list[float]]]:
    """Time the sampled shapes `specs` (stopping at the time limit), fit; the fit's median
    relative error over the timings it kept, and every timing with whether it was kept
    (Profile.samples)."""
    run = engine.runner
    for warm in specs[:3]:  # kernels and allocator warm, untimed
        timed_step(run, warm, engine.num_blocks, block, engine.device)
    # passes over every shape, not repeats back to back: a shape's timings then lie minutes
    # apart, and their mean is the host's typical speed (typical.py); the first pass stops at
    # its share of the time limit, the later ones re-time what it timed
    passes = max(spec.repeats, 1)
    start, times = time.perf_counter(), [[] for _ in specs]
    for k in range(passes):
        for s, seconds in zip(specs, times):
            if k and not seconds:
                break
            seconds.append(timed_step(run, s, engine.num_blocks, block, engine.device))
            if not k and time.perf_counter() - start > spec.time_limit_s / passes:
                log.warning("profile: time limit reached after %d of %d shapes",
                            sum(map(bool, times)), len(specs))
                break
    timed = [(s.shape(), typical(t)) for s, t in zip(specs, times) if t]
    return fit_timed(timed)


def fit_timed(timed: list[tuple[StepShape, float]]
              ) -> tuple[StepTimeModel, float, list[list[float]]]:
    """Fit timed steps; drop the stalls (a shared machine only ever makes a step slower) and
    refit once. The model, its median relative error over the timings it kept, and every
    timing with whether it was kept (Profile.samples)."""
    model = StepTimeModel.fit([s for s, _ in timed], [t for _, t in timed])
    keep = [t <= STALL_FACTOR * model.seconds(s) for s, t in timed]
    if len(timed) // 2 <= sum(keep) < len(timed):
        log.info("profile: %d of %d timings were stalls, refitting without them",
                 len(timed) - sum(keep), len(timed))
        kept = [pair for pair, k in zip(timed, keep) if k]
        model = StepTimeModel.fit([s for s, _ in kept], [t for _, t in kept])
    else:
        keep, kept = [True] * len(timed), timed
    error = statistics.median(abs(model.seconds(s) - t) / t for s, t in kept)
    # every timing, the dropped stalls too (kept 0)
    rows = [[s.prefill_tokens, s.prefill_attention, s.decode_rows, s.decode_context, t,
             float(k)] for (s, t), k in zip(timed, keep)]
    return model, error, rows


def refit_profile(profile: Profile) -> Profile:
    """`profile` with its step-time models fitted again from its own timings, and what
    serving adds fitted again from its own probes: a profile taken by an older pdserve,
    read by this one's model, without the device."""
    step_time, errors, samples, serving = {}, {}, {}, dict(profile.serving)
    for units, rows in profile.samples.items():
        timed = [(StepShape(*(int(x) for x in r[:4])), r[4]) for r in rows]
        step_time[units], errors[units], samples[units] = fit_timed(timed)
        old = profile.serving.get(units)
        if old is not None and old.measured:
            serving[units] = fit_overhead(step_time[units], *split_probes(old.probes))
    if not step_time:
        raise ValueError("the profile keeps no timings to fit again")
    return replace(profile, step_time={**profile.step_time, **step_time},
                   fit_error={**profile.fit_error, **errors}, samples=samples,
                   serving=serving)
