"""A request that P's first token already finishes: answered by P alone, its KV freed at once.

P here (slow_lease_prefill, shared with test_lease_release) holds leases for 600 s, so blocks
that come back within seconds were released on purpose (a stop string the engine could not
see), not by lease expiry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.router.cluster import (
    GREEDY,
    metric,
    sse_events,
    start_router,
    stream_text,
    wait_all_free,
)

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def router(fleet, routers_tmp, slow_lease_prefill) -> Iterator:
    r = start_router(routers_tmp, prefill=[slow_lease_prefill], decode=[fleet.d0])
    yield r
    r.stop()


def first_token_text(url: str) -> str:
    body = {"prompt": PROMPT, "max_tokens": 1, **GREEDY}
    return httpx.post(url + "/v1/completions", json=body, timeout=120).json()[
        "choices"][0]["text"]


def decode_requests(d) -> float:
    return metric(d.url, "vllm:prompt_tokens_total")


def assert_nothing_held(p) -> None:
    """No lease and every block free, within seconds of the answer (the TTL is 600 s)."""
    start = time.monotonic()
    assert wait_all_free(p, timeout_s=10) == {p.url: 0}
    assert metric(p.url, "pdserve:num_kv_leases") == 0
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_in_the_first_token_ends_the_request_on_prefill(
        stream, fleet, router, slow_lease_prefill):
    stop = first_token_text(fleet.c0.url).strip()
    assert stop
    body = {"prompt": PROMPT, "max_tokens": 12, "stop": [stop], **GREEDY}
    want = httpx.post(fleet.c0.url + "/v1/completions", json=body, timeout=120).json()
    decoded = decode_requests(fleet.d0)
    if stream:
        with httpx.stream("POST", router.url + "/v1/completions",
                          json={**body, "stream": True}, timeout=120) as resp:
            assert resp.status_code == 200
            events = sse_events(resp)
        assert events[-1] == "[DONE]"
        assert stream_text(events, chat=False) == want["choices"][0]["text"]
        last = [e for e in events if isinstance(e, dict)][-1]["choices"][0]
        got = {k: last[k] for k in ("finish_reason", "stop_reason")}
    else:
        answer = httpx.post(router.url + "/v1/completions", json=body, timeout=120).json()
        assert "kv_transfer_params" not in answer
        assert answer["choices"][0]["text"] == want["choices"][0]["text"]
        assert answer["usage"]["completion_tokens"] == want["usage"]["completion_tokens"] == 1
        got = {k: answer["choices"][0][k] for k in ("finish_reason", "stop_reason")}
    assert got == {"finish_reason": "stop", "stop_reason": stop}
    assert want["choices"][0]["stop_reason"] == stop
    assert decode_requests(fleet.d0) == decoded  # D never saw it
    assert_nothing_held(slow_lease_prefill)


def test_max_completion_tokens_one_is_answered_by_prefill_alone(fleet, router,
                                                                slow_lease_prefill):
    body = {"messages": CHAT, "max_completion_tokens": 1, **GREEDY}
    want = httpx.post(fleet.c0.url + "/v1/chat/completions", json=body, timeout=120).json()
    decoded = decode_requests(fleet.d0)
    resp = httpx.post(router.url + "/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["choices"][0]["message"] == want["choices"][0]["message"]
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 1
    assert decode_requests(fleet.d0) == decoded
    assert_nothing_held(slow_lease_prefill)
