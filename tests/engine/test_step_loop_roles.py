"""The one step loop at depth 1 (async scheduling) in every role and at tensor-parallel size 2:
the serial colocated engine's tokens, every block and lease back at the end.

Requests run together (not one by one) so that steps overlap; CPU, gloo, float32, a tiny
Llama; one TP>1 engine per test (a process has one default process group).
"""

from __future__ import annotations

import time

import pytest

from pdserve.engine.engine import Engine
from pdserve.engine.handoff import HoldForDecode
from pdserve.engine.outputs import EngineRequest, RequestOutput
from tests.engine.test_disagg import remote_prefill, settle, wire
from tests.engine.test_disagg_tp import NUM_TOKENS, PROMPTS, greedy, make


def overlapped(folder: str, role: str, tp: int) -> Engine:
    engine = make(folder, role, tp)
    engine.args.async_scheduling = True  # read once, when the loop is first built
    assert engine.loop.depth == 1
    return engine


def run_together(engine: Engine, requests: list[EngineRequest],
                 timeout_s: float = 120) -> dict[str, list[RequestOutput]]:
    for r in requests:
        engine.add_request(r)
    outs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
    deadline = time.monotonic() + timeout_s
    while not all(o and o[-1].finished for o in outs.values()):
        assert time.monotonic() < deadline, "requests did not finish"
        for out in engine.step():
            outs[out.request_id].append(out)
    assert engine.loop.in_flight is None
    return outs


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.fixture(scope="module")
def serial_tokens(tiny_llama) -> list[list[int]]:
    engine = make(tiny_llama, "colocated", 1)
    try:
        assert engine.loop.depth == 0  # the CPU default
        out = engine.generate([EngineRequest(f"c{i}", p, greedy(NUM_TOKENS))
                               for i, p in enumerate(PROMPTS)])
        return [out[f"c{i}"] for i in range(len(PROMPTS))]
    finally:
        engine.close()


@pytest.mark.parametrize("tp", [1, 2])
def test_colocated_overlapped_gives_serial_tokens(tiny_llama, serial_tokens, tp):
    engine = overlapped(tiny_llama, "colocated", tp)
    try:
        outs = run_together(engine, [EngineRequest(f"c{i}", p, greedy(NUM_TOKENS))
                                     for i, p in enumerate(PROMPTS)])
        assert [tokens_of(outs[f"c{i}"]) for i in range(len(PROMPTS))] == serial_tokens
        assert engine.pool.num_free_blocks == engine.num_blocks
    finally:
        engine.close()


@pytest.mark.parametrize("p_tp,d_tp", [(1, 1), (1, 2), (2, 1)])
def test_prefill_and_decode_overlapped_give_serial_tokens(tiny_llama, serial_tokens, p_tp,
                                                          d_tp):
    prefill = overlapped(tiny_llama, "prefill", p_tp)
    decode = overlapped(tiny_llama, "decode", d_tp)
    try:
        held = run_together(prefill, [EngineRequest(f"p{i}", p, greedy(1),
                                                    handoff=HoldForDecode())
                                      for i, p in enumerate(PROMPTS)])
        params = [wire(held[f"p{i}"][-1]) for i in range(len(PROMPTS))]
        assert all(p is not None for p in params), "P held every prefill for D"
        outs = run_together(decode, [
            EngineRequest(f"d{i}", p, greedy(NUM_TOKENS), handoff=remote_prefill(params[i]))
            for i, p in enumerate(PROMPTS)])
        tokens = [[params[i]["first_token_id"]] + tokens_of(outs[f"d{i}"])
                  for i in range(len(PROMPTS))]
        assert tokens == serial_tokens
        assert decode.stats().kv_pulls_ok == len(PROMPTS)
        settle(prefill)
        assert prefill.stats().num_leases == 0
        assert prefill.pool.num_free_blocks == prefill.num_blocks
        assert decode.pool.num_free_blocks == decode.num_blocks
    finally:
        decode.close()
        prefill.close()
