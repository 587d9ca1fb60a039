"""The HTTP side of the trust model, on real processes: clients need the API key, only holders
of the deployment secret register, deregister, list instances or release KV, a signed call
cannot be replayed, and nothing internal (kv_transfer_params, instance URLs) reaches a client.

P and D run with --api-key; routers in front of them run with or without one (the router
signs its calls, so it never needs the instances' key).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from pdserve.router.heartbeat import keep_registered
from pdserve.security import DeploymentSecret, sign_request
from tests.router.cluster import (
    GREEDY,
    REPO,
    Proc,
    env,
    free_port,
    internal,
    sse_events,
    start_instance,
    start_router,
    wait_healthy,
)
from tests.security.stub_server import StubInstance

KEY = "sk-test-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
FLAGS = ("--max-num-seqs", "16", "--kv-cache-memory", "64MiB")
BODY = {"prompt": "The capital of France is", "max_tokens": 4, **GREEDY}
WRONG_SECRET = DeploymentSecret.from_text("not-the-deployment-secret-at-all-0123")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("http-auth")


@pytest.fixture(scope="module")
def pd(tmp) -> Iterator[tuple[Proc, Proc]]:
    procs = [start_instance(tmp, role, "--api-key", KEY, *FLAGS)
             for role in ("prefill", "decode")]
    try:
        wait_healthy(*procs)
        yield procs[0], procs[1]
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def router(tmp, pd) -> Iterator[Proc]:
    """1P1D with the clients' key."""
    r = start_router(tmp, prefill=[pd[0]], decode=[pd[1]], flags=("--api-key", KEY))
    yield r
    r.stop()


def assert_401(resp: httpx.Response, code: str = "invalid_api_key") -> None:
    assert resp.status_code == 401, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert error["code"] == code and error["message"]


def listed(router: Proc) -> list[str]:
    resp = internal("GET", router.url, "/instances")
    assert resp.status_code == 200, resp.text
    return sorted(i["url"] for i in resp.json()["instances"])


def complete(url: str, headers: dict | None = None, **fields) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={**BODY, **fields}, headers=headers,
                      timeout=120)


# ---- the clients' API key ---------------------------------------------------------------


def test_v1_needs_the_api_key_on_router_and_instances(pd, router):
    # no openai package here (not installed, by the brief not to be): httpx speaks for it
    for url in (router.url, pd[0].url, pd[1].url):
        assert_401(complete(url))
        assert_401(complete(url, {"Authorization": "Bearer sk-wrong"}))
        assert_401(complete(url, {"Authorization": KEY}))  # no "Bearer"
        assert_401(httpx.get(url + "/v1/models", timeout=10))
        assert httpx.get(url + "/v1/models", headers=AUTH, timeout=10).status_code == 200
    for url in (router.url, pd[0].url, pd[1].url):
        resp = complete(url, AUTH)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 4


def test_tool_endpoints_need_the_api_key_too(pd, router):
    for url in (router.url, pd[0].url):
        assert_401(httpx.post(url + "/tokenize", json={"prompt": "hi"}, timeout=10))
        assert_401(httpx.post(url + "/detokenize", json={"tokens": [1]}, timeout=10))
        assert_401(httpx.get(url + "/v1/models/any", timeout=10))
        resp = httpx.post(url + "/tokenize", json={"prompt": "hi"}, headers=AUTH, timeout=30)
        assert resp.status_code == 200 and resp.json()["count"] >= 1, resp.text
        assert httpx.get(url + "/ping", timeout=10).status_code == 200  # open, as /health


def test_streamed_requests_through_the_router_need_the_key_too(router):
    with httpx.stream("POST", router.url + "/v1/completions", json={**BODY, "stream": True},
                      timeout=120) as resp:
        resp.read()
        assert_401(resp)
    with httpx.stream("POST", router.url + "/v1/completions", json={**BODY, "stream": True},
                      headers=AUTH, timeout=120) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    assert events[-1] == "[DONE]" and len(events) >= 5


def test_health_is_open(pd, router):
    for url in (router.url, pd[0].url, pd[1].url):
        assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_a_router_without_the_key_reaches_keyed_instances_by_signing(tmp, pd):
    """The instances want a key the router does not have: its MAC stands in for it."""
    r = start_router(tmp, prefill=[pd[0]], decode=[pd[1]])
    try:
        resp = complete(r.url)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 4
        with httpx.stream("POST", r.url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "stream": True, **GREEDY}) as stream:
            events = sse_events(stream)
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        models = httpx.get(r.url + "/v1/models", timeout=10).json()["data"]  # fanned out
        assert len(models) == 1
    finally:
        r.stop()


def test_metrics_need_the_key_unless_open(tmp, pd, router):
    for url in (router.url, pd[0].url):
        assert_401(httpx.get(url + "/metrics", timeout=10))
        assert httpx.get(url + "/metrics", headers=AUTH, timeout=10).status_code == 200
        assert internal("GET", url, "/metrics").status_code == 200
    opened = start_router(tmp, prefill=[pd[0]], decode=[pd[1]],
                          flags=("--api-key", KEY, "--open-metrics"))
    keyless = start_router(tmp, prefill=[pd[0]], decode=[pd[1]])
    try:
        for r in (opened, keyless):  # no key set: nothing to protect /metrics with
            resp = httpx.get(r.url + "/metrics", timeout=10)
            assert resp.status_code == 200 and "pdserve_router:" in resp.text
        assert_401(complete(opened.url))  # --open-metrics opens /metrics alone
    finally:
        opened.stop()
        keyless.stop()


# ---- internal routes: only holders of the deployment secret ------------------------------


def test_instances_needs_an_internal_call(router, pd):
    assert_401(httpx.get(router.url + "/instances", timeout=10), "internal_call_required")
    assert_401(httpx.get(router.url + "/instances", headers=AUTH, timeout=10),
               "internal_call_required")  # the clients' key is not enough
    forged = sign_request(WRONG_SECRET, "GET", "/instances")
    assert_401(httpx.get(router.url + "/instances", headers=forged, timeout=10),
               "internal_call_required")
    assert listed(router) == sorted([pd[0].url, pd[1].url])


def test_a_rogue_cannot_register_and_never_gets_traffic(router, pd):
    rogue = StubInstance("ok")
    try:
        join = {"url": rogue.url, "role": "decode"}
        for headers in ({}, AUTH, sign_request(WRONG_SECRET, "POST", "/register",
                                               json.dumps(join).encode()),
                        {"X-PDServe-Auth": "t=1;n=2;mac=3"}):
            resp = httpx.post(router.url + "/register", json=join, headers=headers, timeout=10)
            assert_401(resp, "internal_call_required")
        assert listed(router) == sorted([pd[0].url, pd[1].url])
        for stream in (False, True, False, True):
            resp = complete(router.url, AUTH, stream=stream)
            assert resp.status_code == 200, resp.text
        assert rogue.calls == []  # not even a health check
    finally:
        rogue.stop()


def test_unauthenticated_deregister_leaves_the_instances_serving(router, pd):
    for inst in pd:
        resp = httpx.post(router.url + "/deregister", json={"url": inst.url}, headers=AUTH,
                          timeout=10)
        assert_401(resp, "internal_call_required")
    assert listed(router) == sorted([pd[0].url, pd[1].url])
    assert complete(router.url, AUTH).status_code == 200


def test_kv_release_needs_an_internal_call(pd):
    p = pd[0]
    body = {"remote_request_id": "cmpl-nope"}
    assert_401(httpx.post(p.url + "/v1/kv/release", json=body, timeout=10),
               "internal_call_required")
    assert_401(httpx.post(p.url + "/v1/kv/release", json=body, headers=AUTH, timeout=10),
               "internal_call_required")
    # a MAC binds the body: the same header over another id is refused
    other = sign_request(DeploymentSecret.from_env(), "POST", "/v1/kv/release",
                         json.dumps({"remote_request_id": "cmpl-other"}).encode())
    assert_401(httpx.post(p.url + "/v1/kv/release", content=json.dumps(body).encode(),
                          headers=other, timeout=10), "internal_call_required")
    resp = internal("POST", p.url, "/v1/kv/release", body)
    assert resp.status_code != 401, resp.text  # past the door (what it then says is its own)


def test_a_replayed_internal_call_is_refused(router, pd):
    secret = DeploymentSecret.from_env()
    headers = sign_request(secret, "GET", "/instances")
    assert httpx.get(router.url + "/instances", headers=headers, timeout=10).status_code == 200
    assert_401(httpx.get(router.url + "/instances", headers=headers, timeout=10),
               "internal_call_required")
    content = json.dumps(BODY).encode()
    headers = {"content-type": "application/json",
               **sign_request(secret, "POST", "/v1/completions", content)}
    first = httpx.post(pd[0].url + "/v1/completions", content=content, headers=headers,
                       timeout=120)
    assert first.status_code == 200, first.text  # no API key: the MAC admits it, once
    assert_401(httpx.post(pd[0].url + "/v1/completions", content=content, headers=headers,
                          timeout=120), "internal_call_required")
    stale = sign_request(secret, "GET", "/instances", now=time.time() - 600)
    assert_401(httpx.get(router.url + "/instances", headers=stale, timeout=10),
               "internal_call_required")


def test_a_router_without_a_secret_takes_no_registration(tmp, pd):
    port = free_port()
    cmd = ["router", "--port", str(port), "--colocated", pd[0].url]
    child_env = {k: v for k, v in env().items() if k != "PDSERVE_DEPLOYMENT_SECRET"}
    log = tmp / f"router-nosecret-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", *cmd], cwd=REPO,
                                env=child_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    r = Proc(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_healthy(r, timeout_s=60, ok=(200, 503))
        resp = internal("POST", r.url, "/register", {"url": pd[1].url, "role": "decode"})
        assert_401(resp, "internal_call_required")
        assert "without a deployment secret" in resp.json()["error"]["message"]
        assert "/register is refused" in r.log()
    finally:
        r.stop()


# ---- nothing internal reaches a client ----------------------------------------------------


def test_one_token_requests_return_no_kv_transfer_params(router, pd):
    for stream in (False, True):
        resp = complete(router.url, AUTH, max_tokens=1, stream=stream)
        assert resp.status_code == 200, resp.text
        assert "kv_transfer_params" not in resp.text
    # a client asking P to hold KV for it is refused, not served with P's internals
    ask = {"max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    resp = complete(router.url, AUTH, **ask)
    assert resp.status_code == 400, resp.text
    assert "remote_block_ids" not in resp.text


def assert_no_address(text: str, *urls: str) -> None:
    for url in urls:
        assert url not in text, text
    assert not re.search(r"127\.0\.0\.1|localhost|https?://", text), text


def all_healthy(router: Proc, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(i["healthy"] for i in internal("GET", router.url, "/instances").json()[
            "instances"]):
        assert time.monotonic() < deadline, "an instance stayed unhealthy"
        time.sleep(0.2)


@pytest.mark.parametrize("mode", ["error", "break"])
def test_router_errors_name_no_instance(tmp, pd, mode):
    stub = StubInstance(mode)
    # D alone: no other instance can take its failed answers over, so the client sees errors
    r = start_router(tmp, decode=[stub])
    try:
        resp = complete(r.url)  # non-streamed: D answers 503, or a body that never ends
        assert resp.status_code in (502, 503), resp.text
        assert "error" in resp.json()
        assert_no_address(resp.text, stub.url, pd[0].url)
        all_healthy(r)  # the failure marked D down until its next health check
        with httpx.stream("POST", r.url + "/v1/completions", json={**BODY, "stream": True},
                          timeout=120) as stream:
            if stream.status_code == 200:  # "break": the headers came, then the stream broke
                events = sse_events(stream)
                errors = [e for e in events if isinstance(e, dict) and "error" in e]
                assert len(errors) == 1 and events[-1] == "[DONE]", events
                text = json.dumps(events)
            else:  # "error": refused before any header
                text = stream.read().decode()
        assert_no_address(text, stub.url, pd[0].url)
        assert stub.posts(), "the router never sent D the request"
        assert stub.url in r.log()  # the router's log keeps the address
    finally:
        r.stop()
        stub.stop()


def test_an_instance_without_a_secret_does_not_register(router, pd, caplog):
    rogue = StubInstance("ok")
    try:
        # returns at once (no heartbeat loop), having said what to set
        asyncio.run(asyncio.wait_for(keep_registered(router.url, rogue.url, "decode", None),
                                     timeout=5))
        assert "PDSERVE_DEPLOYMENT_SECRET" in caplog.text
        assert listed(router) == sorted([pd[0].url, pd[1].url])
    finally:
        rogue.stop()
