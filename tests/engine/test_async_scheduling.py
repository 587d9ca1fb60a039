"""Async scheduling gives exactly the serial engine's tokens, stops and finish reasons, and
returns every block (embedded SmolLM2, float32, CPU; correctness only, no speed-up here)."""

from __future__ import annotations

import random

import pytest

from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.outputs import EngineRequest
from pdserve.engine.sampling_params import SamplingParams

# a 16-token budget chunks every longer prompt; 3 sequences for 10 requests makes them queue
SCHEDULER = SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=3)


def make_engine(async_scheduling: bool) -> Engine:
    return Engine(EngineArgs(cache=CacheConfig(block_size=16, kv_cache_memory=64 * 2**20),
                             scheduler=SCHEDULER, async_scheduling=async_scheduling))


@pytest.fixture(scope="module")
def serial() -> Engine:
    return make_engine(False)


@pytest.fixture(scope="module")
def overlapped() -> Engine:
    engine = make_engine(True)
    assert engine.loop.depth == 1
    return engine


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(3, 45))] for _ in range(n)]


def run(engine: Engine, reqs: list[EngineRequest], aborts: dict | None = None):
    """Step to the end, aborting a request once `aborts[id](request, its tokens)` holds.
    Returns the tokens and finish reason of each request; checks that nothing follows a
    request's last output and that every block is back."""
    for r in reqs:
        engine.add_request(r)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    reasons: dict[str, str] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in reasons, "output after the request finished"
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        for rid, when in (aborts or {}).items():
            request = engine.requests.get(rid)
            if request is not None and when(request, tokens[rid]):
                engine.abort_request(rid)
    assert engine.pool.num_free_blocks == engine.num_blocks
    assert engine.loop.in_flight is None
    return tokens, reasons


def greedy_requests(tag: str, max_tokens: list[int], stops: dict[int, int] | None = None,
                    seed: int = 0):
    stops = stops or {}
    return [EngineRequest(f"{tag}{i}", p, SamplingParams(
        max_tokens=m, temperature=0.0, ignore_eos=i % 2 == 0,
        stop_token_ids=[stops[i]] if i in stops else []))
        for i, (p, m) in enumerate(zip(prompts(len(max_tokens), seed), max_tokens))]


MAX_TOKENS = [1, 12, 2, 20, 7, 16, 3, 1, 18, 9]


def test_a_varied_batch_gives_the_serial_tokens_and_reasons(serial, overlapped):
    free, _ = run(serial, greedy_requests("f", MAX_TOKENS))
    # stop on a token each of three requests produces midway
    stops = {i: free[f"f{i}"][len(free[f"f{i}"]) // 2] for i in (1, 3, 5)}
    want_tokens, want_reasons = run(serial, greedy_requests("s", MAX_TOKENS, stops))
    got_tokens, got_reasons = run(overlapped, greedy_requests("a", MAX_TOKENS, stops))
    n = len(MAX_TOKENS)
    assert [got_tokens[f"a{i}"] for i in range(n)] == [want_tokens[f"s{i}"] for i in range(n)]
    assert [got_reasons[f"a{i}"] for i in range(n)] == [want_reasons[f"s{i}"] for i in range(n)]
    for i, m in enumerate(MAX_TOKENS):
        out, reason = got_tokens[f"a{i}"], got_reasons[f"a{i}"]
        assert len(out) <= m and (reason == "stop" or len(out) == m)
        if i in stops:
            assert reason == "stop" and out[-1] == stops[i] and stops[i] not in out[:-1]


def test_aborts_mid_run_end_those_requests_and_leave_the_others_alone(serial, overlapped):
    # prompts no earlier test cached: the longest (39 tokens) is chunked, not mostly a hit
    want, _ = run(serial, greedy_requests("u", MAX_TOKENS, seed=3))
    longest = max(range(len(MAX_TOKENS)), key=lambda i: len(prompts(len(MAX_TOKENS), 3)[i]))
    aborts = {
        "b3": lambda r, out: len(out) >= 2,  # decoding
        f"b{longest}": lambda r, out: 0 < r.num_computed_tokens < r.num_prompt_tokens,  # chunked
        "b9": lambda r, out: True,  # still queued after the first step
    }
    got, reasons = run(overlapped, greedy_requests("b", MAX_TOKENS, seed=3), aborts)
    for i in range(len(MAX_TOKENS)):
        rid = f"b{i}"
        if rid in aborts:
            assert reasons[rid] == "abort"
            assert got[rid] == want[f"u{i}"][: len(got[rid])]
        else:
            assert got[rid] == want[f"u{i}"]
    assert got["b9"] == [] and got[f"b{longest}"] == [] and len(got["b3"]) >= 2


def test_requests_that_need_their_history_run_serially_with_the_same_tokens(serial,
                                                                             overlapped):
    special = [SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.5),
               SamplingParams(max_tokens=6, temperature=0.0, logprobs=2),
               SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=0.5,
                              presence_penalty=0.5),
               SamplingParams(max_tokens=8, temperature=0.0, min_tokens=5)]
    plain = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (14, 5, 9)]

    def reqs(tag):
        return [EngineRequest(f"{tag}{i}", p, params)
                for i, (p, params) in enumerate(zip(prompts(7, seed=1), special + plain))]

    def logprobs(engine, tag):
        engine.add_request(EngineRequest(tag, prompts(1, seed=2)[0], special[1]))
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        return [(lp.token_id, [t for t, _ in lp.top]) for o in outs for lp in o.new_logprobs or []]

    assert run(overlapped, reqs("h")) == run(serial, reqs("h"))
    assert logprobs(overlapped, "lp") == logprobs(serial, "lp")


def test_seeded_sampling_is_the_same_with_async_scheduling(serial, overlapped):
    def reqs(tag):
        return [EngineRequest(f"{tag}{i}", p, SamplingParams(
            max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, min_p=0.01, seed=100 + i))
            for i, p in enumerate(prompts(5, seed=3))]

    assert run(overlapped, reqs("x")) == run(serial, reqs("x"))
