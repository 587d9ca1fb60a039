"""Failures: a killed prefill, colocated or decode instance, and no leaked KV blocks after.

These kill c1, p1 and d1 of the fleet, so they run after every other router test.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.router.cluster import GREEDY, metric, sse_events, start_router, wait_all_free

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
    resp = httpx.post(fleet.p0.url + "/v1/completions", json=body, timeout=120)
    assert resp.json()["kv_transfer_params"]["remote_block_ids"]


async def _load(url: str, n: int, on_progress) -> list[tuple[str, int, str]]:
    """n concurrent completions; (prompt, status, text) of each."""
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def one(i: int) -> tuple[str, int, str]:
            prompt = PROMPTS[i % len(PROMPTS)]
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, **GREEDY}
            resp = await client.post(url + "/v1/completions", json=body)
            on_progress()
            text = resp.json()["choices"][0]["text"] if resp.status_code == 200 else resp.text
            return prompt, resp.status_code, text

        return await asyncio.gather(*(one(i) for i in range(n)))


def _kill_when(done: list[int], at: int, victim) -> threading.Thread:
    def run() -> None:
        while done[0] < at:
            time.sleep(0.02)
        victim.kill()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_killed_prefill_under_load_every_request_completes_correctly(
        fleet, routers_tmp, expected, orphan_lease):
    router = start_router(routers_tmp, prefill=[fleet.p0, fleet.p1], decode=[fleet.d0])
    try:
        done = [0]
        killer = _kill_when(done, 5, fleet.p1)

        def progress() -> None:
            done[0] += 1

        results = asyncio.run(_load(router.url, 100, progress))
        killer.join(timeout=5)
        assert fleet.p1.proc.poll() is not None
        failed = [(p, s, t) for p, s, t in results if s != 200 or t != expected[p]]
        assert not failed, failed[:3]
        retried = metric(router.url, "pdserve_router:prefill_retries_total")
        errors = metric(router.url, "pdserve_router:upstream_errors_total", role="prefill")
        print(f"prefill retries: {retried}, prefill upstream errors: {errors}")
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
        done = [0]
        killer = _kill_when(done, 2, fleet.c1)

        def progress() -> None:
            done[0] += 1

        results = asyncio.run(_load(router.url, 20, progress))
        killer.join(timeout=5)
        failed = [(p, s, t) for p, s, t in results if s != 200 or t != expected[p]]
        assert not failed, failed[:3]
    finally:
        router.stop()


def _stream(url: str, prompt: str, started: threading.Event) -> list:
    body = {"prompt": prompt, "max_tokens": 16, "stream": True, **GREEDY}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as resp:
        assert resp.status_code == 200
        events = []
        for event in _iter(resp):
            events.append(event)
            if len(events) >= 3:
                started.set()
        return events


def _iter(resp):
    yield from sse_events(resp)


def test_killed_decode_fails_its_requests_clearly_and_nothing_else(fleet, routers_tmp):
    router = start_router(routers_tmp, prefill=[fleet.p0], decode=[fleet.d0, fleet.d1])
    try:
        prompts = [f"Write a poem about the number {i}." for i in range(12)]
        refs = {}
        for p in prompts:
            body = {"prompt": p, "max_tokens": 16, **GREEDY}
            refs[p] = httpx.post(fleet.c0.url + "/v1/completions", json=body,
                                 timeout=120).json()["choices"][0]["text"]
        started = threading.Event()
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(_stream, router.url, p, started) for p in prompts]
            assert started.wait(120)
            fleet.d1.kill()
            results = [f.result() for f in futures]
        ok = failed = 0
        for prompt, events in zip(prompts, results):
            assert events[-1] == "[DONE]"
            errors = [e for e in events if isinstance(e, dict) and "error" in e]
            if errors:
                failed += 1
                assert fleet.d1.url in errors[0]["error"]["message"]
                assert errors[0]["error"]["type"] == "server_error"
            else:
                ok += 1
                text = "".join(e["choices"][0]["text"] for e in events
                               if isinstance(e, dict) and e.get("choices"))
                assert text == refs[prompt]
        assert ok > 0
        print(f"killed decode: {failed} failed clearly, {ok} completed")
        body = {"prompt": prompts[0], "max_tokens": 16, **GREEDY}
        after = httpx.post(router.url + "/v1/completions", json=body, timeout=120)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == refs[prompts[0]]
    finally:
        router.stop()


def test_no_leaks_every_surviving_block_pool_is_all_free(fleet, orphan_lease):
    """After all of the above (aborts, disconnects, kills, an expired lease)."""
    survivors = [p for p in fleet.alive()]
    assert {p.url for p in survivors} == {fleet.c0.url, fleet.p0.url, fleet.d0.url}
    used = wait_all_free(*survivors, timeout_s=45)
    assert used == {p.url: 0 for p in survivors}
