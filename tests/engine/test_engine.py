"""The whole engine on the embedded SmolLM2 (float32, CPU) against transformers' greedy output."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.outputs import EngineRequest
from pdserve.engine.sampling_params import SamplingParams
from tests.conftest import hf_greedy

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
NUM_TOKENS = 64


def make_engine(**overrides) -> Engine:
    cache = overrides.pop("cache", CacheConfig(block_size=16, kv_cache_memory=64 * 2**20))
    sched = overrides.pop("scheduler", SchedulerConfig())
    return Engine(EngineArgs(cache=cache, scheduler=sched, **overrides))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return make_engine()


@pytest.fixture(scope="module")
def prompt_ids(smollm2_tokenizer) -> list[list[int]]:
    chat = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours of the rainbow."}],
        add_generation_prompt=True, tokenize=False,
    )
    texts = PROMPTS + [chat]
    return [smollm2_tokenizer.encode(t, add_special_tokens=False) for t in texts]


@pytest.fixture(scope="module")
def reference(hf_smollm2, prompt_ids) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, ignoring EOS."""
    return [hf_greedy(hf_smollm2, ids, NUM_TOKENS) for ids in prompt_ids]


def greedy(engine: Engine, prompts: list[list[int]], n: int = NUM_TOKENS, tag: str = "r"):
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    reqs = [EngineRequest(f"{tag}{i}", p, params) for i, p in enumerate(prompts)]
    out = engine.generate(reqs)
    return [out[r.request_id] for r in reqs]


def test_greedy_batch_matches_transformers(engine, prompt_ids, reference):
    assert greedy(engine, prompt_ids) == reference


def test_chunked_prefill_gives_the_same_tokens(prompt_ids, reference):
    small = make_engine(scheduler=SchedulerConfig(max_num_batched_tokens=7))
    assert greedy(small, prompt_ids) == reference


def test_preemption_under_a_tiny_kv_budget_gives_the_same_tokens(prompt_ids, reference):
    tiny = make_engine(cache=CacheConfig(block_size=16, num_blocks=7))
    assert greedy(tiny, prompt_ids) == reference
    assert tiny.stats().num_preemptions > 0
    assert tiny.stats().num_free_blocks == 7


def test_async_scheduling_gives_the_same_tokens(prompt_ids, reference):
    overlapped = make_engine(async_scheduling=True)
    assert greedy(overlapped, prompt_ids) == reference
    assert overlapped.stats().num_free_blocks == overlapped.num_blocks


def test_async_scheduling_with_chunks_and_preemption_gives_the_same_tokens(prompt_ids,
                                                                           reference):
    tight = make_engine(async_scheduling=True, cache=CacheConfig(block_size=16, num_blocks=7),
                        scheduler=SchedulerConfig(max_num_batched_tokens=7))
    assert greedy(tight, prompt_ids) == reference
    assert tight.stats().num_preemptions > 0
    assert tight.stats().num_free_blocks == 7


def test_prefix_cache_hit_reports_cached_tokens_and_keeps_output(engine, smollm2_tokenizer):
    text = "You are a careful assistant. " * 12
    prefix = smollm2_tokenizer.encode(text, add_special_tokens=False)
    a, b = prefix + [504, 1530], prefix + [2113, 314]
    [first] = greedy(engine, [a], n=8, tag="pa")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request(EngineRequest("pb", b, params))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    cached = outs[-1].num_cached_tokens
    assert cached >= 16 * (len(prefix) // 16) and cached < len(b)
    no_cache = make_engine(cache=CacheConfig(kv_cache_memory=64 * 2**20,
                                             enable_prefix_caching=False))
    assert [t for o in outs for t in o.new_token_ids] == greedy(no_cache, [b], n=8)[0]
    assert first == greedy(no_cache, [a], n=8)[0]


def test_seeded_sampling_is_reproducible_and_independent_of_batch(engine, prompt_ids):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    alone = engine.generate([EngineRequest("s1", prompt_ids[0], params)])["s1"]
    crowd = [EngineRequest(f"c{i}", p, SamplingParams(max_tokens=16, temperature=1.0))
             for i, p in enumerate(prompt_ids[1:])]
    together = engine.generate([EngineRequest("s2", prompt_ids[0], params)] + crowd)["s2"]
    assert alone == together


def test_max_tokens_and_stop_token_ids_end_a_request(engine, prompt_ids, reference):
    stop_at = reference[0][5]
    params = SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[stop_at])
    engine.add_request(EngineRequest("st", prompt_ids[0], params))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == reference[0][: reference[0].index(stop_at) + 1]
    assert outs[-1].finish_reason == "stop"


def test_abort_frees_every_block(engine, prompt_ids):
    free_before = engine.stats().num_free_blocks
    params = SamplingParams(max_tokens=50, temperature=0.0)
    engine.add_request(EngineRequest("ab", prompt_ids[2], params))
    engine.step()
    assert engine.stats().num_free_blocks < free_before
    engine.abort_request("ab")
    outs = engine.step()
    assert outs[-1].finish_reason == "abort" and outs[-1].finished
    assert engine.stats().num_free_blocks == free_before
    assert not engine.has_unfinished_requests()


def test_logprobs_are_those_of_the_raw_distribution(engine, prompt_ids, hf_smollm2):
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=3)
    engine.add_request(EngineRequest("lp", prompt_ids[0], params))
    out = engine.step()[-1]
    [lp] = out.new_logprobs
    with torch.inference_mode():
        ref = hf_smollm2(torch.tensor([prompt_ids[0]])).logits[0, -1].log_softmax(-1)
    assert lp.token_id == int(ref.argmax())
    assert abs(lp.logprob - float(ref.max())) < 1e-3
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()


@pytest.mark.parametrize(
    "prompt, max_tokens, message",
    [
        ([], 5, "empty"),
        ([1, 10**9], 5, "out of the vocabulary"),
        ([1, 2, 3], 0, "at least 1"),
        ([1] * 10, 10**6, "maximum context length"),
    ],
)
def test_invalid_requests_are_refused_with_a_message(engine, prompt, max_tokens, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request(EngineRequest("bad", prompt, SamplingParams(max_tokens=max_tokens)))
    assert "bad" not in engine.requests


def test_the_profiled_step_splits_prompts_at_the_model_length():
    from pdserve.engine.runner import profile_seq_lens

    assert profile_seq_lens(8192, None) == [8192]
    assert profile_seq_lens(8192, 10240) == [8192]
    assert profile_seq_lens(8192, 1536) == [1536] * 5 + [512]
    assert profile_seq_lens(4096, 2048) == [2048, 2048]


def test_sibling_choices_compute_their_prompt_once(prompt_ids):
    """n > 1: the siblings wait for the first choice's prefill and hit its blocks, so the
    shared prompt is computed once (only the last partial block again per sibling)."""
    e = make_engine()
    prompt = prompt_ids[1] * 3
    params = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)
    reqs = [EngineRequest("x-0", prompt, params)] + [
        EngineRequest(f"x-{i}", prompt, replace(params, seed=i), prefill_after="x-0")
        for i in (1, 2)]
    out = e.generate(reqs)
    assert all(len(out[r.request_id]) == 4 for r in reqs)
    reusable = (len(prompt) - 1) // 16 * 16
    assert e.pool.cache_hits == 2 * reusable
