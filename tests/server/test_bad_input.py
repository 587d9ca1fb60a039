"""Item 8: every kind of bad input gets an OpenAI error body, never a 500, and the server
goes on serving."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_helpers import assert_openai_error, assert_still_serves, stream_events

OK_CHAT = [{"role": "user", "content": "hi"}]


def post_raw(client, path: str, content: bytes):
    return client.post(path, content=content, headers={"content-type": "application/json"})


def test_malformed_json(client):
    assert_openai_error(post_raw(client, "/v1/completions", b'{"prompt": "hi",'), 400)
    assert_still_serves(client)


def test_body_that_is_not_an_object(client):
    assert_openai_error(post_raw(client, "/v1/completions", b'["hi"]'), 400)
    assert_still_serves(client)


def test_invalid_utf8(client):
    resp = post_raw(client, "/v1/completions", b'{"prompt": "caf\xc3\x28 \xff"}')
    assert_openai_error(resp, 400)
    assert "UTF-8" in resp.json()["error"]["message"]
    assert_still_serves(client)


def test_lone_surrogate_escape(client):
    resp = post_raw(client, "/v1/completions", b'{"prompt": "bad \\udcff text"}')
    assert_openai_error(resp, 400)
    assert_still_serves(client)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "hot"),
        ("max_tokens", "10"),
        ("max_tokens", 3.5),
        ("stream", "yes"),
        ("stop", 7),
        ("seed", "abc"),
        ("top_k", True),
    ],
)
def test_wrong_type(client, field, value):
    resp = client.post("/v1/completions", json={"prompt": "hi", field: value})
    assert_openai_error(resp, 400, param=field)
    assert_still_serves(client)


def test_missing_prompt(client):
    assert_openai_error(client.post("/v1/completions", json={"max_tokens": 2}), 400, "prompt")
    assert_still_serves(client)


def test_unknown_model_is_404(client):
    resp = client.post("/v1/completions", json={"prompt": "hi", "model": "gpt-17"})
    assert_openai_error(resp, 404, "model")
    assert resp.json()["error"]["code"] == "model_not_found"
    assert_still_serves(client)


def test_unknown_model_in_chat_is_404(client):
    resp = client.post("/v1/chat/completions", json={"messages": OK_CHAT, "model": "nope"})
    assert_openai_error(resp, 404, "model")
    assert_still_serves(client)


@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_max_tokens(client, value):
    resp = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": value})
    assert_openai_error(resp, 400, "max_tokens")
    assert_still_serves(client)


def test_absurd_max_tokens(client):
    resp = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10**9})
    assert_openai_error(resp, 400, "max_tokens")
    assert "context length" in resp.json()["error"]["message"]
    assert_still_serves(client)


def test_max_tokens_beyond_32_bits(client):
    resp = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10**12})
    assert_openai_error(resp, 400, "max_tokens")
    assert "less than or equal to 2147483647" in resp.json()["error"]["message"]
    assert_still_serves(client)


@pytest.mark.parametrize("value", [-0.5, 2.5, 1e308])
def test_out_of_range_temperature(client, value):
    resp = client.post("/v1/completions", json={"prompt": "hi", "temperature": value})
    assert_openai_error(resp, 400, "temperature")
    assert_still_serves(client)


def test_nan_temperature(client):
    # refused while parsing (JSON has no NaN), before any field is looked at
    resp = post_raw(client, "/v1/completions", b'{"prompt": "hi", "temperature": NaN}')
    assert_openai_error(resp, 400)
    assert "NaN" in resp.json()["error"]["message"]
    assert_still_serves(client)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_out_of_range_top_p(client, value):
    resp = client.post("/v1/completions", json={"prompt": "hi", "top_p": value})
    assert_openai_error(resp, 400, "top_p")
    assert_still_serves(client)


def test_prompt_longer_than_context(client):
    max_len = client.get("/v1/models").json()["data"][0]["max_model_len"]
    resp = client.post("/v1/completions", json={"prompt": [42] * (max_len + 1)})
    assert_openai_error(resp, 400, "prompt")
    assert "context length" in resp.json()["error"]["message"]
    assert_still_serves(client)


def test_long_text_prompt_over_context_in_chat(client):
    max_len = client.get("/v1/models").json()["data"][0]["max_model_len"]
    messages = [{"role": "user", "content": "word " * (max_len + 10)}]
    resp = client.post("/v1/chat/completions", json={"messages": messages})
    assert_openai_error(resp, 400, "prompt")
    assert_still_serves(client)


@pytest.mark.parametrize("prompt", ["", [], [[]]])
def test_empty_prompt(client, prompt):
    resp = client.post("/v1/completions", json={"prompt": prompt})
    assert_openai_error(resp, 400, "prompt")
    assert_still_serves(client)


def test_empty_messages(client):
    resp = client.post("/v1/chat/completions", json={"messages": []})
    assert_openai_error(resp, 400, "messages")
    assert_still_serves(client)


def test_unknown_chat_role(client):
    messages = [{"role": "wizard", "content": "hi"}]
    resp = client.post("/v1/chat/completions", json={"messages": messages})
    assert_openai_error(resp, 400, "messages")
    assert_still_serves(client)


@pytest.mark.parametrize("ids, why", [([1, 2, 10**9], "vocabulary"),
                                      ([5, -1], "greater than or equal to 0"),
                                      ([5, 2**40], "less than or equal to 2147483647")])
def test_token_ids_out_of_vocabulary(client, ids, why):
    resp = client.post("/v1/completions", json={"prompt": ids})
    assert_openai_error(resp, 400, "prompt")
    assert why in resp.json()["error"]["message"]
    assert_still_serves(client)


def test_stop_token_ids_out_of_vocabulary(client):
    resp = client.post("/v1/completions", json={"prompt": "hi", "stop_token_ids": [10**9]})
    assert_openai_error(resp, 400, "stop_token_ids")
    assert_still_serves(client)


def test_n_above_its_bound_is_refused_clearly(client):
    resp = client.post("/v1/completions", json={"prompt": "hi", "n": 17})
    assert_openai_error(resp, 400, "n")
    assert_still_serves(client)


def test_too_many_logprobs(client):
    resp = client.post("/v1/completions", json={"prompt": "hi", "logprobs": 21})
    assert_openai_error(resp, 400, "logprobs")
    assert_still_serves(client)


def test_top_logprobs_without_logprobs(client):
    body = {"messages": OK_CHAT, "top_logprobs": 2}
    assert_openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert_still_serves(client)


def test_too_many_batched_prompts_are_refused_clearly(client):
    resp = client.post("/v1/completions", json={"prompt": ["a"] * 65})
    assert_openai_error(resp, 400, "prompt")
    assert_still_serves(client)


def test_unknown_route_is_openai_shaped_404(client):
    assert_openai_error(client.post("/v1/nothing", json={}), 404)
    assert_still_serves(client)


@pytest.mark.parametrize("stream", [False, True])
def test_kv_transfer_params_on_a_colocated_instance(client, stream):
    # refused at the edge, before the engine: a client's kv_transfer_params are internal to
    # a deployment (docs/DESIGN.md, Trust model); a 400 even streaming
    body = {"prompt": "hi", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True},
            "stream": stream}
    resp = client.post("/v1/completions", json=body)
    assert_openai_error(resp, 400, "kv_transfer_params")
    assert "internal" in resp.json()["error"]["message"]
    assert_still_serves(client)


def test_kv_transfer_params_of_the_wrong_type(client):
    resp = client.post("/v1/completions", json={"prompt": "hi", "kv_transfer_params": "P1"})
    assert_openai_error(resp, 400, "kv_transfer_params")
    assert_still_serves(client)


def test_bad_inputs_do_not_disturb_a_request_in_flight(client, server):
    body = {"prompt": "The ocean is", "max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    expected = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    def stream_on_own_connection() -> list:
        with httpx.Client(base_url=server.url, timeout=300) as other:
            return stream_events(other, "/v1/completions", body)

    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(stream_on_own_connection)
        for raw in [b"{", b'{"prompt": [99999999]}', b'{"prompt": "x", "top_p": 7}',
                    b'{"prompt": "x", "model": "nope"}', b'\xff\xfe']:
            assert post_raw(client, "/v1/completions", raw).status_code in (400, 404)
        events = in_flight.result()
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
