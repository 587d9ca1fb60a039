"""Exactness unchanged: greedy text through every routing policy, over a P/D pair and a
colocated instance, equals the colocated instance's own answer (whole or disaggregated)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from pdserve.router.policy import POLICIES
from tests.router.cluster import GREEDY, metric, sse_events, start_router, stream_text

SHORT = "Hi there"
LONG = "Once upon a time, in a land far away, there lived a wise old king. " * 6
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def routers(fleet, routers_tmp) -> Iterator[dict]:
    made = {name: start_router(routers_tmp, prefill=[fleet.p0], decode=[fleet.d0],
                               flags=("--routing-policy", name, "--tokenizer", "embedded"))
            for name in POLICIES}
    # the conditional policy with a stall bound a long prompt's whole prefill on D fits in
    made["conditional_60s"] = start_router(
        routers_tmp, prefill=[fleet.p0], decode=[fleet.d0],
        flags=("--routing-policy", "conditional", "--tokenizer", "embedded",
               "--pd-max-stall-ms", "60000"))
    yield made
    for r in made.values():
        r.stop()


def ask(url: str, kind: str, stream: bool = False) -> str:
    chat = kind == "chat"
    body = {"max_tokens": 12, "stream": stream, **GREEDY,
            **({"messages": CHAT} if chat else {"prompt": LONG if kind == "long" else SHORT})}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if stream:
        with httpx.stream("POST", url + path, json=body, timeout=300) as resp:
            assert resp.status_code == 200
            return stream_text(sse_events(resp), chat)
    resp = httpx.post(url + path, json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_text_through_every_policy_equals_colocated(fleet, routers, policy):
    url = routers[policy].url
    for kind in ("short", "long", "chat"):
        want = ask(fleet.c0.url, kind)
        assert ask(url, kind) == want, (policy, kind)
        assert ask(url, kind, stream=True) == want, (policy, kind, "stream")
    if policy != "conditional":  # it keeps prompts D has cached (repeated here) on D
        assert metric(url, "pdserve_router:routing_decisions_total", policy=policy,
                      decision="disagg", reason="long_prompt") > 0


def decisions(url: str, decision: str, reason: str) -> float:
    return metric(url, "pdserve_router:routing_decisions_total", policy="conditional",
                  decision=decision, reason=reason)


def test_conditional_serves_a_long_prompt_whole_on_an_idle_decode(fleet, routers):
    url = routers["conditional_60s"].url
    prompt = " ".join(f"item{i}-{uuid.uuid4().hex[:6]}" for i in range(150))  # ~900 tokens
    body = {"prompt": prompt, "max_tokens": 8, **GREEDY}
    want = httpx.post(fleet.c0.url + "/v1/completions", json=body, timeout=300).json()
    before = decisions(url, "whole_on_decode", "idle_decode")
    got = httpx.post(url + "/v1/completions", json=body, timeout=300).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert decisions(url, "whole_on_decode", "idle_decode") == before + 1


def test_conditional_disaggregates_a_long_uncached_prompt_while_d_decodes(fleet, routers):
    url = routers["conditional"].url
    prompt = " ".join(f"item{i}-{uuid.uuid4().hex[:6]}" for i in range(150))
    body = {"prompt": prompt, "max_tokens": 8, **GREEDY}
    want = httpx.post(fleet.c0.url + "/v1/completions", json=body, timeout=300).json()
    before = decisions(url, "disagg", "long_uncached")
    busy = {"prompt": SHORT, "max_tokens": 400, "ignore_eos": True, "stream": True, **GREEDY}
    with httpx.stream("POST", fleet.d0.url + "/v1/completions", json=busy, timeout=300) as bg:
        lines = bg.iter_lines()
        while "[DONE]" not in next(lines) and metric(
                fleet.d0.url, "vllm:num_requests_running") < 1:
            pass
        time.sleep(1.5)  # D's load line (every 0.5 s) reaches the router
        got = httpx.post(url + "/v1/completions", json=body, timeout=300).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert decisions(url, "disagg", "long_uncached") == before + 1


def test_conditional_serves_a_short_prompt_whole_on_decode(routers):
    url = routers["conditional"].url
    before = metric(url, "pdserve_router:routing_decisions_total", policy="conditional",
                    decision="whole_on_decode", reason="small_uncached")
    ask(url, "short")
    assert metric(url, "pdserve_router:routing_decisions_total", policy="conditional",
                  decision="whole_on_decode", reason="small_uncached") == before + 1
