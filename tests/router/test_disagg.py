"""Disaggregated serving through the router: exactly the colocated tokens, in every layout."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.router.cluster import (
    GREEDY,
    metric,
    sse_events,
    stream_text,
    wait_all_free,
)

MAX_TOKENS = 12
LONG_PREFIX = ("You are a careful assistant. Answer briefly and precisely. The following is a "
               "record of facts about the solar system, its planets, their moons and orbits. ")
PROMPTS = {
    "short": "Hi",
    "long": "Once upon a time, in a land far away, " * 12,
    "multi_block": "List the first ten prime numbers and explain why each one is prime: 2, 3,",
    "prefix_a": LONG_PREFIX * 2 + "Which planet is largest?",
    "prefix_b": LONG_PREFIX * 2 + "Which planet is closest to the sun?",
}
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def completion(url: str, prompt: str, **fields) -> dict:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "logprobs": 0,
            "return_tokens_as_token_ids": True, **GREEDY, **fields}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


def chat(url: str, **fields) -> dict:
    body = {"messages": CHAT, "max_tokens": MAX_TOKENS, "logprobs": True, "top_logprobs": 0,
            "return_tokens_as_token_ids": True, **GREEDY, **fields}
    resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


def tokens(answer: dict, is_chat: bool = False) -> list[str]:
    lp = answer["choices"][0]["logprobs"]
    return [t["token"] for t in lp["content"]] if is_chat else lp["tokens"]


@pytest.fixture(scope="module")
def reference(fleet) -> dict:
    """The colocated instance's answers: what every layout must reproduce."""
    out = {name: completion(fleet.c0.url, p) for name, p in PROMPTS.items()}
    out["chat"] = chat(fleet.c0.url)
    return out


@pytest.fixture(scope="module")
def routers(fleet, routers_tmp):
    made = fleet.routers(routers_tmp, ("1P1D", "2P1D", "1P2D"))
    yield made
    for r in made.values():
        r.stop()


def served(procs) -> list[float]:
    return [metric(p.url, "vllm:request_success_total", finished_reason="length")
            for p in procs]


@pytest.mark.parametrize("layout", ["1P1D", "2P1D", "1P2D"])
def test_every_prompt_gets_exactly_the_colocated_tokens(layout, fleet, routers, reference):
    url = routers[layout].url
    used = [fleet.p0, fleet.p1, fleet.d0, fleet.d1]
    before = served(used)
    names = list(PROMPTS) + ["chat"]
    with ThreadPoolExecutor(len(names)) as pool:  # at once: 2P/2D layouts use both sides
        answers = dict(zip(names, pool.map(
            lambda n: chat(url) if n == "chat" else completion(url, PROMPTS[n]), names)))
    for name, answer in answers.items():
        is_chat, ref = name == "chat", reference[name]
        assert tokens(answer, is_chat) == tokens(ref, is_chat), name
        text = "message" if is_chat else "text"
        got, want = answer["choices"][0][text], ref["choices"][0][text]
        assert got == want, name
        assert answer["choices"][0]["finish_reason"] == "length"
        assert "kv_transfer_params" not in answer
    counts = [a - b for a, b in zip(served(used), before)]
    if layout == "2P1D":
        assert counts[0] > 0 and counts[1] > 0, counts  # both prefill instances served
    if layout == "1P2D":
        assert counts[2] > 0 and counts[3] > 0, counts  # both decode instances served


@pytest.mark.parametrize("stream", [False, True])
def test_usage_counts_the_first_token_like_colocated(stream, routers, reference):
    """Protocol: D's usage.completion_tokens counts P's first token too."""
    prompt = PROMPTS["multi_block"]
    if stream:
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True,
                "stream_options": {"include_usage": True}, **GREEDY}
        with httpx.stream("POST", routers["1P1D"].url + "/v1/completions", json=body,
                          timeout=300) as resp:
            usage = [e for e in sse_events(resp) if isinstance(e, dict)][-1]["usage"]
    else:
        usage = completion(routers["1P1D"].url, prompt)["usage"]
    want = reference["multi_block"]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        want["prompt_tokens"], MAX_TOKENS, want["total_tokens"])


@pytest.mark.parametrize("is_chat", [False, True])
def test_stream_opens_with_the_prefill_token_then_relays_decode(is_chat, routers, reference):
    path = "/v1/chat/completions" if is_chat else "/v1/completions"
    body = {"max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True},
            **GREEDY}
    body.update({"messages": CHAT} if is_chat else {"prompt": PROMPTS["long"]})
    with httpx.stream("POST", routers["1P1D"].url + path, json=body, timeout=300) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    ref = reference["chat" if is_chat else "long"]["choices"][0]
    assert stream_text(events, is_chat) == (ref["message"]["content"] if is_chat
                                            else ref["text"])
    chunks = [e for e in events if isinstance(e, dict)]
    assert events[-1] == "[DONE]" and chunks[-1]["choices"] == [] and chunks[-1]["usage"]
    assert len({c["id"] for c in chunks}) == 1
    if is_chat:
        roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
        assert len(roles) == 1 and roles[0] is chunks[0]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and not any(finishes[:-1])


def test_one_token_request_is_answered_by_prefill_alone(fleet, routers, reference):
    before = served([fleet.d0])
    answer = completion(routers["1P1D"].url, PROMPTS["short"], max_tokens=1)
    assert tokens(answer) == tokens(reference["short"])[:1]
    assert served([fleet.d0]) == before


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"max_tokens": "9"}, {"temperature": 5}])
def test_invalid_request_gets_the_instance_400_unchanged(bad, fleet, routers):
    body = {"prompt": "Hi", "max_tokens": 4, **bad}
    direct = httpx.post(fleet.c0.url + "/v1/completions", json=body, timeout=30)
    routed = httpx.post(routers["1P1D"].url + "/v1/completions", json=body, timeout=30)
    assert routed.status_code == direct.status_code == 400
    assert routed.json() == direct.json()


def test_prefill_that_finishes_the_request_skips_decode(fleet, routers, reference):
    first = int(tokens(reference["short"])[0].removeprefix("token_id:"))
    answer = completion(routers["1P1D"].url, PROMPTS["short"], stop_token_ids=[first])
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == 1
    assert "kv_transfer_params" not in answer


def test_client_disconnect_mid_stream_aborts_decode(fleet, routers):
    def aborted() -> float:
        return metric(fleet.d0.url, "vllm:request_success_total", finished_reason="abort")

    before = aborted()
    body = {"prompt": "Tell me a long story.", "max_tokens": 2000, "stream": True, **GREEDY}
    with httpx.stream("POST", routers["1P1D"].url + "/v1/completions", json=body,
                      timeout=120) as resp:
        data = (line for line in resp.iter_lines() if line.startswith("data: "))
        assert [next(data) for _ in range(4)]
    assert wait_all_free(fleet.d0, timeout_s=30) == {fleet.d0.url: 0}
    assert aborted() == before + 1


def test_router_metrics_count_disaggregated_requests(routers):
    assert metric(routers["1P1D"].url, "pdserve_router:requests_total", kind="disagg") > 0


def test_decode_metrics_time_the_kv_pull_and_the_phases(fleet, routers):
    """D's KV pull lands in pdserve:kv_transfer_seconds, and D's request in vLLM's phase
    histograms (its prefill is the pull plus the first step; it decodes the rest)."""
    d = fleet.d0.url
    names = ("pdserve:kv_transfer_seconds_count", "pdserve:kv_pulls_ok_total",
             "vllm:request_prefill_time_seconds_count", "vllm:request_decode_time_seconds_sum",
             "vllm:time_to_first_token_seconds_count")
    by_host = "pdserve:kv_pulls_by_transport_total"
    before = {n: metric(d, n) for n in names} | {by_host: metric(d, by_host, transport="host")}
    completion(routers["1P1D"].url, PROMPTS["multi_block"] + " and then")
    delta = {n: metric(d, n) - before[n] for n in names}
    delta[by_host] = metric(d, by_host, transport="host") - before[by_host]
    assert delta["pdserve:kv_pulls_ok_total"] == 1
    assert delta[by_host] == 1  # P on this machine: its shared memory, not TCP
    assert delta["pdserve:kv_transfer_seconds_count"] == 1
    assert delta["vllm:request_prefill_time_seconds_count"] == 1
    assert delta["vllm:time_to_first_token_seconds_count"] == 1
    assert delta["vllm:request_decode_time_seconds_sum"] > 0


def test_decode_counts_the_pulled_prompt_as_external_kv_transfer(fleet, routers):
    """On D a prompt's KV comes from D's own prefix cache or from P (vLLM's
    external_kv_transfer, and p2p among cache tiers); none of it is computed on D. P
    computes what its prefix cache lacks."""
    d, p = fleet.d0.url, fleet.p0.url
    sources = ("local_compute", "local_cache_hit", "external_kv_transfer")

    def snapshot(url: str) -> dict[str, float]:
        out = {s: metric(url, "vllm:prompt_tokens_by_source_total", source=s) for s in sources}
        out["p2p"] = metric(url, "vllm:prompt_tokens_cached_by_source_total", source="p2p")
        for name in ("vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total",
                     "vllm:request_prefill_kv_computed_tokens_sum",
                     "vllm:request_prefill_kv_computed_tokens_count", "pdserve:kv_pulls_ok_total"):
            out[name] = metric(url, name)
        return out

    before = {d: snapshot(d), p: snapshot(p)}
    answer = completion(routers["1P1D"].url, PROMPTS["long"] + " The end of the story:")
    delta = {url: {k: v - before[url][k] for k, v in snapshot(url).items()} for url in (d, p)}
    dd, pd = delta[d], delta[p]
    prompt_tokens = answer["usage"]["prompt_tokens"]
    assert dd["pdserve:kv_pulls_ok_total"] == 1
    assert dd["vllm:prompt_tokens_total"] == prompt_tokens == pd["vllm:prompt_tokens_total"]
    assert dd["external_kv_transfer"] > 0 and dd["local_compute"] == 0
    assert dd["external_kv_transfer"] + dd["local_cache_hit"] == prompt_tokens
    assert dd["p2p"] == dd["external_kv_transfer"]
    assert dd["vllm:prompt_tokens_cached_total"] == prompt_tokens
    assert dd["vllm:request_prefill_kv_computed_tokens_count"] == 1
    assert dd["vllm:request_prefill_kv_computed_tokens_sum"] == 0
    assert pd["external_kv_transfer"] == 0 and pd["p2p"] == 0
    assert pd["local_compute"] + pd["local_cache_hit"] == prompt_tokens
    assert pd["vllm:request_prefill_kv_computed_tokens_sum"] == pd["local_compute"] > 0
    # both pull KV (vLLM's kv_consumer, or kv_both): both serve the fetch stages; idle now
    for url in (d, p):
        stages = {s: metric(url, "vllm:num_requests_kv_fetch_by_stage", stage=s)
                  for s in ("waiting_to_start", "in_progress", "completed_waiting")}
        assert stages == dict.fromkeys(stages, 0.0)
        assert "vllm:num_requests_kv_fetch_by_stage{" in httpx.get(url + "/metrics").text
