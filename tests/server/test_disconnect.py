"""A client that goes away aborts its request, and the engine frees its KV blocks."""

from __future__ import annotations

import time

import httpx
import pytest
from server_helpers import metric

LONG = {"prompt": "Write a very long essay about the sea.", "max_tokens": 4000,
        "ignore_eos": True, "temperature": 0.0}


def wait_until_idle(client, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metric(client, "vllm:num_requests_running") == 0 and blocks_in_use(client) == 0:
            return
        time.sleep(0.2)
    pytest.fail("blocks were not freed after the client disconnected")


def blocks_in_use(client) -> float:
    return metric(client, "pdserve:kv_blocks_total") - metric(client, "pdserve:kv_blocks_free")


def test_streaming_client_disconnect_frees_blocks(client, server):
    wait_until_idle(client)
    aborted_before = _aborted(client)
    with httpx.Client(base_url=server.url, timeout=60) as other:
        with other.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert blocks_in_use(client) > 0
    wait_until_idle(client)  # long before 4000 tokens could have been generated
    assert _aborted(client) == aborted_before + 1


def test_non_streaming_client_disconnect_frees_blocks(client, server):
    wait_until_idle(client)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=LONG, timeout=3)
    wait_until_idle(client)


def _aborted(client) -> float:
    try:
        return metric(client, "vllm:request_success_total", finished_reason="abort")
    except KeyError:
        return 0.0
