"""The router's body shaping: P and D requests, P's token as chunks."""

from __future__ import annotations

import json

import pytest

from pdserve.router.pairing import estimate_prompt_tokens, least_loaded
from pdserve.router.registry import Instance, Registry
from pdserve.router.relay import InstanceFailed, Progress, StreamRelay
from pdserve.router.shaping import (
    answer_as_stream,
    first_chunks,
    prefill_body,
    resume_body,
)


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
    progress = Progress.after_prefill(p_answer(True), chat=True, first_token_id=7)
    relay = StreamRelay(chat=True, progress=progress)
    role = {"id": "d", "created": 9, "choices": [{"index": 0, "delta": {
        "role": "assistant", "content": ""}, "finish_reason": None}]}
    token = {"id": "d", "created": 9, "choices": [{"index": 0, "delta": {"content": "!"},
                                                   "finish_reason": None, "token_ids": [8]}]}
    assert relay.event("data: " + json.dumps(role)) is None
    relayed = json.loads(relay.event("data: " + json.dumps(token))[6:])
    assert relayed["id"] == "p-1" and relayed["created"] == 1
    assert "token_ids" not in relayed["choices"][0]  # the router asked for them, not the client
    assert progress.token_ids == [7, 8] and progress.text_chars == len("Hello!")
    assert relay.event("") is None and not progress.done
    assert relay.event("data: [DONE]") == "data: [DONE]\n\n" and progress.done


def test_relay_shifts_completion_offsets_after_what_the_client_has():
    progress = Progress(token_ids=[1, 2], text_chars=5, response_id="c-1", created=1)
    relay = StreamRelay(chat=False, progress=progress)
    chunk = {"id": "other", "created": 2, "choices": [{"index": 0, "text": "ab",
             "token_ids": [3], "finish_reason": "length",
             "logprobs": {"tokens": ["ab"], "text_offset": [0]}}]}
    relayed = json.loads(relay.event("data: " + json.dumps(chunk))[6:])
    assert relayed["choices"][0]["logprobs"]["text_offset"] == [5]
    assert progress.token_ids == [1, 2, 3] and progress.finished


def test_relay_counts_an_instance_error_in_the_stream_as_its_failure():
    relay = StreamRelay(chat=False, progress=Progress())
    error = {"error": {"message": "engine died", "type": "server_error", "code": "engine_dead"}}
    with pytest.raises(InstanceFailed):
        relay.event("data: " + json.dumps(error))


def test_resume_body_continues_after_the_client_s_tokens():
    body = {"prompt": "x", "max_tokens": 9, "stream": True,
            "kv_transfer_params": {"do_remote_prefill": True}}
    out = resume_body(body, [5, 6], 3)
    assert out == {"prompt": "x", "max_tokens": 9, "stream": True, "return_token_ids": True,
                   "resume": {"token_ids": [5, 6], "text_chars": 3}}
    assert "resume" not in resume_body(body, [], 0)  # nothing yet: it simply starts again


def test_least_loaded_counts_outstanding_tokens_and_skips_excluded():
    a, b = Instance("http://a", ("prefill",)), Instance("http://b", ("prefill",))
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


def test_one_url_given_as_prefill_and_decode_is_one_instance_serving_both():
    """E.g. a vLLM instance with kv_role kv_both, or `--prefill X --decode X`."""
    reg = Registry()
    a = reg.add_static("127.0.0.1:1", "prefill")
    b = reg.add_static("http://127.0.0.1:1/", "decode")
    assert a is b and reg.all() == [a] and a.role == "prefill+decode"
    a.mark(True)
    assert reg.healthy("prefill") == reg.healthy("decode") == [a]
    assert reg.healthy("colocated") == []
