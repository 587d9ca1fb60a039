"""vLLM's own P/D router in front of pdserve P and D, and pdserve's router in front of a P
that keeps no KV: exactly the colocated greedy text and usage, whatever the shape.

`vllm-router` (PyPI, the vLLM project's router) calls P with max_tokens 1 and
`{"do_remote_decode": true}`, drops P's output, and relays D's answer, which must
therefore be the whole completion, first token included. It holds no pdserve secret: P
takes its hold requests with --accept-client-kv-requests, and D takes only hand-offs that
P signed (the router carries them unchanged).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.router.cluster import (
    Proc,
    free_port,
    metric,
    sse_events,
    start_router,
    stream_text,
    wait_all_free,
)

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Write a haiku about the sea. Use emoji: 🌊🐚",
    "Once upon a time, in a land far away, " * 10,
    "def fibonacci(n):\n    ",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name three primary colours."}],
]
MAX_TOKENS = 14


def vllm_router_binary() -> str:
    path = shutil.which("vllm-router")
    assert path, "vllm-router is in the test extra: pip install -e '.[test]'"
    return path


@pytest.fixture(scope="module")
def vllm_router(routers_tmp, slow_lease_prefill, fleet) -> Iterator[Proc]:
    """vllm-router --vllm-pd-disaggregation over pdserve's P (it takes client holds) and D."""
    port, metrics_port = free_port(), free_port()
    log_path = routers_tmp / f"vllm-router-{port}.log"
    cmd = [vllm_router_binary(), "--vllm-pd-disaggregation", "--host", "127.0.0.1",
           "--port", str(port), "--prometheus-port", str(metrics_port),
           "--prefill", slow_lease_prefill.url, "--decode", fleet.d0.url,
           "--policy", "round_robin", "--worker-startup-timeout-secs", "60"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    router = Proc(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_serving(router)
        yield router
    finally:
        router.stop()


def wait_serving(router: Proc, timeout_s: float = 90) -> None:
    """Until the router answers a completion (it checks its workers first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert router.proc.poll() is None, router.log()
        try:
            body = {"prompt": "Hi", "max_tokens": 2, "temperature": 0.0}
            if httpx.post(router.url + "/v1/completions", json=body,
                          timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"vllm-router never served:\n{router.log()}"
        time.sleep(0.5)


def ask(url: str, chat: bool, stream: bool, what: str | list[dict]) -> tuple[str, dict]:
    """The answer's text and usage, streamed or not."""
    body: dict = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": stream}
    body.update({"messages": what} if chat else {"prompt": what})
    if stream:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        resp = httpx.post(url + path, json=body, timeout=300)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        choice = answer["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]), answer["usage"]
    with httpx.stream("POST", url + path, json=body, timeout=300) as resp:
        assert resp.status_code == 200, resp.read()
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    assert len(usage) == 1, events
    return stream_text(events, chat), usage[0]


CASES = [(chat, stream, what) for stream in (False, True)
         for chat, items in ((False, PROMPTS), (True, CHATS)) for what in items]


@pytest.fixture(scope="module")
def reference(fleet) -> dict:
    """The colocated instance's text and usage for every case."""
    return {repr(case): ask(fleet.c0.url, *case) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'chat' if c[0] else 'completion'}-"
                         f"{'stream' if c[1] else 'json'}-{str(c[2])[:18]}")
def test_vllm_router_over_pdserve_p_and_d_gives_the_colocated_answer(vllm_router, reference,
                                                                     case):
    text, usage = ask(vllm_router.url, *case)
    want_text, want_usage = reference[repr(case)]
    assert text == want_text  # the first token too: D's answer is the whole completion
    assert usage["completion_tokens"] == want_usage["completion_tokens"]
    assert usage["prompt_tokens"] == want_usage["prompt_tokens"]


def test_the_kv_moved_and_nothing_is_left_held(vllm_router, slow_lease_prefill, fleet):
    pulls_before = metric(fleet.d0.url, "pdserve:kv_pulls_ok_total")
    ask(vllm_router.url, False, False, PROMPTS[3])
    assert metric(fleet.d0.url, "pdserve:kv_pulls_ok_total") == pulls_before + 1
    # P's leases last 600 s here: blocks free within seconds were released by D's pull
    assert not any(wait_all_free(slow_lease_prefill, fleet.d0).values())


def test_first_token_logprobs_travel_with_the_hand_off(vllm_router, fleet):
    """vLLM's router drops P's answer: D's logprobs start with P's first token anyway."""
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0.0, "logprobs": 2}
    want = httpx.post(fleet.c0.url + "/v1/completions", json=body, timeout=300).json()
    got = httpx.post(vllm_router.url + "/v1/completions", json=body, timeout=300).json()
    want_lp, got_lp = want["choices"][0]["logprobs"], got["choices"][0]["logprobs"]
    assert got_lp["tokens"] == want_lp["tokens"] and len(got_lp["tokens"]) == 6
    assert got_lp["token_logprobs"] == pytest.approx(want_lp["token_logprobs"], abs=1e-3)
    assert [list(t) for t in got_lp["top_logprobs"]] == [list(t) for t in
                                                         want_lp["top_logprobs"]]


def test_a_prefill_that_keeps_no_kv_is_served_whole_on_d(routers_tmp, fleet, reference):
    """A P without a KV connector (here a colocated instance) answers its one token and no
    kv_transfer_params: pdserve's router serves the request whole on D, never cut short."""
    router = start_router(routers_tmp, prefill=[fleet.c1], decode=[fleet.d0])
    try:
        for case in [c for c in CASES if c[2] in (PROMPTS[1], CHATS[0])]:
            text, usage = ask(router.url, *case)
            assert (text, usage["completion_tokens"]) == (
                reference[repr(case)][0], reference[repr(case)][1]["completion_tokens"])
        assert metric(router.url, "pdserve_router:handoffs_missing_total") == 4
    finally:
        router.stop()
