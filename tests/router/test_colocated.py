"""The router over colocated instances: relays, spreads load, passes errors, aborts on leave."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from tests.router.cluster import (
    GREEDY,
    blocks_in_use,
    free_port,
    internal,
    metric,
    sse_events,
    start_router,
    stream_text,
    wait_all_free,
)

BODY = {"prompt": "The capital of France is", "max_tokens": 8, **GREEDY}


@pytest.fixture(scope="module")
def router(fleet, routers_tmp):
    r = start_router(routers_tmp, colocated=[fleet.c0, fleet.c1])
    yield r
    r.stop()


def test_completion_through_the_router_is_the_instance_answer(fleet, router):
    direct = httpx.post(fleet.c0.url + "/v1/completions", json=BODY, timeout=60).json()
    routed = httpx.post(router.url + "/v1/completions", json=BODY, timeout=60)
    assert routed.status_code == 200
    assert routed.json()["choices"][0]["text"] == direct["choices"][0]["text"]
    assert routed.json()["usage"]["completion_tokens"] == 8


def test_stream_is_relayed_to_done_with_usage(fleet, router):
    direct = httpx.post(fleet.c0.url + "/v1/completions", json=BODY, timeout=60).json()
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 8
    assert stream_text(events, chat=False) == direct["choices"][0]["text"]


def test_concurrent_requests_spread_over_both_instances(fleet, router):
    before = [metric(c.url, "vllm:request_success_total", finished_reason="length")
              for c in (fleet.c0, fleet.c1)]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: httpx.post(router.url + "/v1/completions", json=BODY,
                                                   timeout=120).status_code, range(8)))
    assert codes == [200] * 8
    after = [metric(c.url, "vllm:request_success_total", finished_reason="length")
             for c in (fleet.c0, fleet.c1)]
    served = [a - b for a, b in zip(after, before)]
    assert sum(served) == 8 and min(served) >= 2, served


def test_instance_4xx_passes_through_unchanged(fleet, router):
    bad = {"prompt": "x", "max_tokens": 0}
    direct = httpx.post(fleet.c0.url + "/v1/completions", json=bad, timeout=30)
    routed = httpx.post(router.url + "/v1/completions", json=bad, timeout=30)
    assert routed.status_code == direct.status_code == 400
    assert routed.json() == direct.json()


def test_router_refuses_a_body_that_is_not_json(router):
    resp = httpx.post(router.url + "/v1/completions", content=b"{nope", timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


def test_models_health_instances_and_metrics(fleet, router):
    models = httpx.get(router.url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["SmolLM2-135M-Instruct"]
    assert httpx.get(router.url + "/health", timeout=10).status_code == 200
    listed = internal("GET", router.url, "/instances").json()["instances"]
    assert {(i["url"], i["role"], i["healthy"]) for i in listed} == {
        (fleet.c0.url, "colocated", True), (fleet.c1.url, "colocated", True)}
    assert metric(router.url, "pdserve_router:requests_total", kind="colocated") >= 1


def test_streaming_client_disconnect_aborts_on_the_instance(fleet, router):
    aborted = sum(metric(c.url, "vllm:request_success_total", finished_reason="abort")
                  for c in (fleet.c0, fleet.c1))
    body = {"prompt": "Tell me a long story.", "max_tokens": 2000, "stream": True, **GREEDY}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: "))
        assert blocks_in_use(fleet.c0.url) + blocks_in_use(fleet.c1.url) > 0
    assert wait_all_free(fleet.c0, fleet.c1, timeout_s=20) == {fleet.c0.url: 0,
                                                                fleet.c1.url: 0}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = sum(metric(c.url, "vllm:request_success_total", finished_reason="abort")
                  for c in (fleet.c0, fleet.c1))
        if now == aborted + 1:
            break
        time.sleep(0.2)
    assert now == aborted + 1


def test_non_streaming_client_disconnect_aborts_on_the_instance(fleet, router):
    body = {"prompt": "Tell me a long story.", "max_tokens": 2000, **GREEDY}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/v1/completions", json=body, timeout=3)
    assert wait_all_free(fleet.c0, fleet.c1, timeout_s=20) == {fleet.c0.url: 0,
                                                                fleet.c1.url: 0}
    assert metric(router.url, "pdserve_router:client_disconnects_total") >= 1


def test_no_healthy_instance_is_a_503(routers_tmp):
    r = start_router(routers_tmp, colocated=[_Dead(f"http://127.0.0.1:{free_port()}")])
    try:
        assert httpx.get(r.url + "/health", timeout=10).status_code == 503
        resp = httpx.post(r.url + "/v1/completions", json=BODY, timeout=10)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "no_healthy_instance"
    finally:
        r.stop()


@dataclass
class _Dead:
    url: str
