"""KV events from real instances, the router's index of them, and cache-aware routing."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

from pdserve.block_hashing import block_hashes
from pdserve.router.kv_index import KVIndex
from pdserve.router.kv_subscriber import EVENTS_PATH, follow
from pdserve.router.prompt_tokens import PromptTokenizer
from pdserve.router.registry import Instance
from pdserve.router.upstream import new_session
from pdserve.security import DeploymentSecret, sign_request
from tests.router.cluster import GREEDY, metric, start_router

BLOCK_SIZE = 16  # the engine's default


def unique_prefix(words: int = 60) -> str:
    """A prompt prefix no other test sent (so no instance has it cached)."""
    tag = uuid.uuid4().hex[:8]
    return f"Session {tag}. " + " ".join(f"word{i}-{tag}" for i in range(words))


def complete(url: str, prompt: str, max_tokens: int = 4) -> dict:
    resp = httpx.post(url + "/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": max_tokens, **GREEDY})
    assert resp.status_code == 200, resp.text
    return resp.json()


def cached_tokens(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def token_ids(url: str, prompt: str) -> list[int]:
    return httpx.post(url + "/tokenize", json={"prompt": prompt}, timeout=30).json()["tokens"]


def read_events(url: str, until, timeout_s: float = 30.0) -> list[dict]:
    """Lines of a signed KV event stream until `until(lines)` holds."""
    secret = DeploymentSecret.from_env()
    headers = sign_request(secret, "GET", EVENTS_PATH)
    lines: list[dict] = []
    with httpx.stream("GET", url + EVENTS_PATH, headers=headers, timeout=timeout_s) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            lines.append(json.loads(line))
            if until(lines):
                return lines
    raise AssertionError("stream ended")


def test_events_stream_a_snapshot_then_the_blocks_a_request_stores(fleet):
    prompt = unique_prefix()
    hashes = block_hashes(token_ids(fleet.c0.url, prompt), BLOCK_SIZE)
    first = read_events(fleet.c0.url, lambda lines: True)[0]
    assert first["type"] == "snapshot" and first["block_size"] == BLOCK_SIZE
    assert not set(hashes) & set(first["hashes"])
    complete(fleet.c0.url, prompt)
    snap = read_events(fleet.c0.url, lambda lines: True)[0]
    assert set(hashes) <= set(snap["hashes"])  # the engine's own hashes, recomputed here


def test_events_arrive_live_with_load_lines(fleet):
    prompt = unique_prefix()
    want = set(block_hashes(token_ids(fleet.c1.url, prompt), BLOCK_SIZE))
    stored: set[int] = set()
    seen_load = []

    def done(lines: list[dict]) -> bool:
        if len(lines) == 2:  # after the snapshot and the first load line: send it
            complete(fleet.c1.url, prompt)
        for line in lines[-1:]:
            if line["type"] == "stored":
                stored.update(line["hashes"])
            if line["type"] == "load":
                seen_load.append(line)
        return want <= stored

    read_events(fleet.c1.url, done)
    assert {"waiting", "running", "kv_usage"} <= set(seen_load[0])


def test_unsigned_or_forged_subscriber_is_refused(fleet):
    assert httpx.get(fleet.c0.url + EVENTS_PATH, timeout=10).status_code in (401, 403)
    forged = sign_request(DeploymentSecret.generate(), "GET", EVENTS_PATH)
    resp = httpx.get(fleet.c0.url + EVENTS_PATH, headers=forged, timeout=10)
    assert resp.status_code in (401, 403)


@pytest.fixture(scope="module")
def tokenizer():
    from pdserve.models.loader import load_tokenizer

    return load_tokenizer(None)


def test_index_equals_what_the_instance_reports_cached(fleet, tokenizer):
    """The router's own code (subscriber, index, tokenizer) against a real instance: the
    cached prefix it computes for a follow-up prompt is the instance's cached_tokens."""
    first = unique_prefix(80)
    follow_up = first + " And then the story went on and on."
    inst = Instance(fleet.c0.url, ("colocated",))
    tokens = PromptTokenizer(tokenizer=tokenizer)

    async def run() -> int:
        index = KVIndex()
        async with new_session() as session:
            task = asyncio.create_task(follow(session, inst, index, DeploymentSecret.from_env()))
            await asyncio.to_thread(complete, fleet.c0.url, first)
            ids = await tokens.ids(False, {"prompt": follow_up})
            for _ in range(100):  # the stored events follow the answer within a step
                got = index.cached_tokens(ids).get(inst.url, 0)
                if got:
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            return got

    predicted = asyncio.run(run())
    assert predicted > 0
    assert cached_tokens(complete(fleet.c0.url, follow_up)) == predicted


@pytest.fixture(scope="module")
def routers(fleet, routers_tmp) -> Iterator[dict]:
    flags = ("--tokenizer", "embedded")
    made = {name: start_router(routers_tmp, colocated=[fleet.c0, fleet.c1],
                               flags=("--routing-policy", name, *flags))
            for name in ("cache_aware", "round_robin")}
    yield made
    for r in made.values():
        r.stop()


def test_cache_aware_router_sends_a_repeated_prefix_where_it_is_cached(routers):
    url = routers["cache_aware"].url
    prefix = unique_prefix(80)
    complete(url, prefix + " First question?")
    hits = [cached_tokens(complete(url, prefix + f" Question {i}?")) for i in range(4)]
    assert all(h >= 80 for h in hits), hits  # every follow-up found the prefix
    assert metric(url, "pdserve_router:routing_decisions_total", policy="cache_aware",
                  decision="colocated", reason="colocated") >= 5


def test_round_robin_router_misses_the_prefix_every_other_time(routers):
    url = routers["round_robin"].url
    prefix = unique_prefix(80)
    hits = [cached_tokens(complete(url, prefix + f" Question {i}?")) for i in range(4)]
    assert hits[1] == 0 and hits[2] >= 80, hits  # alternating: c0, c1, c0, c1
