"""/health, /v1/models and /metrics, and what happens when the engine process dies."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_helpers import assert_openai_error, complete, metric

EXPECTED_METRICS = [
    "vllm:request_success_total", "vllm:num_requests_running",
    "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "pdserve:kv_blocks_free", "pdserve:kv_blocks_total",
]


def test_health_is_ok(client):
    resp = client.get("/health")
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


def test_startup_line_names_the_url(server):
    assert f"at {server.url}/v1" in server.log() and "ready" in server.log()


def test_models_lists_the_embedded_model(client):
    data = client.get("/v1/models").json()["data"]
    assert len(data) == 1 and "SmolLM2" in data[0]["id"]
    assert data[0]["max_model_len"] > 0


def test_metrics_expose_vllm_names(client):
    complete(client, "Hello", max_tokens=2, temperature=0.0)
    text = client.get("/metrics").text
    for name in EXPECTED_METRICS:
        assert name in text, name


@pytest.mark.kills_engine
def test_dead_engine_fails_requests_with_503_and_health_turns_unhealthy(client, server):
    long = {"prompt": "Tell a story.", "max_tokens": 500, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, server.url + "/v1/completions", json=long,
                                timeout=120)
        while metric(client, "vllm:num_requests_running") < 1:
            time.sleep(0.1)
        os.kill(client.get("/health").json()["engine_pid"], signal.SIGKILL)
        assert_openai_error(in_flight.result(), 503)
    assert_openai_error(client.get("/health"), 503)
    resp = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert_openai_error(resp, 503)
    assert resp.json()["error"]["code"] == "engine_dead"
