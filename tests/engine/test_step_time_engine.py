"""The ITL target on the real engine (embedded SmolLM2, CPU): calibration and unchanged tokens."""

from __future__ import annotations

import pytest

from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.outputs import EngineRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.step_time import StepShape

BLOCK = 16


def make_engine(max_step_ms: float | None) -> Engine:
    return Engine(EngineArgs(cache=CacheConfig(block_size=BLOCK, kv_cache_memory=32 * 2**20),
                             scheduler=SchedulerConfig(max_step_ms=max_step_ms)))


@pytest.fixture(scope="module")
def timed() -> Engine:
    return make_engine(max_step_ms=1.0)  # below any CPU step: every chunk beside a decode is
    # the one-block minimum


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> tuple[list[int], list[int]]:
    encode = smollm2_tokenizer.encode
    short = encode("The capital of France is", add_special_tokens=False)
    story = ("Once upon a time, in a small village by the sea, there lived an old fisherman "
             "who had never once, in all his years, caught a fish larger than his hand. Every "
             "morning he rowed out past the rocks and")
    long = encode(story, add_special_tokens=False)
    return short, long


def staggered(engine: Engine, first: list[int], second: list[int]) -> tuple[dict, int]:
    """`first` decodes while `second` arrives; returns their tokens and the steps `second`
    took to its first token."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    engine.add_request(EngineRequest("a", first, params))
    for out in engine.step():
        tokens[out.request_id] += out.new_token_ids
    engine.add_request(EngineRequest("b", second, params))
    steps = 0
    while engine.has_unfinished_requests():
        steps += not tokens["b"]
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens, steps


def test_calibration_yields_a_positive_monotone_model(timed):
    model = timed.scheduler.step_time
    assert model.base_s > 0 and min(model.to_dict().values()) >= 0
    small, large = StepShape(), StepShape()
    small.add_prefill(16, 0)
    large.add_prefill(512, 0)
    assert model.seconds(large) > model.seconds(small) > 0
    decodes = [StepShape(decode_rows=n, decode_context=n * 256) for n in (1, 8, 64)]
    times = [model.seconds(s) for s in decodes]
    assert times == sorted(times)


def test_tokens_are_unchanged_with_the_target_on(timed, prompts):
    short, long = prompts
    plain_tokens, plain_steps = staggered(make_engine(max_step_ms=None), short, long)
    timed_tokens, timed_steps = staggered(timed, short, long)
    assert plain_steps == 1  # the whole prompt in one step, beside the decode
    assert timed_steps >= -(-len(long) // BLOCK) > 1  # a block a step
    assert timed_tokens == plain_tokens
