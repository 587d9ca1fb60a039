"""Prefill on one engine, decode on another, KV moved between them: same tokens as colocated."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from pdserve.config import CacheConfig, EngineArgs
from pdserve.engine.engine import Engine
from pdserve.engine.handoff import HoldForDecode, KVHandoff, parse_kv_transfer_params
from pdserve.engine.outputs import EngineRequest, RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.security import DeploymentSecret, SecretError
from tests.conftest import hf_greedy

NUM_TOKENS = 12


SECRET = DeploymentSecret.from_env()  # tests/conftest.py sets it
VOCAB = 49152  # SmolLM2's


def wire(out: RequestOutput) -> dict | None:
    """P's hand-off as it travels (unsigned: the engines trust their server's checks)."""
    return None if out.held is None else out.held.to_kv_transfer_params(None)


def remote_prefill(params: dict) -> KVHandoff:
    """D's typed hand-off, as its server parses it at the edge."""
    return parse_kv_transfer_params(params, VOCAB)


def engine(role: str, **kw) -> Engine:
    cache = CacheConfig(block_size=16, kv_cache_memory=32 * 2**20)
    return Engine(EngineArgs(role=role, cache=cache, deployment_secret=SECRET, **kw))


@pytest.fixture(scope="module")
def prefill() -> Engine:
    e = engine("prefill")
    yield e
    e.close()


@pytest.fixture(scope="module")
def decode() -> Engine:
    e = engine("decode")
    yield e
    e.close()


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> list[list[int]]:
    texts = ["Hi", "The three primary colours are", "A " * 40 + "story about a cat:"]
    return [smollm2_tokenizer.encode(t) for t in texts]


def run(engine: Engine, req: EngineRequest, timeout_s: float = 120) -> list[RequestOutput]:
    engine.add_request(req)
    outs, deadline = [], time.monotonic() + timeout_s
    while not (outs and outs[-1].finished):
        assert time.monotonic() < deadline, "request did not finish"
        outs += [o for o in engine.step() if o.request_id == req.request_id]
    return outs


def prefill_remote(prefill: Engine, rid: str, prompt: list[int]) -> RequestOutput:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    [out] = run(prefill, EngineRequest(rid, prompt, params, handoff=HoldForDecode()))
    return out


def decode_remote(decode: Engine, rid: str, prompt: list[int], ktp: dict) -> list[int]:
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    outs = run(decode, EngineRequest(rid, prompt, params, handoff=remote_prefill(ktp)))
    return [ktp["first_token_id"]] + [t for o in outs for t in o.new_token_ids]


def settle(engine: Engine, timeout_s: float = 10) -> None:
    """Step an idle engine until its ended leases are freed."""
    deadline = time.monotonic() + timeout_s
    while engine.stats().num_free_blocks < engine.num_blocks and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.01)


def test_disaggregated_greedy_equals_transformers(prefill, decode, prompts, hf_smollm2):
    for i, prompt in enumerate(prompts):
        p_out = prefill_remote(prefill, f"p{i}", prompt)
        ktp = wire(p_out)
        assert ktp["do_remote_prefill"] and ktp["remote_block_ids"]
        assert decode_remote(decode, f"d{i}", prompt, ktp) == hf_greedy(hf_smollm2, prompt,
                                                                        NUM_TOKENS)
    assert decode.stats().kv_pulls_ok == len(prompts) and decode.stats().kv_pulls_failed == 0
    settle(prefill)
    assert prefill.stats().num_leases == 0
    assert prefill.stats().num_free_blocks == prefill.num_blocks
    assert decode.stats().num_free_blocks == decode.num_blocks


def test_seeded_sampling_continues_on_decode_as_colocated(prefill, decode, prompts):
    """P draws the first token, D the rest: the same text as one engine drawing them all,
    because a seeded draw is a function of (seed, prompt, position) alone."""
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=1.0, top_k=40, seed=42,
                            ignore_eos=True)
    colocated = engine("colocated")
    try:
        for i, prompt in enumerate(prompts):
            whole = [t for o in run(colocated, EngineRequest(f"c{i}", prompt, params))
                     for t in o.new_token_ids]
            first = replace(params, max_tokens=1)
            [p_out] = run(prefill, EngineRequest(f"ps{i}", prompt, first,
                                                 handoff=HoldForDecode()))
            ktp = wire(p_out)
            outs = run(decode, EngineRequest(f"ds{i}", prompt, params,
                                             handoff=remote_prefill(ktp)))
            assert [ktp["first_token_id"]] + [t for o in outs for t in o.new_token_ids] == whole
    finally:
        colocated.close()


def test_tcp_transport_gives_the_same_tokens(prefill, prompts, hf_smollm2):
    d = engine("decode", kv_transport="tcp")
    try:
        ktp = wire(prefill_remote(prefill, "ptcp", prompts[2]))
        assert decode_remote(d, "dtcp", prompts[2], ktp) == hf_greedy(hf_smollm2, prompts[2],
                                                                      NUM_TOKENS)
        assert d.stats().kv_bytes_pulled > 0
        assert d.stats().kv_pulls_by_transport == {"tcp": 1}
    finally:
        d.close()


def test_failed_pull_falls_back_to_local_prefill(prefill, decode, prompts, hf_smollm2):
    ktp = wire(prefill_remote(prefill, "pfail", prompts[1]))
    broken = ktp | {"kv_endpoints": [ktp["kv_endpoints"][0] | {"port": 1, "transports": ["tcp"]}]}
    failed_before = decode.stats().kv_pulls_failed
    tokens = decode_remote(decode, "dfail", prompts[1], broken)
    assert tokens == hf_greedy(hf_smollm2, prompts[1], NUM_TOKENS)
    assert decode.stats().kv_pulls_failed == failed_before + 1
    assert decode.stats().num_free_blocks == decode.num_blocks


def test_a_decode_aborted_before_its_pull_frees_the_prefill_at_once(prefill, decode, prompts):
    free_before = prefill.stats().num_free_blocks  # earlier tests may still hold leases
    ktp = wire(prefill_remote(prefill, "pabort", prompts[2]))
    assert "pabort" in prefill.connector.leases
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    decode.add_request(EngineRequest("dabort", prompts[2], params, handoff=remote_prefill(ktp)))
    decode.abort_request("dabort")  # still waiting: no step has started its pull
    settle(decode)
    deadline = time.monotonic() + 10  # P hears from D's pull thread, long before the TTL
    while "pabort" in prefill.connector.leases and time.monotonic() < deadline:
        time.sleep(0.01)
    prefill.step()  # frees what the ended lease held
    assert "pabort" not in prefill.connector.leases
    assert prefill.stats().num_free_blocks == free_before
    assert decode.stats().num_free_blocks == decode.num_blocks


def test_aborting_a_finished_prefill_frees_its_held_kv(prefill, prompts):
    """The client's disconnect reached P after P had finished: nobody has the params."""
    free_before = prefill.stats().num_free_blocks
    prefill_remote(prefill, "pgone", prompts[1])
    assert "pgone" in prefill.connector.leases
    prefill.abort_request("pgone")
    prefill.step()
    assert "pgone" not in prefill.connector.leases
    assert prefill.stats().num_free_blocks == free_before


def test_unclaimed_lease_expires_and_frees_its_blocks(prompts):
    p = engine("prefill", kv_lease_ttl_s=0.2)
    try:
        prefill_remote(p, "orphan", prompts[2])
        assert p.stats().num_leases == 1 and p.stats().num_free_blocks < p.num_blocks
        time.sleep(0.3)
        settle(p)
        assert p.stats().num_leases == 0 and p.stats().num_free_blocks == p.num_blocks
    finally:
        p.close()


def test_first_token_eos_is_not_held(prefill, prompts):
    params = SamplingParams(max_tokens=1, temperature=0.0, stop_token_ids=list(range(50000)))
    [out] = run(prefill, EngineRequest("peos", prompts[0], params,
                                       handoff=HoldForDecode()))
    assert out.finish_reason == "stop" and wire(out) is None


def test_a_colocated_instance_answers_a_hold_plain_and_refuses_a_pull(prefill, prompts):
    """As vLLM without a KV connector: nothing is held, so no hand-off comes back."""
    e = Engine(EngineArgs(cache=CacheConfig(kv_cache_memory=8 * 2**20)))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    [out] = run(e, EngineRequest("x", prompts[0], params, handoff=HoldForDecode()))
    assert out.finish_reason == "length" and out.held is None
    assert e.stats().num_free_blocks == e.num_blocks
    ktp = wire(prefill_remote(prefill, "pcolo", prompts[0]))
    with pytest.raises(ValueError, match="--role colocated"):
        e.add_request(EngineRequest("y", prompts[0], SamplingParams(max_tokens=4),
                                    handoff=remote_prefill(ktp)))
    assert prefill.release_lease("pcolo", ktp["lease_token"])


def test_incompatible_layout_is_refused(prefill, decode, prompts):
    ktp = wire(prefill_remote(prefill, "pbad", prompts[0]))
    bad = ktp | {"kv_layout": ktp["kv_layout"] | {"block_size": 32}}
    with pytest.raises(ValueError, match="block"):
        decode.add_request(EngineRequest("dbad", prompts[0], SamplingParams(max_tokens=4),
                                         handoff=remote_prefill(bad)))
    # the refusal told P to end the lease now, well before its 30 s TTL
    deadline = time.monotonic() + 10
    while "pbad" in prefill.connector.leases and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "pbad" not in prefill.connector.leases
    with pytest.raises(ValueError, match="first_token_id"):
        remote_prefill({"do_remote_prefill": True})


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_prefill_and_decode_engines_refuse_to_start_without_the_secret(role):
    with pytest.raises(SecretError, match="PDSERVE_DEPLOYMENT_SECRET"):
        Engine(EngineArgs(role=role, cache=CacheConfig(kv_cache_memory=8 * 2**20)))


def test_a_held_prefill_carries_its_lease_capability_and_end(prefill, prompts):
    before = time.time()
    ktp = wire(prefill_remote(prefill, "pcap", prompts[0]))
    lease = prefill.connector.leases._leases["pcap"]
    assert ktp["lease_token"] == lease.token and len(ktp["lease_token"]) >= 20
    ttl = prefill.args.kv_lease_ttl_s
    assert isinstance(ktp["expires_at"], int) and before + ttl - 2 <= ktp["expires_at"] <= (
        time.time() + ttl)
    assert not prefill.release_lease("pcap", "not-the-token") and "pcap" in prefill.connector.leases
    assert prefill.release_lease("pcap", ktp["lease_token"])


def test_a_pull_with_a_wrong_lease_token_is_refused_and_prefilled_locally(
        prefill, decode, prompts, hf_smollm2):
    ktp = wire(prefill_remote(prefill, "ptok", prompts[1]))
    failed_before = decode.stats().kv_pulls_failed
    forged = ktp | {"lease_token": "guessed-" + ktp["lease_token"][8:]}
    tokens = decode_remote(decode, "dtok", prompts[1], forged)
    assert tokens == hf_greedy(hf_smollm2, prompts[1], NUM_TOKENS)
    assert decode.stats().kv_pulls_failed == failed_before + 1
    assert "ptok" in prefill.connector.leases  # nobody without the token could end it
    assert prefill.release_lease("ptok", ktp["lease_token"])


def test_the_finished_request_says_how_much_of_its_prompt_it_pulled(prefill, decode, prompts):
    """D's pulled tokens (vLLM's external_kv_transfer) are the prompt past its own prefix
    hit; a failed pull pulled nothing (the prompt was prefilled locally)."""
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompt, pulled_before = prompts[2], decode.stats().num_pulled_tokens
    ktp = wire(prefill_remote(prefill, "ppull", prompt))
    last = run(decode, EngineRequest("dpull", prompt, params, handoff=remote_prefill(ktp)))[-1]
    assert last.times.num_pulled_tokens == len(prompt) - last.num_cached_tokens > 0
    assert decode.stats().num_pulled_tokens == pulled_before + last.times.num_pulled_tokens
    assert last.times.num_preemptions == 0
    ktp = wire(prefill_remote(prefill, "pnopull", prompt))
    broken = ktp | {"kv_endpoints": [ktp["kv_endpoints"][0] | {"port": 1, "transports": ["tcp"]}]}
    pulled_before = decode.stats().num_pulled_tokens
    last = run(decode, EngineRequest("dnopull", prompt, params, handoff=remote_prefill(broken)))[-1]
    assert last.times.num_pulled_tokens == 0
    assert decode.stats().num_pulled_tokens == pulled_before
