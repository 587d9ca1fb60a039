"""Heterogeneous tensor parallelism across P and D: TP=1 -> TP=2 and TP=2 -> TP=1 give the
tokens of one colocated TP=1 engine, each D rank filling its own KV heads from the right P rank.

One TP>1 engine per test (a process has one default process group); CPU, gloo, float32.
"""

from __future__ import annotations

import pytest

from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.handoff import HoldForDecode
from pdserve.engine.outputs import EngineRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.security import DeploymentSecret
from tests.engine.test_disagg import remote_prefill, run, settle, wire

NUM_TOKENS = 10
# short, one exact block, several blocks, long, and two sharing a 3-block prefix
PROMPTS = [
    [7, 3],
    [11, 12, 13, 14],
    [5, 17, 200, 3, 99, 41, 7, 8, 250, 1, 64],
    [(i * 37) % 250 + 1 for i in range(45)],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 20, 30, 40, 50],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 20, 30, 77, 78, 79],
]


def make(folder: str, role: str, tp: int) -> Engine:
    return Engine(EngineArgs(
        model=folder, dtype="float32", device="cpu", role=role, tensor_parallel_size=tp,
        deployment_secret=DeploymentSecret.from_env(),  # tests/conftest.py sets it
        cache=CacheConfig(block_size=4, num_blocks=96),
        scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=128)))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def colocated_tokens(tiny_llama) -> list[list[int]]:
    engine = make(tiny_llama, "colocated", 1)
    try:
        out = engine.generate([EngineRequest(f"c{i}", p, greedy(NUM_TOKENS))
                               for i, p in enumerate(PROMPTS)])
        return [out[f"c{i}"] for i in range(len(PROMPTS))]
    finally:
        engine.close()


def disaggregated(prefill: Engine, decode: Engine) -> list[list[int]]:
    tokens = []
    for i, prompt in enumerate(PROMPTS):
        [p_out] = run(prefill, EngineRequest(f"p{i}", prompt, greedy(1),
                                             handoff=HoldForDecode()))
        ktp = wire(p_out)
        outs = run(decode, EngineRequest(f"d{i}", prompt, greedy(NUM_TOKENS),
                                         handoff=remote_prefill(ktp)))
        tokens.append([ktp["first_token_id"]] + [t for o in outs for t in o.new_token_ids])
    return tokens


@pytest.mark.parametrize("p_tp,d_tp", [(1, 2), (2, 1)])
def test_heterogeneous_tp_gives_colocated_tokens(tiny_llama, colocated_tokens, p_tp, d_tp):
    prefill, decode = make(tiny_llama, "prefill", p_tp), make(tiny_llama, "decode", d_tp)
    try:
        assert len(prefill.connector.sources) == p_tp  # one KV source per P rank
        assert disaggregated(prefill, decode) == colocated_tokens
        stats = decode.stats()
        # every pull moved KV (none fell back to a local prefill), the whole model's heads
        assert stats.kv_pulls_ok == len(PROMPTS) and stats.kv_pulls_failed == 0
        assert stats.kv_bytes_pulled > 0
        settle(prefill)
        assert prefill.stats().num_leases == 0
        assert prefill.stats().num_free_blocks == prefill.num_blocks
        assert decode.stats().num_free_blocks == decode.num_blocks
    finally:
        decode.close()
        prefill.close()
