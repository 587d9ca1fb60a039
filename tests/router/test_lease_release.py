"""P's KV is given back at once when the hand-off to D does not happen.

P (slow_lease_prefill) holds leases for 600 s, so a lease gone within seconds was released
on purpose. D is a stub on loopback that says it is healthy and then, as each test needs,
never answers, answers 503, or is gone (its port closed); the router checks health every
600 s, so it still believes in D when the request comes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.router.cluster import (
    GREEDY,
    Proc,
    internal,
    metric,
    start_router,
    wait_all_free,
)
from tests.router.stub_http import JSONHandler, serve_on_loopback

PROMPT = "The capital of France is"
RELEASED_WITHIN_S = 5.0  # far under the 600 s TTL, and under the 30 s default


class StubDecode:
    """A decode instance in name only. Modes for completions: "hang" (reads the request,
    never answers), "error" (503, as an instance whose engine died), "refuse" (400, as its
    HTTP layer refuses a request its engine never sees); `stop` closes the port."""

    def __init__(self, mode: str) -> None:
        self.mode, self.requests, self._done = mode, 0, threading.Event()
        self._received = threading.Event()
        stub = self

        class Handler(JSONHandler):
            def do_GET(self) -> None:
                self._answer(200, {"status": "ok"})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                stub.requests += 1
                stub._received.set()
                if stub.mode == "hang":
                    stub._done.wait(60)  # the router gives up first (its client left)
                    return
                if stub.mode == "refuse":  # as D's HTTP layer refuses, before its engine
                    self._answer(400, {"error": {"message": "too long", "type":
                                                 "invalid_request_error", "param": None,
                                                 "code": None}})
                    return
                self._answer(503, {"error": {"message": "engine died", "type": "server_error",
                                             "param": None, "code": "engine_dead"}})

        self.server, self.url = serve_on_loopback(Handler)

    def wait_for_request(self, timeout_s: float = 30.0) -> None:
        assert self._received.wait(timeout_s), "the router never sent D the request"

    def stop(self) -> None:
        """Close the port: from now on connecting to it is refused."""
        self._done.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[StubDecode]:
    s = StubDecode("hang")
    yield s
    if not s._done.is_set():
        s.stop()


@pytest.fixture
def router(routers_tmp, slow_lease_prefill, stub) -> Iterator[Proc]:
    """A router over P and the stub D; it saw D healthy once and will not look again."""
    r = start_router(routers_tmp, prefill=[slow_lease_prefill], decode=[stub],
                     flags=("--health-interval", "600"))
    listed = internal("GET", r.url, "/instances").json()["instances"]
    assert all(i["healthy"] for i in listed), listed
    yield r
    r.stop()


def leases(p: Proc) -> float:
    return metric(p.url, "pdserve:num_kv_leases")


def releases(router: Proc, reason: str) -> float:
    return metric(router.url, "pdserve_router:kv_releases_total", reason=reason)


def assert_released(p: Proc) -> None:
    """No lease and every block free within seconds (the lease's TTL is 600 s)."""
    deadline = time.monotonic() + RELEASED_WITHIN_S
    while leases(p) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leases(p) == 0
    assert wait_all_free(p, timeout_s=max(0.0, deadline - time.monotonic())) == {p.url: 0}


def completion(stream: bool) -> dict:
    return {"prompt": PROMPT, "max_tokens": 8, "stream": stream, **GREEDY}


def test_client_gone_before_decode_answered_releases_the_prefill(
        slow_lease_prefill, stub, router):
    with httpx.stream("POST", router.url + "/v1/completions", json=completion(True),
                      timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # kept: a line iterator left behind closes the connection
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[len("data: "):])["choices"][0]["text"]  # P's token
        stub.wait_for_request()  # the router now waits for D's headers
        assert leases(slow_lease_prefill) == 1
    # the client has left; D never answered
    assert_released(slow_lease_prefill)
    assert releases(router, "client_disconnect") == 1
    assert stub.requests == 1


def test_client_gone_while_a_non_stream_request_waits_for_decode_releases_the_prefill(
        slow_lease_prefill, stub, router):
    async def leave_once_decode_has_it() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            post = asyncio.create_task(client.post(router.url + "/v1/completions",
                                                   json=completion(False)))
            await asyncio.to_thread(stub.wait_for_request)
            assert leases(slow_lease_prefill) == 1
            post.cancel()  # closes the connection: the router's route task is cancelled
            with pytest.raises(asyncio.CancelledError):
                await post

    asyncio.run(leave_once_decode_has_it())
    assert_released(slow_lease_prefill)
    assert releases(router, "client_disconnect") == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("decode", ["down", "error", "refuse"])
def test_decode_that_cannot_take_the_request_releases_the_prefill(
        decode, stream, slow_lease_prefill, stub, router):
    """A D that is down or fails: P's KV goes back, and the answer is finished elsewhere
    (here on P, the only instance left); a D that refuses: its words reach the client."""
    if decode == "down":
        stub.stop()  # killed: its port refuses connections
    else:
        stub.mode = decode
    if stream:
        with httpx.stream("POST", router.url + "/v1/completions", json=completion(True),
                          timeout=60) as resp:
            assert resp.status_code == 200
            events = [line[len("data: "):] for line in resp.iter_lines()
                      if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[0])["choices"][0]["text"]  # P's token reached the client
        last = json.loads(events[-2])
        if decode == "refuse":  # D's own words reach the client
            error = last["error"]
            assert error["message"] == "too long" and error["type"] == "invalid_request_error"
        else:  # resumed after P's token
            assert last["choices"][0]["finish_reason"] == "length", events
            assert metric(router.url, "pdserve_router:resumes_total", outcome="resumed") == 1
    else:
        resp = httpx.post(router.url + "/v1/completions", json=completion(False), timeout=60)
        if decode == "refuse":
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["message"] == "too long"
        else:  # run again whole
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["completion_tokens"] == completion(False)["max_tokens"]
    assert_released(slow_lease_prefill)
    reason = {"down": "no_decode", "error": "decode_failed", "refuse": "decode_refused"}[decode]
    assert releases(router, reason) == 1
    assert stub.requests == (0 if decode == "down" else 1)


def test_release_endpoint_frees_a_held_prefill(slow_lease_prefill):
    url = slow_lease_prefill.url
    body = {**completion(False), "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True}}
    ktp = httpx.post(url + "/v1/completions", json=body, timeout=60).json()[
        "kv_transfer_params"]
    assert ktp["remote_block_ids"] and leases(slow_lease_prefill) == 1
    wrong = {"remote_request_id": ktp["remote_request_id"], "lease_token": "guess"}
    resp = internal("POST", url, "/v1/kv/release", wrong)
    assert resp.status_code == 200 and resp.json() == {"queued": True}  # says nothing, and
    time.sleep(1.0)
    assert leases(slow_lease_prefill) == 1  # finding 5: the request id alone frees nothing
    release = {"remote_request_id": ktp["remote_request_id"], "lease_token": ktp["lease_token"]}
    resp = internal("POST", url, "/v1/kv/release", release)
    assert resp.status_code == 200 and resp.json() == {"queued": True}
    assert_released(slow_lease_prefill)
    again = internal("POST", url, "/v1/kv/release", release)
    assert again.status_code == 200 and again.json() == {"queued": True}


def test_release_of_an_unknown_id_changes_nothing(slow_lease_prefill):
    url = slow_lease_prefill.url
    resp = internal("POST", url, "/v1/kv/release", {"remote_request_id": "cmpl-nope",
                                                     "lease_token": "t"})
    assert resp.status_code == 200 and resp.json() == {"queued": True}
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert leases(slow_lease_prefill) == 0


def assert_openai_400(resp: httpx.Response) -> dict:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


@pytest.mark.parametrize("content", [
    b"{}", b'{"remote_request_id": 7}', b'{"remote_request_id": ""}',
    b'{"remote_request_id": null}', b'["cmpl-1"]', b"not json", b"",
    b'{"remote_request_id": "cmpl-1"}', b'{"remote_request_id": "cmpl-1", "lease_token": 5}',
])
def test_release_with_a_bad_body_is_400(slow_lease_prefill, content):
    resp = internal("POST", slow_lease_prefill.url, "/v1/kv/release", content=content)
    assert_openai_400(resp)


def test_release_on_an_instance_that_is_not_prefill_is_400(fleet):
    resp = internal("POST", fleet.d0.url, "/v1/kv/release",
                    {"remote_request_id": "x", "lease_token": "t"})
    assert "prefill" in assert_openai_400(resp)["message"]
