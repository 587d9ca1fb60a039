"""The routing policies as pure objects: views in, a decision out (no instance runs here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdserve.block_hashing import block_hashes, hash_block, usable_blocks
from pdserve.engine.blocks import BlockPool
from pdserve.engine.kv_events import KVEventLog
from pdserve.router.kv_index import KVIndex
from pdserve.router.policy import (
    ConditionalSplit,
    InstanceView,
    RequestView,
    make_policy,
)
from pdserve.router.prompt_tokens import PromptTokenizer
from pdserve.server.prompts import chat_prompt_ids
from pdserve.server.protocol import ChatCompletionRequest

A, B = "http://a", "http://b"
RATE = 1000.0  # tokens/s of every instance below


def inst(url: str, role: str = "colocated", **load) -> InstanceView:
    return InstanceView(url, (role,), prefill_rate=RATE, **load)


def test_block_hashes_are_the_same_in_another_process():
    # the router recomputes the engine's hashes: Python's hash(None) differs per process
    code = "from pdserve.block_hashing import hash_block; print(hash_block(None, [1, 2, 3]))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert int(other) == hash_block(None, [1, 2, 3])
    assert hash_block(hash_block(None, [1, 2]), [3, 4]) != hash_block(hash_block(None, [9, 2]),
                                                                      [3, 4])


def test_least_loaded_takes_the_fewest_outstanding_tokens():
    policy = make_policy("least_loaded")
    d = policy.decide(RequestView(100), [inst(A, outstanding_tokens=50), inst(B)])
    assert (d.kind, d.whole) == ("colocated", B)


def test_round_robin_takes_turns_in_url_order():
    policy = make_policy("round_robin")
    picks = [policy.decide(RequestView(10), [inst(B), inst(A)]).whole for _ in range(4)]
    assert picks == [A, B, A, B]


def test_cache_aware_sends_a_prompt_where_its_prefix_is():
    policy = make_policy("cache_aware")
    req = RequestView(1000, cached={B: 960})
    d = policy.decide(req, [inst(A), inst(B, outstanding_tokens=500)])
    assert d.whole == B


def test_cache_aware_leaves_a_holder_whose_queue_costs_more_than_the_prefix_saves():
    policy = make_policy("cache_aware")
    req = RequestView(1000, cached={B: 500})
    d = policy.decide(req, [inst(A), inst(B, queued_prefill_tokens=4000)])
    assert d.whole == A  # A: 1 s of prefill; B: 4 s of queue + 0.5 s


def test_cache_aware_breaks_ties_by_decode_load_then_kv_usage():
    policy = make_policy("cache_aware")
    assert policy.decide(RequestView(10), [inst(A, outstanding_tokens=9), inst(B)]).whole == B
    assert policy.decide(RequestView(10), [inst(A, kv_usage=0.5), inst(B)]).whole == B


def test_cache_aware_sends_a_new_prefix_to_the_instance_caching_least():
    # idle and equally loaded: a prefix nobody holds goes where it evicts least, so that
    # an idle fleet's prefixes spread over its caches (load still comes first)
    policy = make_policy("cache_aware")
    assert policy.decide(RequestView(600), [inst(A, cached_blocks=200),
                                            inst(B, cached_blocks=40)]).whole == B
    assert policy.decide(RequestView(600), [inst(A, cached_blocks=200),
                                            inst(B, cached_blocks=40,
                                                 outstanding_tokens=5)]).whole == A


def test_cache_aware_prefers_the_decode_instance_holding_the_prefix():
    policy = make_policy("cache_aware")
    req = RequestView(1000, cached={B: 992})
    d = policy.decide(req, [inst("http://p", "prefill"), inst(A, "decode"), inst(B, "decode")])
    assert d.disaggregated and (d.prefill, d.decode) == ("http://p", B)


def test_min_prompt_split_keeps_short_prompts_off_prefill():
    policy = make_policy("least_loaded", pd_min_prompt_tokens=100)
    pd = [inst("http://p", "prefill"), inst(A, "decode")]
    short, long = policy.decide(RequestView(99), pd), policy.decide(RequestView(100), pd)
    assert (short.kind, short.reason, short.whole) == ("short_prompt", "short_prompt", A)
    assert (long.kind, long.prefill, long.decode) == ("disagg", "http://p", A)


def test_one_token_is_served_by_prefill_alone():
    d = make_policy("conditional").decide(
        RequestView(5000, needs_decode=False), [inst("http://p", "prefill"), inst(A, "decode")])
    assert (d.kind, d.reason, d.whole) == ("prefill_only", "one_token", "http://p")


@pytest.mark.parametrize("prompt,cached,p_queue,want", [
    (40, 0, 0, ("whole_on_decode", "small_uncached")),  # 40 ms on D < the 50 ms hop
    (4000, 3980, 0, ("whole_on_decode", "small_uncached")),  # D holds all but 20
    (4000, 0, 9000, ("whole_on_decode", "prefill_queue")),  # 13 s on P - 4 s on D > 4 s stall
    (4000, 0, 1000, ("disagg", "long_uncached")),
])
def test_conditional_split_weighs_uncached_tokens_and_prefill_queue(prompt, cached, p_queue,
                                                                     want):
    policy = make_policy("conditional", pd_max_stall_s=5.0)  # D's decodes may wait 5 s
    views = [inst("http://p", "prefill", queued_prefill_tokens=p_queue),
             inst(A, "decode", running=4)]
    d = policy.decide(RequestView(prompt, cached={A: cached}), views)
    assert (d.kind, d.reason) == want
    assert d.decode == A if d.disaggregated else d.whole == A


def test_conditional_threshold_follows_the_measured_rate_and_hop():
    split = ConditionalSplit(hop_s=0.05)
    p = inst("http://p", "prefill")
    fast = InstanceView(A, ("decode",), running=1, prefill_rate=10_000.0)  # 400: 40 ms < hop
    assert split.split(RequestView(400), p, fast) == (False, "small_uncached")
    assert split.split(RequestView(400), p, inst(A, "decode", running=1))[0]  # 400 ms
    slow_hop = inst(A, "decode", running=1, hop_s=0.5)  # measured: 400 ms < 500 ms
    assert split.split(RequestView(400), p, slow_hop) == (False, "small_uncached")


def test_conditional_serves_whole_on_an_idle_decode_that_answers_no_later():
    split = ConditionalSplit(hop_s=0.05, max_stall_s=5.0)
    idle, busy = inst(A, "decode"), inst(A, "decode", running=2)
    assert split.split(RequestView(4000), inst("http://p", "prefill"), idle) == (
        False, "idle_decode")
    # within the bound only: a request arriving during the 4 s prefill may hand off into it
    assert ConditionalSplit(hop_s=0.05).split(RequestView(4000), inst("http://p", "prefill"),
                                              idle) == (True, "decode_stall")
    assert split.split(RequestView(4000), inst("http://p", "prefill"), busy)[0]
    # D idle but P holds most of the prompt: P answers sooner, so the hand-off wins
    request = RequestView(4000, cached={"http://p": 3900})
    assert split.split(request, inst("http://p", "prefill"), idle) == (True, "long_uncached")
    # D idle, but P is prefilling a prompt that will reach D while D would prefill this one
    handing_off = inst("http://p", "prefill", in_flight=1)
    assert split.split(RequestView(4000), handing_off, idle) == (True, "long_uncached")


def test_conditional_bounds_the_stall_a_whole_on_decode_prefill_puts_into_decodes():
    p_busy = inst("http://p", "prefill", queued_prefill_tokens=9000, in_flight=3)
    request = RequestView(4000)  # 4 s on D; 13 s through P's queue
    for d in (inst(A, "decode", running=4), inst(A, "decode", in_flight=1),  # D decodes
              inst(A, "decode")):  # or P's queue will hand off to D during the stall
        # default bound: D's hop (50 ms), the gap a hand-off itself costs a stream
        assert ConditionalSplit().split(request, p_busy, d) == (True, "decode_stall")
        assert ConditionalSplit(max_stall_s=3.9).split(request, p_busy, d) == (
            True, "decode_stall")
        assert ConditionalSplit(max_stall_s=4.0).split(request, p_busy, d) == (
            False, "prefill_queue")
    measured = inst(A, "decode", running=1, hop_s=5.0)  # a slow hop: 4 s is within it
    assert ConditionalSplit().split(request, p_busy, measured) == (False, "small_uncached")
    # the router's own count: a request just sent to D stalls as much as a running one
    just_sent = inst(A, "decode", in_flight=1)
    assert ConditionalSplit().split(request, inst("http://p", "prefill"), just_sent) == (
        True, "long_uncached")
    assert ConditionalSplit(max_stall_s=4.0).split(
        request, inst("http://p", "prefill"), inst(A, "decode")) == (False, "idle_decode")


def test_router_flag_sets_the_stall_bound():
    from argparse import ArgumentTypeError

    from pdserve.router.cli import _positive_float

    assert _positive_float("250") == 250.0
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ArgumentTypeError):
            _positive_float(bad)
    assert make_policy("conditional", pd_max_stall_s=0.25).splitter.max_stall_s == 0.25


def test_fallback_serves_whole_on_any_role_decode_first():
    d = make_policy("cache_aware").decide(RequestView(10), [inst(A, "decode")])
    assert (d.kind, d.whole, d.reason) == ("fallback", A, "no_pair_decode")
    assert make_policy("round_robin").decide(RequestView(10), []) is None


def test_event_log_gives_the_net_change_of_a_step():
    pool = BlockPool(num_blocks=2, block_size=2)
    pool.events = KVEventLog()
    first, second = pool.allocate(2)
    pool.register(first, 11)
    pool.register(second, 12)
    pool.free([first, second])
    assert (pool.events.take().stored, pool.events.take().stored) == ([11, 12], [])
    pool.allocate(1)  # evicts the least recently freed: 12 (tails are freed first)
    again = pool.allocate(1)[0]  # and 11, then stores 13 in its place
    pool.register(again, 13)
    events = pool.events.take()
    assert (sorted(events.removed), events.stored) == ([11, 12], [13])


def test_index_counts_what_the_engine_prefix_cache_would_serve():
    bs, tokens = 4, list(range(100, 118))  # 4 full blocks + 2 tokens
    pool = BlockPool(num_blocks=8, block_size=bs)
    hashes = block_hashes(tokens, bs)
    ids = pool.allocate(3)
    for block_id, h in zip(ids, hashes[:3]):
        pool.register(block_id, h)
    index = KVIndex()
    index.reset(A, bs, list(pool.cached))
    index.reset(B, bs, [hashes[0], hashes[2]])  # block 1 missing: only block 0 counts
    got = index.cached_tokens(tokens)
    assert got[A] == pool.peek_cached(hashes[:usable_blocks(len(tokens), bs)]) * bs == 12
    assert got[B] == 4
    index.removed(A, [hashes[1]])
    assert index.cached_tokens(tokens)[A] == 4
    index.drop(A)
    assert A not in index.cached_tokens(tokens)


def test_a_routed_prompt_counts_as_held_until_events_confirm_it_or_it_expires():
    now = [0.0]
    index = KVIndex(clock=lambda: now[0])
    tokens = list(range(100, 117))  # 4 whole blocks of 4 + 1 token
    hashes = block_hashes(tokens, 4)
    index.reset(A, 4, [])
    index.reset(B, 4, [])
    index.routed(A, tokens)  # sent, not prefilled yet: its events have not come
    assert index.cached_tokens(tokens) == {A: 16, B: 0} and index.num_blocks(A) == 4
    index.stored(A, hashes[:2])  # prefilled: two blocks confirmed, two still pending
    now[0] = 31.0  # past PENDING_TTL_S: what no event confirmed is forgotten
    assert index.cached_tokens(tokens) == {A: 8, B: 0} and index.num_blocks(A) == 2
    index.routed(B, tokens)
    index.drop(B)  # a broken stream forgets the pending blocks too
    assert B not in index.cached_tokens(tokens) and index.num_blocks(B) == 0


def test_index_never_counts_the_last_token():
    index = KVIndex()
    tokens = list(range(8))
    index.reset(A, 4, block_hashes(tokens, 4))
    assert index.cached_tokens(tokens)[A] == 4  # the 8th token must run for logits


def test_index_refuses_malformed_events():
    index = KVIndex()
    with pytest.raises(ValueError):
        index.stored(A, [1])  # before any snapshot
    with pytest.raises(ValueError):
        index.reset(A, 0, [])
    index.reset(A, 4, [])
    for bad in (["1"], [-1], [1 << 64], "1", [1.0]):
        with pytest.raises(ValueError):
            index.stored(A, bad)


@pytest.fixture(scope="module")
def tokenizer():
    from pdserve.models.loader import load_tokenizer

    return load_tokenizer(None)


def test_router_tokenizes_chat_as_the_instance_does(tokenizer):
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hi there"}]}
    req = ChatCompletionRequest.model_validate(body)
    want = chat_prompt_ids(tokenizer, req.messages, req.add_generation_prompt)
    assert PromptTokenizer(tokenizer=tokenizer).ids_now(True, body) == want
    assert PromptTokenizer(tokenizer=tokenizer).ids_now(False, {"prompt": "Hi"}) == \
        tokenizer("Hi").input_ids
    assert PromptTokenizer(tokenizer=tokenizer).ids_now(True, {"messages": "x"}) is None
