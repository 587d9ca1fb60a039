"""/v1/completions: bodies, streaming, usage, stop strings, logprobs, seeds."""

from __future__ import annotations

from server_helpers import GREEDY, complete, stream_events

PROMPT = "The capital of France is"


def test_non_streaming_body_has_the_openai_shape(client, model_name):
    out = complete(client, PROMPT, max_tokens=5, **GREEDY)
    assert out["object"] == "text_completion" and out["model"] == model_name
    assert out["id"].startswith("cmpl-")
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert isinstance(choice["text"], str) and choice["text"]
    usage = out["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert "cached_tokens" in usage["prompt_tokens_details"]


def test_streaming_text_equals_non_streaming_text(client):
    body = {"prompt": PROMPT, "max_tokens": 8, **GREEDY}
    full = complete(client, **body)["choices"][0]["text"]
    events = stream_events(client, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)  # only with include_usage


def test_stream_include_usage_ends_with_a_usage_chunk(client):
    body = {"prompt": PROMPT, "max_tokens": 4, "stream_options": {"include_usage": True},
            **GREEDY}
    events = stream_events(client, "/v1/completions", body)
    *chunks, usage_chunk, done = events
    assert done == "[DONE]"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    assert all(c["usage"] is None for c in chunks)


def test_token_id_prompt_equals_text_prompt(client, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    by_text = complete(client, PROMPT, max_tokens=6, **GREEDY)
    by_ids = complete(client, ids, max_tokens=6, **GREEDY)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)


def test_stop_string_across_token_boundaries_is_cut_and_not_sent(client):
    reference = complete(client, PROMPT, max_tokens=12, **GREEDY)["choices"][0]["text"]
    # a stop made of the end of one word and the start of the next spans several tokens
    words = reference.split()
    stop = words[1][-2:] + " " + words[2][:2]
    cut = reference[: reference.index(stop)]
    out = complete(client, PROMPT, max_tokens=12, stop=[stop], **GREEDY)
    choice = out["choices"][0]
    assert choice["text"] == cut
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    events = stream_events(client, "/v1/completions",
                           {"prompt": PROMPT, "max_tokens": 12, "stop": stop, **GREEDY})
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed == cut


def test_include_stop_str_in_output(client):
    reference = complete(client, PROMPT, max_tokens=6, **GREEDY)["choices"][0]["text"]
    stop = reference.strip()[:3]
    out = complete(client, PROMPT, max_tokens=6, stop=stop, include_stop_str_in_output=True,
                   **GREEDY)
    text = out["choices"][0]["text"]
    assert text.endswith(stop) and text == reference[: reference.index(stop) + len(stop)]


def test_stop_token_ids_end_the_request(client, tokenizer):
    reference = complete(client, PROMPT, max_tokens=6, **GREEDY)
    third = tokenizer(reference["choices"][0]["text"], add_special_tokens=False).input_ids[2]
    out = complete(client, PROMPT, max_tokens=6, stop_token_ids=[third], **GREEDY)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["stop_reason"] == third
    assert out["usage"]["completion_tokens"] == 3


def test_logprobs_of_greedy_tokens_are_the_top_alternative(client):
    out = complete(client, PROMPT, max_tokens=4, logprobs=3, **GREEDY)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    for sampled, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert sampled <= 0.0 and 1 <= len(top) <= 3
        assert sampled == max(top.values())


def test_logprobs_absent_unless_asked(client):
    out = complete(client, PROMPT, max_tokens=2, **GREEDY)
    assert out["choices"][0]["logprobs"] is None


def test_same_seed_same_text(client):
    body = {"max_tokens": 8, "temperature": 1.0, "seed": 1234}
    first = complete(client, "Once upon a time", **body)["choices"][0]["text"]
    second = complete(client, "Once upon a time", **body)["choices"][0]["text"]
    assert first == second


def test_different_seeds_sample_differently(client):
    texts = {
        complete(client, "My favourite word is", max_tokens=8, temperature=1.5, seed=s)
        ["choices"][0]["text"]
        for s in (1, 2, 3)
    }
    assert len(texts) > 1


def test_kv_transfer_params_round_trip_is_a_dict_or_absent(client):
    # The engine fills kv_transfer_params on P/D instances; colocated, it may echo nothing.
    resp = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, **GREEDY})
    assert resp.status_code == 200, resp.text
    assert isinstance(resp.json().get("kv_transfer_params", {}), dict)
    # a client's own are refused (docs/DESIGN.md, Trust model): internal to a deployment
    for params in ({"x": 1}, {"do_remote_decode": True}):
        resp = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1,
                                                    "kv_transfer_params": params, **GREEDY})
        assert resp.status_code == 400, params
        assert resp.json()["error"]["param"] == "kv_transfer_params"
