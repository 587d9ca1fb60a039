"""The endpoints tools call beside the OpenAI API, in vLLM's shapes: /tokenize, /detokenize,
/version, /ping and GET /v1/models/{model_id}."""

from __future__ import annotations

import pytest
from server_helpers import assert_openai_error

import pdserve

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_tokenize_a_prompt_as_the_tokenizer_does(client, tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    body = client.post("/tokenize", json={"prompt": text}).json()
    assert body["tokens"] == tokenizer(text).input_ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
    assert body["token_strs"] is None


def test_tokenize_returns_token_strings_on_request(client, tokenizer):
    body = client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True,
                                          "add_special_tokens": False}).json()
    assert body["tokens"] == tokenizer("Hello world", add_special_tokens=False).input_ids
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])


def test_tokenize_messages_with_the_chat_template(client, tokenizer):
    body = client.post("/tokenize", json={"messages": MESSAGES}).json()
    assert body["tokens"] == chat_ids(tokenizer, MESSAGES, add_generation_prompt=True)
    bare = client.post("/tokenize", json={"messages": MESSAGES,
                                          "add_generation_prompt": False}).json()
    assert bare["tokens"] == chat_ids(tokenizer, MESSAGES, add_generation_prompt=False)
    assert bare["count"] < body["count"]


def test_tokenize_can_continue_the_final_message(client, tokenizer):
    messages = [*MESSAGES, {"role": "assistant", "content": "Hello, I am"}]
    body = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False,
                                          "continue_final_message": True}).json()
    assert body["tokens"] == chat_ids(tokenizer, messages, continue_final_message=True)


def test_tokenize_counts_what_a_chat_request_sends(client):
    """`vllm bench serve` relies on it: the count is the prompt_tokens of the same chat."""
    count = client.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    resp = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
    assert resp.json()["usage"]["prompt_tokens"] == count


def test_detokenize_inverts_tokenize(client, tokenizer):
    text = "Paris is the capital of France."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": text}


@pytest.mark.parametrize("body", [
    {},  # neither prompt nor messages
    {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},  # both
    {"prompt": 12},  # strict: a number is not text
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
    {"prompt": "x", "return_token_strs": "yes"},
])
def test_bad_tokenize_requests_are_400(client, body):
    assert_openai_error(client.post("/tokenize", json=body), 400)


@pytest.mark.parametrize("tokens", [[-1], [10**9], [2**40], ["1"], [1.5], "12", None])
def test_bad_detokenize_requests_are_400(client, tokens):
    assert_openai_error(client.post("/detokenize", json={"tokens": tokens}), 400)


@pytest.mark.parametrize("raw", [b"{not json", b'{"prompt": "\\ud800"}'])  # a lone surrogate
def test_a_body_that_is_not_json_or_not_unicode_is_400(client, raw):
    resp = client.post("/tokenize", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(resp, 400)


def test_another_model_is_404(client):
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        resp = client.post(path, json={**body, "model": "no-such-model"})
        assert_openai_error(resp, 404)
        assert resp.json()["error"]["code"] == "model_not_found"


def test_models_by_id(client, model_name):
    card = client.get(f"/v1/models/{model_name}").json()
    assert card["id"] == model_name and card["object"] == "model"
    resp = client.get("/v1/models/no-such/model")
    assert_openai_error(resp, 404)
    assert resp.json()["error"]["code"] == "model_not_found"


def test_version_and_ping(client):
    assert client.get("/version").json() == {"version": pdserve.__version__}
    assert client.get("/ping").status_code == 200
    assert client.post("/ping").status_code == 200
