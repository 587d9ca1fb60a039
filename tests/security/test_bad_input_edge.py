"""Issue #12, findings 1 and 7: bad input gets a clear 4xx at the edge (router and instance),
never a 500, a stall or a dead engine; and whatever one request makes an engine raise fails
that request alone.

Real processes on loopback: a prefill and a decode instance of the embedded SmolLM2 and a
1P1D router in front of them. "instance" tests talk to the decode instance directly (it
serves whole requests too); each bad request is followed by a normal one that must succeed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from pdserve.security import DeploymentSecret, sign_request
from pdserve.server.engine_messages import StepOutputs
from tests.router.cluster import (
    Proc,
    internal,
    metric,
    start_instance,
    start_router,
    wait_healthy,
)

INSTANCE_FLAGS = ("--max-num-seqs", "8", "--kv-cache-memory", "64MiB")
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]
# finding 1: a decode request whose KV layout divides by zero in the engine (before the
# signed hand-off, it reached the engine and killed it)
BAD_LAYOUT_KV = {
    "do_remote_prefill": True, "remote_engine_id": "e", "remote_host": "127.0.0.1",
    "remote_port": 9, "remote_block_ids": [0], "remote_request_id": "r", "first_token_id": 1,
    "kv_layout": {"dtype": "float32", "block_size": 16, "num_layers": 30, "num_kv_heads": 0,
                  "head_dim": 64},
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[dict[str, Proc]]:
    tmp = tmp_path_factory.mktemp("edge")
    p = start_instance(tmp, "prefill", *INSTANCE_FLAGS)
    d = start_instance(tmp, "decode", *INSTANCE_FLAGS)
    procs = [p, d]
    try:
        wait_healthy(p, d)
        router = start_router(tmp, prefill=[p], decode=[d])
        procs.append(router)
        yield {"prefill": p, "instance": d, "router": router}
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(params=["instance", "router"])
def url(request, deployment) -> str:
    return deployment[request.param].url


def post_raw(url: str, path: str, content, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + path, content=content, timeout=120,
                      headers={"content-type": "application/json", **(headers or {})})


def assert_openai_error(resp: httpx.Response, status: int | None = None) -> dict:
    """A 4xx (this one, if given) with OpenAI's error body; returns the error."""
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    if status is not None:
        assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    return err


def assert_still_serves(url: str) -> None:
    """The server (and everything behind it) answers a normal request right after."""
    body = {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0.0,
            "ignore_eos": True}
    resp = httpx.post(url + COMPLETIONS, json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(url + "/health", timeout=10).status_code == 200


# ---- the body: JSON that is not JSON's, too deep, too large ------------------------------

@pytest.mark.parametrize("path, raw", [
    (CHAT, b'{"messages": null}'),
    (CHAT, b'{"messages": 7}'),
    (CHAT, b'{"messages": "hi"}'),
    (CHAT, b'{"messages": [7]}'),
    (COMPLETIONS, b'{"prompt": null}'),
    (COMPLETIONS, b'{"prompt": {"a": 1}}'),
])
def test_messages_or_prompt_of_the_wrong_shape(url, path, raw):
    assert_openai_error(post_raw(url, path, raw), 400)
    assert_still_serves(url)


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
def test_numbers_that_are_not_finite(url, number):
    raw = b'{"prompt": "hi", "max_tokens": 2, "temperature": ' + number + b"}"
    assert_openai_error(post_raw(url, COMPLETIONS, raw), 400)
    assert_still_serves(url)


def test_an_integer_of_thousands_of_digits(url):
    raw = b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}"
    assert_openai_error(post_raw(url, COMPLETIONS, raw), 400)
    assert_still_serves(url)


@pytest.mark.parametrize("path, raw", [
    (COMPLETIONS, b'{"prompt": "bad \\ud800 text", "max_tokens": 2}'),
    (COMPLETIONS, b'{"prompt": ["\\udfff"], "max_tokens": 2}'),
    (CHAT, b'{"messages": [{"role": "user", "content": "x\\ud800"}], "max_tokens": 2}'),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}],'
           b' "max_tokens": 2}'),
    (COMPLETIONS, b'{"prompt": "hi", "max_tokens": 2, "stop": ["\\ud800"]}'),
    (COMPLETIONS, b'{"prompt": "hi", "max_tokens": 2, "user": "\\ud800"}'),
    (COMPLETIONS, b'{"prompt": "hi", "max_tokens": 2, "\\ud800": 1}'),
])
def test_lone_surrogates(url, path, raw):
    err = assert_openai_error(post_raw(url, path, raw), 400)
    assert "Unicode" in err["message"]
    assert_still_serves(url)


def test_a_surrogate_pair_is_fine(url):
    raw = b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2, "temperature": 0.0}'
    assert post_raw(url, COMPLETIONS, raw).status_code == 200


@pytest.mark.parametrize("depth", [65, 5000, 100_000])
def test_json_nested_deeply(url, depth):
    raw = b'{"prompt": "hi", "max_tokens": 2, "extra": ' + b"[" * depth + b"]" * depth + b"}"
    err = assert_openai_error(post_raw(url, COMPLETIONS, raw), 400)
    assert "nests deeper" in err["message"]
    assert_still_serves(url)


def test_json_nested_within_the_limit_is_fine(url):
    raw = b'{"prompt": "hi", "max_tokens": 2, "extra": ' + b"[" * 60 + b"]" * 60 + b"}"
    assert post_raw(url, COMPLETIONS, raw).status_code == 200


def test_a_10mb_body_is_413(url):
    body = json.dumps({"prompt": "x" * 10_000_000, "max_tokens": 2}).encode()
    err = assert_openai_error(post_raw(url, COMPLETIONS, body), 413)
    assert "larger than the limit" in err["message"] and err["code"] == "request_too_large"
    assert_still_serves(url)


def test_a_10mb_chunked_body_is_413(url):
    """No Content-Length: the limit holds while the body arrives."""

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 100_000
        yield b'"}'

    resp = post_raw(url, COMPLETIONS, chunks())
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert assert_openai_error(resp, 413)["code"] == "request_too_large"
    assert_still_serves(url)


@pytest.mark.parametrize("raw", [b"[" * 5000 + b"]" * 5000, b'{"url": NaN}',
                                 b'{"url": "\\ud800", "role": "decode"}', b"x" * 9_000_000])
def test_registry_and_lease_routes_refuse_bad_bodies(deployment, raw):
    """/register, /deregister and /v1/kv/release parse bodies too: unsigned, a 401 (or 413);
    signed with the deployment's secret, the parser's 400 (or 413): never a 500."""
    router, p = deployment["router"].url, deployment["prefill"].url
    for url, path in ((router, "/register"), (router, "/deregister"), (p, "/v1/kv/release")):
        for resp in (post_raw(url, path, raw), internal("POST", url, path, content=raw)):
            assert 400 <= resp.status_code < 500, (path, resp.status_code, resp.text[:300])
            assert resp.status_code in (400, 401, 413) and resp.json()["error"]["message"]
    assert_still_serves(router)
    assert_still_serves(p)


def test_max_request_bytes_flag(deployment, tmp_path):
    router = start_router(tmp_path, prefill=[deployment["prefill"]],
                          decode=[deployment["instance"]], flags=("--max-request-bytes", "2KiB"))
    try:
        big = {"prompt": "x" * 3000, "max_tokens": 2}
        resp = httpx.post(router.url + COMPLETIONS, json=big, timeout=60)
        assert "2048 bytes" in assert_openai_error(resp, 413)["message"]
        assert_still_serves(router.url)
    finally:
        router.stop()


def test_a_signed_chunked_body_over_the_limit_is_413(deployment):
    """The auth middleware reads a signed body to check its MAC: the limit bounds it too."""
    router = deployment["router"].url
    raw = b'{"url": "' + b"x" * 10_000_000 + b'"}'
    secret = DeploymentSecret.from_env()
    headers = {"content-type": "application/json",
               **sign_request(secret, "POST", "/register", raw)}
    chunks = (raw[i:i + 2**20] for i in range(0, len(raw), 2**20))
    resp = httpx.post(router + "/register", content=chunks, headers=headers, timeout=60)
    assert resp.status_code == 413, resp.text[:300]
    assert_still_serves(router)


# ---- fields: types are strict and every size is bounded ----------------------------------

@pytest.mark.parametrize("fields", [
    {"stream": "yes"},
    {"max_tokens": 1e9},
    {"max_tokens": 1e9, "stream": True},
    {"max_tokens": 2**31},
    {"stop_token_ids": [2**40]},
    {"stop_token_ids": list(range(2000))},
    {"stop": ["x" * 2000]},
    {"stop": ["a"] * 17},
    {"logit_bias": {str(i): 1.0 for i in range(2000)}},
    {"user": "u" * 1000},
    {"model": "m" * 1000},
    {"top_k": 2**40},
    {"min_tokens": 2**40},
])
def test_out_of_bounds_fields(url, fields):
    body = {"prompt": "hi", "max_tokens": 2, **fields}
    param = next(iter(fields))
    err = assert_openai_error(httpx.post(url + COMPLETIONS, json=body, timeout=120), 400)
    assert err["param"] == param
    assert_still_serves(url)


@pytest.mark.parametrize("body", [
    {"messages": OK_MESSAGES * 5000},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 2000}]},
    {"messages": OK_MESSAGES, "max_completion_tokens": 2**31},
    {"messages": OK_MESSAGES, "stream": "yes"},
])
def test_out_of_bounds_chat_fields(url, body):
    assert_openai_error(httpx.post(url + CHAT, json=body, timeout=120), 400)
    assert_still_serves(url)


def test_a_prompt_of_too_many_characters(url):
    body = {"prompt": "x" * (4 * 2**20 + 1), "max_tokens": 2}
    err = assert_openai_error(httpx.post(url + COMPLETIONS, json=body, timeout=120), 400)
    assert err["param"] == "prompt"
    assert_still_serves(url)


def test_the_router_refuses_before_calling_prefill(deployment):
    """What an instance would refuse, the router refuses itself: P never sees it."""
    router, p = deployment["router"].url, deployment["prefill"].url
    before = metric(p, "pdserve:request_errors_total", status="400")
    for body in ({"prompt": "hi", "max_tokens": 4, "stream": "yes"},
                 {"prompt": "hi", "max_tokens": 1e9, "stream": True}):
        resp = httpx.post(router + COMPLETIONS, json=body, timeout=120)
        instance = httpx.post(deployment["instance"].url + COMPLETIONS, json=body, timeout=120)
        assert assert_openai_error(resp, 400) == assert_openai_error(instance, 400)
    assert metric(p, "pdserve:request_errors_total", status="400") == before
    assert_still_serves(router)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_max_tokens_beyond_the_context_streamed_through_1p1d_is_400_not_200(deployment, path):
    """Only an instance knows the context length; P checks the client's max_tokens for D, so
    the router hears the 400 before it starts streaming P's token."""
    router = deployment["router"].url
    body = {"max_tokens": 10**9, "stream": True, "temperature": 0.0}
    body |= {"messages": OK_MESSAGES} if path == CHAT else {"prompt": "hi"}
    resp = httpx.post(router + path, json=body, timeout=120)
    err = assert_openai_error(resp, 400)
    assert "context length" in err["message"] and err["param"] == "max_tokens"
    assert_still_serves(router)


def test_min_tokens_through_1p1d(deployment):
    """P runs one token: the router caps the min_tokens it gets (D enforces the rest)."""
    body = {"prompt": "The capital of France is", "max_tokens": 6, "min_tokens": 6,
            "temperature": 0.0}
    resp = httpx.post(deployment["router"].url + COMPLETIONS, json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 6


# ---- no stall: tokenization runs off the event loop -------------------------------------

def test_health_answers_while_a_huge_prompt_is_tokenized(deployment):
    d = deployment["instance"].url
    body = json.dumps({"prompt": "lorem ipsum dolor " * 230_000, "max_tokens": 2}).encode()
    result: dict = {}

    def send() -> None:
        result["resp"] = post_raw(d, COMPLETIONS, body)

    sender = threading.Thread(target=send)
    sender.start()
    slowest = 0.0
    try:
        time.sleep(0.3)  # the body is in: tokenizing has begun
        while sender.is_alive():
            t0 = time.monotonic()
            assert httpx.get(d + "/health", timeout=30).status_code == 200
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.1)
    finally:
        sender.join()
    assert_openai_error(result["resp"], 400)  # longer than the context, once tokenized
    assert slowest < 1.0, f"/health took {slowest:.2f}s while the prompt was tokenized"
    assert_still_serves(d)


# ---- no dead engine: one request's failure is that request's alone ----------------------

@pytest.mark.parametrize("max_tokens", [1, 4])
def test_a_request_that_makes_the_decode_engine_raise_fails_alone(deployment, max_tokens):
    """Finding 1's payload: refused (by the signed hand-off at the edge, or by the engine
    process containing the ZeroDivisionError), and the instance keeps serving."""
    d = deployment["instance"].url
    body = {"prompt": "The capital of France is", "max_tokens": max_tokens,
            "kv_transfer_params": BAD_LAYOUT_KV}
    assert_openai_error(httpx.post(d + COMPLETIONS, json=body, timeout=120))
    assert_still_serves(d)
    exported = httpx.get(d + "/metrics", timeout=10).text  # (0 where refused at the edge)
    assert re.search(r"^pdserve:request_failures_total\{[^}]*\} \d", exported, re.M)


def test_the_engine_process_contains_any_exception_of_one_request():
    """Below the HTTP edge: a request whose data makes `add_request` raise a TypeError (no
    ValueError) gets an error verdict, is counted, and the next request is served."""
    from pdserve.config import CacheConfig, EngineArgs
    from pdserve.engine.outputs import EngineRequest
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.server.engine_messages import AddRequest, EngineReady, Shutdown
    from pdserve.server.engine_process import run_engine_process

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    args = EngineArgs(cache=CacheConfig(kv_cache_memory=16 * 2**20))
    proc = ctx.Process(target=run_engine_process, args=(args, inbox, outbox), daemon=True)
    proc.start()
    try:
        assert isinstance(outbox.get(timeout=300), EngineReady)
        bad = EngineRequest("bad", [1, 2, 3], SamplingParams(max_tokens="5"))  # type: ignore
        inbox.put(AddRequest(bad))
        verdict, stats = _next_outputs(outbox, "bad")
        assert verdict.finished and "TypeError" in verdict.error
        assert stats.request_failures == 1
        inbox.put(AddRequest(EngineRequest("good", [1, 2, 3], SamplingParams(max_tokens=2))))
        tokens: list[int] = []
        while True:
            out, stats = _next_outputs(outbox, "good")
            assert out.error is None
            tokens += out.new_token_ids
            if out.finished:
                break
        assert len(tokens) == 2 and proc.is_alive() and stats.request_failures == 1
    finally:
        inbox.put(Shutdown())
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def _next_outputs(outbox, request_id: str):
    """The next output of `request_id` off the engine's outbox, and the stats with it."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        msg = outbox.get(timeout=120)
        assert isinstance(msg, StepOutputs), msg
        for out in msg.outputs:
            if out.request_id == request_id:
                return out, msg.stats
    raise TimeoutError(request_id)
