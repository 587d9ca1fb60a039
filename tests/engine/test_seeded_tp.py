"""Seeded sampling at tensor-parallel size 2 (a CPU worker over gloo) draws the tokens of
TP=1: the noise is a function of (seed, prompt, position), sampled on rank 0's logits."""

from __future__ import annotations

from pdserve.engine.outputs import EngineRequest
from pdserve.engine.sampling_params import SamplingParams
from tests.engine.test_disagg_tp import PROMPTS, make


def seeded_tokens(folder: str, tp: int) -> list[list[int]]:
    engine = make(folder, "colocated", tp)
    try:
        reqs = [EngineRequest(f"s{i}", p, SamplingParams(
            max_tokens=10, temperature=1.0, top_k=50 if i % 2 else 0, seed=42 + i,
            ignore_eos=True)) for i, p in enumerate(PROMPTS)]
        out = engine.generate(reqs)
        return [out[r.request_id] for r in reqs]
    finally:
        engine.close()


def test_tensor_parallel_seeded_tokens_equal_one_rank(tiny_llama):
    one = seeded_tokens(tiny_llama, 1)
    assert seeded_tokens(tiny_llama, 2) == one
    assert len({tuple(t) for t in one}) == len(PROMPTS)  # sampled, not all alike
