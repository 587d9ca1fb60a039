"""/v1/chat/completions: chat template, streaming, logprobs, a sensible answer."""

from __future__ import annotations

import re

from server_helpers import GREEDY, chat, stream_events

QUESTION = "What is the capital of France?"


def test_chat_answers_in_sensible_english(client):
    out = chat(client, QUESTION, max_tokens=40, **GREEDY)
    (choice,) = out["choices"]
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert choice["message"]["role"] == "assistant"
    answer = choice["message"]["content"]
    assert "Paris" in answer
    words = re.findall(r"[A-Za-z]+", answer)
    assert len(words) >= 4 and "<|im_end|>" not in answer
    assert choice["finish_reason"] == "stop"  # the model ended its turn by itself


def test_chat_uses_the_chat_template(client, tokenizer):
    out = chat(client, QUESTION, max_tokens=1, **GREEDY)
    messages = [{"role": "user", "content": QUESTION}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = len(tokenizer(text, add_special_tokens=False).input_ids)
    assert out["usage"]["prompt_tokens"] == expected


def test_chat_streaming_matches_non_streaming(client):
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, **GREEDY}
    full = chat(client, QUESTION, max_tokens=12, **GREEDY)["choices"][0]["message"]["content"]
    events = stream_events(client, "/v1/chat/completions",
                           {**body, "stream_options": {"include_usage": True}})
    *chunks, usage_chunk, done = events
    assert done == "[DONE]"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1


def test_chat_logprobs(client):
    out = chat(client, QUESTION, max_tokens=3, logprobs=True, top_logprobs=2, **GREEDY)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for item in content:
        assert item["logprob"] <= 0.0 and len(item["top_logprobs"]) == 2
        assert item["logprob"] == item["top_logprobs"][0]["logprob"]
        assert isinstance(item["bytes"], list)


def test_max_completion_tokens_is_honoured(client):
    out = chat(client, "Tell me a long story.", max_completion_tokens=3, **GREEDY)
    assert out["usage"]["completion_tokens"] == 3
    assert out["choices"][0]["finish_reason"] == "length"


def test_system_message_and_content_parts(client):
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    resp = client.post("/v1/chat/completions",
                       json={"messages": messages, "max_tokens": 4, **GREEDY})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]
