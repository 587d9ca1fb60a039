"""Conditional disaggregation: a prompt under --pd-min-prompt-tokens is served whole on D."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.router.cluster import (
    GREEDY,
    internal,
    metric,
    sse_events,
    start_router,
    stream_text,
)

MIN_PROMPT_TOKENS = 32  # the router estimates about 4 characters a token
SHORT = "Hi there"
LONG = "Once upon a time, in a land far away, there lived a wise old king. " * 4
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def router(fleet, routers_tmp) -> Iterator:
    r = start_router(routers_tmp, prefill=[fleet.p0], decode=[fleet.d0],
                     flags=("--pd-min-prompt-tokens", str(MIN_PROMPT_TOKENS)))
    yield r
    r.stop()


def prompt_tokens(inst) -> float:
    """Prompt tokens the instance has processed: it moves with every request served."""
    return metric(inst.url, "vllm:prompt_tokens_total")


def routed(router, kind: str) -> float:
    return metric(router.url, "pdserve_router:requests_total", kind=kind)


def complete(url: str, prompt: str) -> dict:
    body = {"prompt": prompt, "max_tokens": 8, "logprobs": 0,
            "return_tokens_as_token_ids": True, **GREEDY}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_short_prompt_skips_prefill_and_gets_the_colocated_tokens(fleet, router):
    want = complete(fleet.c0.url, SHORT)
    p_before, d_before = prompt_tokens(fleet.p0), prompt_tokens(fleet.d0)
    short_before, disagg_before = routed(router, "short_prompt"), routed(router, "disagg")
    got = complete(router.url, SHORT)
    assert got["choices"][0]["logprobs"]["tokens"] == want["choices"][0]["logprobs"]["tokens"]
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert prompt_tokens(fleet.p0) == p_before  # P never saw it
    assert prompt_tokens(fleet.d0) > d_before
    assert routed(router, "short_prompt") == short_before + 1
    assert routed(router, "disagg") == disagg_before


def test_long_prompt_is_disaggregated_and_gets_the_colocated_tokens(fleet, router):
    want = complete(fleet.c0.url, LONG)
    p_before, disagg_before = prompt_tokens(fleet.p0), routed(router, "disagg")
    short_before = routed(router, "short_prompt")
    got = complete(router.url, LONG)
    assert got["choices"][0]["logprobs"]["tokens"] == want["choices"][0]["logprobs"]["tokens"]
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert prompt_tokens(fleet.p0) > p_before
    assert routed(router, "disagg") == disagg_before + 1
    assert routed(router, "short_prompt") == short_before


def test_short_chat_stream_skips_prefill(fleet, router):
    body = {"messages": CHAT, "max_tokens": 8, "stream": True, **GREEDY}
    want = httpx.post(fleet.c0.url + "/v1/chat/completions", json={**body, "stream": False},
                      timeout=300).json()["choices"][0]["message"]["content"]
    p_before = prompt_tokens(fleet.p0)
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=body,
                      timeout=300) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    assert stream_text(events, chat=True) == want
    assert events[-1] == "[DONE]"
    assert prompt_tokens(fleet.p0) == p_before


def test_a_streamed_handoff_measures_the_decode_instance_hop(fleet, router):
    body = {"prompt": LONG, "max_tokens": 4, "stream": True, **GREEDY}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=300) as resp:
        assert resp.status_code == 200
        sse_events(resp)
    hop = metric(router.url, "pdserve_router:instance_hop_seconds", role="decode")
    assert 0 < hop < 60  # D's pull and first step, measured by the router
    listed = internal("GET", router.url, "/instances").json()["instances"]
    by_url = {i["url"]: i for i in listed}
    assert by_url[fleet.d0.url]["hop_s"] == pytest.approx(hop)
    assert by_url[fleet.p0.url]["hop_s"] is None  # only a D is handed requests
