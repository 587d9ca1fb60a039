"""On a GPU: Triton compiles and CUDA-graph captures are counted, and a warmed-up engine
compiles and captures nothing while it serves varied requests (issue #14).

Skipped without CUDA; run on the GPU machine with `python3 -m pytest -q tests/gpu`.
"""

from __future__ import annotations

import gc

import pytest
import torch

from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig
from pdserve.engine.compilations import COMPILATIONS, KINDS, CompileCounter
from pdserve.engine.outputs import EngineRequest
from pdserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _add_one(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) + 1)


def test_each_new_triton_specialization_counts_once():
    counter = CompileCounter()
    counter.watch_triton()
    x = torch.zeros(128, device="cuda")
    _add_one[(1,)](x, BLOCK=64)
    assert counter.counts["triton"] == 1
    _add_one[(1,)](x, BLOCK=64)  # in Triton's in-memory cache: no compile
    assert counter.counts["triton"] == 1
    _add_one[(1,)](x, BLOCK=128)  # a new constexpr: a new specialization
    assert counter.counts["triton"] == 2
    assert x[:64].eq(3).all() and x[64:].eq(1).all()


def recording_triton_compiles(names: list[str]):
    """Chain a hook that records each compiled kernel's repr (to say what compiled late)."""
    from triton import knobs

    previous = knobs.runtime.jit_post_compile_hook

    def record(**kwargs):
        names.append(kwargs["repr"])
        return previous(**kwargs) if previous else None

    knobs.runtime.jit_post_compile_hook = record
    return previous


def varied_requests() -> list[EngineRequest]:
    """Short and long prompts, one over a cached prefix, greedy and sampled, 20 at once."""
    g = torch.Generator().manual_seed(7)
    lens = [1, 2, 5, 17, 33, 100, 257, 600, 1500, 3000, 15, 16, 31, 64, 65, 128, 9, 3, 700, 40]
    prompts = [torch.randint(10, 32000, (n,), generator=g).tolist() for n in lens]
    prompts[-1] = prompts[8][:1200] + prompts[-1]  # a chunk over a cached prefix
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, top_k=40, seed=3,
                             ignore_eos=True)
    return [EngineRequest(f"v{i}", p, greedy if i % 2 else sampled)
            for i, p in enumerate(prompts)]


def differences(late: str, seen: list[str]) -> str:
    """What a late specialization changes against the nearest one compiled at warm-up."""
    name, _, args = late.partition("](")
    mine = args.rstrip(")").split(", ")
    same = [s.partition("](")[2].rstrip(")").split(", ") for s in seen
            if s.partition("](")[0] == name]
    if not same:
        return f"{name}: no variant at warm-up"
    best = min(same, key=lambda other: sum(a != b for a, b in zip(mine, other)))
    return f"{name}: " + "; ".join(f"{b} -> {a}" for a, b in zip(mine, best) if a != b)


# Seen on an H200 (2026-12-06, before the fix): 6 Triton compiles after warm-up, new
# specializations of _decode_split_kernel (3), _prefill_kernel (2) and _decode_reduce_kernel
# (1): the block table's width was 1 (Triton makes an int equal to 1 a constant) and the
# step's arrays, laid back to back, started at varying 16-byte alignment. Fixed in
# engine/batch_inputs.py: every array starts on 16 bytes and tables are a multiple of 16 wide.
def test_a_warmed_up_engine_compiles_and_captures_nothing_while_serving(gpu_llama):
    from triton import knobs

    from pdserve.engine.engine import Engine

    warm: list[str] = []  # every specialization compiled at start-up, to compare with
    previous = recording_triton_compiles(warm)
    graphs_before = COMPILATIONS.counts["cuda_graph"]
    engine = Engine(EngineArgs(model=gpu_llama, dtype="bfloat16", device="cuda",
                               cache=CacheConfig(gpu_memory_utilization=0.3),
                               scheduler=SchedulerConfig(max_num_seqs=16,
                                                         max_num_batched_tokens=4096)))
    knobs.runtime.jit_post_compile_hook = previous
    late: list[str] = []
    previous = recording_triton_compiles(late)
    try:
        assert engine.runner.graphs is not None
        captured = COMPILATIONS.counts["cuda_graph"] - graphs_before
        assert captured == len(engine.runner.graphs.sizes)
        COMPILATIONS.mark_ready()
        reqs = varied_requests()
        engine.generate(reqs[:3])  # one, then a few at once
        engine.generate(reqs)  # all twenty: decode batches of many sizes
        assert COMPILATIONS.after_ready() == dict.fromkeys(KINDS, 0), [
            differences(repr_, warm) for repr_ in late]
    finally:
        knobs.runtime.jit_post_compile_hook = previous
        COMPILATIONS.at_ready = None
        engine.close()
        del engine  # its KV cache would count as used against the next test's engine
        gc.collect()
        torch.cuda.empty_cache()
