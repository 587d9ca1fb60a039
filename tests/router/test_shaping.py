"""The router's body shaping: P and D requests, P's token as chunks, P and D merged."""

from __future__ import annotations

import json

from pdserve.router.pairing import estimate_prompt_tokens, least_loaded
from pdserve.router.registry import Instance, Registry
from pdserve.router.relay import DecodeRelay
from pdserve.router.shaping import answer_as_stream, first_chunks, merge, prefill_body


def p_answer(chat: bool) -> dict:
    choice = {"index": 0, "logprobs": None, "finish_reason": "length", "stop_reason": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": "Hello"}
    else:
        choice["text"] = " Paris"
    return {"id": "p-1", "object": "x", "created": 1, "model": "m", "choices": [choice],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            "kv_transfer_params": {"do_remote_prefill": True}}


def test_prefill_body_asks_for_one_unstreamed_token_and_kv_kept():
    body = {"prompt": "x", "max_tokens": 9, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}
    out = prefill_body(body)
    assert out == {"prompt": "x", "max_tokens": 1, "stream": False, "temperature": 0,
                   "kv_transfer_params": {"do_remote_decode": True}, "decode_max_tokens": 9}
    assert body["max_tokens"] == 9  # the client's body is not changed


def test_prefill_body_carries_the_decode_budget_and_caps_min_tokens():
    body = {"messages": [], "max_tokens": 5, "max_completion_tokens": 50, "min_tokens": 3}
    out = prefill_body(body, chat=True)
    assert out["decode_max_tokens"] == 50 and out["max_tokens"] == 1
    assert out["min_tokens"] == 1 and "max_completion_tokens" not in out
    # completions ignore max_completion_tokens, as the instances do
    assert "decode_max_tokens" not in prefill_body({"prompt": "x", "max_completion_tokens": 50})


def test_merge_puts_p_text_first_and_takes_usage_from_d():
    d = {"id": "d-1", "object": "text_completion", "created": 2, "model": "m",
         "choices": [{"index": 0, "text": ".", "logprobs": None, "finish_reason": "length"}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    out = merge(p_answer(False), d, chat=False)
    assert out["id"] == "p-1" and out["choices"][0]["text"] == " Paris."
    assert out["usage"]["completion_tokens"] == 2 and "kv_transfer_params" not in out


def test_merge_concatenates_completion_logprobs_with_shifted_offsets():
    p = p_answer(False)
    p["choices"][0]["logprobs"] = {"tokens": ["a"], "token_logprobs": [-1.0],
                                   "top_logprobs": [{}], "text_offset": [0]}
    d = {"id": "d", "choices": [{"index": 0, "text": "bc", "finish_reason": "length",
         "logprobs": {"tokens": ["b", "c"], "token_logprobs": [-2.0, -3.0],
                      "top_logprobs": [{}, {}], "text_offset": [0, 1]}}]}
    lp = merge(p, d, chat=False)["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"] and lp["text_offset"] == [0, 6, 7]


def test_first_chunks_of_chat_name_the_role_then_the_content():
    role, content = first_chunks(p_answer(True), chat=True, include_usage=False)
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content["choices"][0]["delta"] == {"content": "Hello"}
    assert content["choices"][0]["finish_reason"] is None
    assert role["object"] == content["object"] == "chat.completion.chunk"


def test_a_finished_answer_replays_as_a_whole_stream():
    events = answer_as_stream(p_answer(False), chat=False, include_usage=True)
    parsed = [e[len("data: "):].strip() for e in events]
    assert parsed[-1] == "[DONE]"
    last_chunk, usage = json.loads(parsed[0]), json.loads(parsed[1])
    assert last_chunk["choices"][0]["finish_reason"] == "length"
    assert usage["usage"]["completion_tokens"] == 1 and usage["choices"] == []


def test_decode_relay_drops_d_role_chunk_and_uses_p_id():
    relay = DecodeRelay("p-1", chat=True, text_offset=5)
    role = {"id": "d", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}
    token = {"id": "d", "choices": [{"index": 0, "delta": {"content": "!"},
                                     "finish_reason": None}]}
    assert relay.event("data: " + json.dumps(role)) is None
    assert json.loads(relay.event("data: " + json.dumps(token))[6:])["id"] == "p-1"
    assert relay.event("") is None and not relay.done
    assert relay.event("data: [DONE]") == "data: [DONE]\n\n" and relay.done


def test_least_loaded_counts_outstanding_tokens_and_skips_excluded():
    a, b = Instance("http://a", "prefill"), Instance("http://b", "prefill")
    a.outstanding_tokens = 100
    assert least_loaded([a, b]) is b
    assert least_loaded([a, b], exclude={"http://b"}) is a
    assert least_loaded([a], exclude={"http://a"}) is None


def test_prompt_estimate_grows_with_the_prompt():
    short = estimate_prompt_tokens({"prompt": "hi"})
    long = estimate_prompt_tokens({"prompt": "hi " * 100})
    chat = estimate_prompt_tokens({"messages": [{"role": "user", "content": "hi " * 100}]})
    assert short < long <= chat
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}) == 3


def test_registered_instances_expire_without_heartbeat_but_static_ones_stay():
    reg = Registry(heartbeat_ttl_s=0.0)
    reg.add_static("127.0.0.1:1", "decode")
    reg.register("http://127.0.0.1:2/", "prefill")
    assert [i.url for i in reg.expire()] == ["http://127.0.0.1:2"]
    assert [i.url for i in reg.all()] == ["http://127.0.0.1:1"]
