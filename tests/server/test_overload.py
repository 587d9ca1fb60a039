"""More concurrent requests than --max-num-seqs queue up; every one completes."""

from __future__ import annotations

import asyncio

import httpx
from server_helpers import MAX_NUM_SEQS


async def test_more_requests_than_running_slots_all_complete(server):
    n = 3 * MAX_NUM_SEQS
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        bodies = [{"prompt": f"Count to {i}:", "max_tokens": 4, "ignore_eos": True,
                   "temperature": 0.0, "stream": i % 2 == 0} for i in range(n)]
        responses = await asyncio.gather(
            *(client.post("/v1/completions", json=b) for b in bodies)
        )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for resp, body in zip(responses, bodies):
        if body["stream"]:
            assert resp.text.rstrip().endswith("data: [DONE]")
        else:
            assert resp.json()["usage"]["completion_tokens"] == 4
