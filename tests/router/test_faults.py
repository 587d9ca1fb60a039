"""Failures: a killed prefill, colocated or decode instance, and no leaked KV blocks after.

These kill c1, p1 and d1 of the fleet, so they run after every other router test.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.router.cluster import GREEDY, internal, metric, start_router, wait_all_free

pytestmark = pytest.mark.kills_instance

MAX_TOKENS = 6
PROMPTS = [f"Count from {i} to {i + 5}:" for i in range(10)]


@pytest.fixture(scope="module")
def expected(fleet) -> dict[str, str]:
    """The colocated reference texts of the load's prompts."""
    out = {}
    for p in PROMPTS:
        body = {"prompt": p, "max_tokens": MAX_TOKENS, **GREEDY}
        out[p] = httpx.post(fleet.c0.url + "/v1/completions", json=body,
                            timeout=120).json()["choices"][0]["text"]
    return out


@pytest.fixture(scope="module")
def orphan_lease(fleet) -> None:
    """A prefill whose decode never comes: its lease must expire and free the blocks."""
    body = {"prompt": PROMPTS[0] * 4, "max_tokens": 1, **GREEDY,
            "kv_transfer_params": {"do_remote_decode": True}}
    resp = internal("POST", fleet.p0.url, "/v1/completions", body, timeout=120)
    assert resp.json()["kv_transfer_params"]["remote_block_ids"]


async def _load(url: str, n: int) -> list[tuple[str, int, str]]:
    """n concurrent completions; (prompt, status, text) of each."""
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def one(i: int) -> tuple[str, int, str]:
            prompt = PROMPTS[i % len(PROMPTS)]
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, **GREEDY}
            resp = await client.post(url + "/v1/completions", json=body)
            text = resp.json()["choices"][0]["text"] if resp.status_code == 200 else resp.text
            return prompt, resp.status_code, text

        return await asyncio.gather(*(one(i) for i in range(n)))


def kill_when_busy(router_url: str, victim, in_flight: int) -> threading.Thread:
    """Kill `victim` (and its engine) once the router has `in_flight` requests on it."""
    def busy() -> int:
        listed = internal("GET", router_url, "/instances").json()["instances"]
        return next((i["in_flight"] for i in listed if i["url"] == victim.url), 0)

    def run() -> None:
        deadline = time.monotonic() + 120
        while busy() < in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        victim.kill()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_killed_prefill_under_load_every_request_completes_correctly(
        fleet, routers_tmp, expected, orphan_lease):
    router = start_router(routers_tmp, prefill=[fleet.p0, fleet.p1], decode=[fleet.d0])
    try:
        killer = kill_when_busy(router.url, fleet.p1, in_flight=10)
        results = asyncio.run(_load(router.url, 100))
        killer.join(timeout=5)
        assert fleet.p1.proc.poll() is not None
        failed = [(p, s, t) for p, s, t in results if s != 200 or t != expected[p]]
        assert not failed, failed[:3]
        # p1 died holding prefills: they were retried on p0 (or served plain on d0)
        assert metric(router.url, "pdserve_router:upstream_errors_total", role="prefill") > 0
        assert metric(router.url, "pdserve_router:prefill_retries_total") > 0
    finally:
        router.stop()


def test_no_healthy_prefill_serves_plain_on_decode(fleet, routers_tmp, expected):
    router = start_router(routers_tmp, prefill=[fleet.p1], decode=[fleet.d0])  # p1 is dead
    try:
        body = {"prompt": PROMPTS[3], "max_tokens": MAX_TOKENS, **GREEDY}
        resp = httpx.post(router.url + "/v1/completions", json=body, timeout=120)
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == \
            expected[PROMPTS[3]]
        assert metric(router.url, "pdserve_router:fallbacks_total") == 1
        assert metric(router.url, "pdserve_router:requests_total", kind="fallback") == 1
    finally:
        router.stop()


def test_killed_colocated_instance_fails_over(fleet, routers_tmp, expected):
    router = start_router(routers_tmp, colocated=[fleet.c0, fleet.c1])
    try:
        killer = kill_when_busy(router.url, fleet.c1, in_flight=5)
        results = asyncio.run(_load(router.url, 20))
        killer.join(timeout=5)
        failed = [(p, s, t) for p, s, t in results if s != 200 or t != expected[p]]
        assert not failed, failed[:3]
        assert metric(router.url, "pdserve_router:upstream_errors_total", role="colocated") > 0
    finally:
        router.stop()


def _request(url: str, prompt: str, stream: bool) -> tuple[str | None, dict | None]:
    """(text, None) when it completed, (partial text, OpenAI error) when it failed."""
    body = {"prompt": prompt, "max_tokens": 16, "stream": stream, **GREEDY}
    if not stream:
        resp = httpx.post(url + "/v1/completions", json=body, timeout=300)
        if resp.status_code != 200:
            assert resp.status_code == 502, resp.text
            return None, resp.json()
        return resp.json()["choices"][0]["text"], None
    text, events = "", []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    for data in events[:-1]:
        event = json.loads(data)
        if "error" in event:
            return text, event
        text += event["choices"][0]["text"] if event["choices"] else ""
    return text, None


def test_killed_decode_under_load_loses_no_request(fleet, routers_tmp):
    """Each answer d1 had in hand is resumed (streamed) or run again (not streamed) on d0."""
    router = start_router(routers_tmp, prefill=[fleet.p0], decode=[fleet.d0, fleet.d1])
    try:
        prompts = [f"Write a poem about the number {i}." for i in range(12)]
        with ThreadPoolExecutor(len(prompts)) as pool:
            refs = dict(zip(prompts, pool.map(
                lambda p: httpx.post(fleet.c0.url + "/v1/completions", timeout=120, json={
                    "prompt": p, "max_tokens": 16, **GREEDY}).json()["choices"][0]["text"],
                prompts)))
        killer = kill_when_busy(router.url, fleet.d1, in_flight=4)
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda ip: _request(router.url, ip[1], ip[0] % 2 == 0),
                                    enumerate(prompts)))
        killer.join(timeout=5)
        assert fleet.d1.proc.poll() is not None
        failed = [(p, err) for p, (_, err) in zip(prompts, results) if err is not None]
        assert not failed, failed[:3]
        assert all(text == refs[p] for p, (text, _) in zip(prompts, results))
        moved = sum(metric(router.url, "pdserve_router:resumes_total", outcome=o)
                    for o in ("resumed", "rerun"))
        assert moved > 0, "d1 was killed with requests in flight: they must have moved"
        print(f"killed decode: {moved:.0f} answers moved, all {len(prompts)} completed")
    finally:
        router.stop()


def test_no_leaks_every_surviving_block_pool_is_all_free(fleet, orphan_lease):
    """After all of the above (aborts, disconnects, kills, an expired lease)."""
    survivors = [p for p in fleet.alive()]
    assert {p.url for p in survivors} == {fleet.c0.url, fleet.p0.url, fleet.d0.url}
    used = wait_all_free(*survivors, timeout_s=45)
    roles = {fleet.c0.url: "c0", fleet.p0.url: "p0", fleet.d0.url: "d0"}
    assert {roles[u]: n for u, n in used.items()} == {"c0": 0, "p0": 0, "d0": 0}
