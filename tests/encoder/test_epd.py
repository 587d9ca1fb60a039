"""Encoder disaggregation with real processes and a tiny random-weight SmolVLM (the real
tokenizer and image preprocessing): greedy text through E->P->D, E->colocated and
colocated alone is the same with 0, 1 and 4 images, and the rows really came from the
encoders; only the deployment may send handles; a forged, misshapen or dead encoder's
handle makes P encode the image itself (counted), with the same text."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from tests.encoder.vlm_folder import build_vlm_folder
from tests.media.vision_helpers import data_url, encoded, random_image
from tests.router.cluster import (
    GREEDY,
    Proc,
    internal,
    metric,
    spawn,
    sse_events,
    start_instance,
    stream_text,
    wait_healthy,
)

CHAT = "/v1/chat/completions"
EMBEDDINGS = "pdserve:image_embeddings_total"


@dataclass
class Fleet:
    colocated: Proc  # served directly: the reference; behind `to_colocated` with encoders
    prefill: Proc
    decode: Proc
    encoders: list[Proc]  # behind both routers
    spare: Proc  # an encoder no router knows: killed by a test
    epd: Proc  # router: encoders -> prefill -> decode
    to_colocated: Proc  # router: encoders -> colocated
    folder: str  # the model's


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("epd")
    folder = str(build_vlm_folder(tmp / "smolvlm-tiny"))
    # no prefix cache: each path computes every prompt's KV from its own image rows
    engine = ("--model", folder, "--kv-cache-memory", "32MiB", "--max-num-seqs", "8",
              "--no-enable-prefix-caching")
    procs: list[Proc] = []
    try:
        colocated, prefill, decode = (start_instance(tmp, role, *engine)
                                      for role in ("colocated", "prefill", "decode"))
        encoders = [start_instance(tmp, "encoder", "--model", folder) for _ in range(2)]
        spare = start_instance(tmp, "encoder", "--model", folder)
        procs += [colocated, prefill, decode, *encoders, spare]
        wait_healthy(*procs)
        named = [a for e in encoders for a in ("--encoder", e.url)]
        # spawned here, not by start_router: one that fails to start is still stopped
        epd = spawn(tmp, "router", "router", *named, "--prefill", prefill.url,
                    "--decode", decode.url)
        procs.append(epd)
        to_colocated = spawn(tmp, "router", "router", *named, "--colocated", colocated.url)
        procs.append(to_colocated)
        wait_healthy(epd, to_colocated)
        yield Fleet(colocated, prefill, decode, encoders, spare, epd, to_colocated, folder)
    finally:
        for p in procs:
            p.stop()


def chat(num_images: int, seed: int = 0, **extra) -> dict:
    """A user message with `num_images` random images of different sizes, then text."""
    urls = [data_url(encoded(random_image(40 + 30 * i, 100 - 10 * i, seed=seed * 10 + i)))
            for i in range(num_images)]
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"messages": [{"role": "user", "content": [
        *parts, {"type": "text", "text": "Describe these."}]}],
        "max_tokens": 8, **GREEDY, **extra}


def text(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + CHAT, json=body, timeout=120)


def streamed(url: str, body: dict) -> str:
    with httpx.stream("POST", url + CHAT, json=body | {"stream": True}, timeout=120) as resp:
        assert resp.status_code == 200
        return stream_text(sse_events(resp), chat=True)


def from_encoder(inst: Proc, source: str = "encoder") -> float:
    return metric(inst.url, EMBEDDINGS, source=source)


def handles(encoder: Proc, body: dict) -> list[dict]:
    """What a router would get from `encoder` for the body's images (signed call)."""
    urls = [p["image_url"]["url"] for p in body["messages"][0]["content"]
            if p["type"] == "image_url"]
    resp = internal("POST", encoder.url, "/v1/encode", {"images": [{"url": u} for u in urls]},
                    timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["handles"]


@pytest.mark.parametrize("num_images", [0, 1, 4])
def test_greedy_text_is_the_same_on_every_path(fleet, num_images):
    body = chat(num_images, seed=num_images)
    p0, c0 = from_encoder(fleet.prefill), from_encoder(fleet.colocated)
    reference = text(post(fleet.colocated.url, body))
    assert text(post(fleet.to_colocated.url, body)) == reference
    assert text(post(fleet.epd.url, body)) == reference
    assert streamed(fleet.epd.url, body) == reference  # P's first token, then D's stream
    # the rows came from the encoders, not from a local fallback
    assert from_encoder(fleet.colocated) - c0 == num_images
    assert from_encoder(fleet.prefill) - p0 == 2 * num_images
    assert from_encoder(fleet.prefill, "fallback") == 0
    assert from_encoder(fleet.decode) == 0  # D pulls KV, never rows


def test_the_images_change_the_text(fleet):
    # else the paths above could agree while ignoring the rows
    texts = {text(post(fleet.colocated.url, chat(1, seed=seed))) for seed in (21, 22, 23)}
    assert len(texts) > 1


def test_an_encoder_registers_with_the_router_and_serves_no_request(fleet, tmp_path):
    enc = start_instance(tmp_path, "encoder", "--model", fleet.folder, "--router",
                         fleet.to_colocated.url)
    try:
        wait_healthy(enc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = internal("GET", fleet.to_colocated.url, "/instances").json()["instances"]
            mine = [i for i in listed if i["url"] == enc.url]
            if mine and mine[0]["healthy"]:
                break
            time.sleep(0.5)
        assert mine and mine[0]["role"] == "encoder" and mine[0]["healthy"]
        body = chat(0, seed=9)  # text only: no encoder is asked, none answers it
        assert text(post(fleet.to_colocated.url, body)) == text(post(fleet.colocated.url, body))
    finally:
        enc.stop()


def test_images_spread_over_the_encoders(fleet):
    before = [metric(e.url, "pdserve_encoder_images_encoded_total") for e in fleet.encoders]
    text(post(fleet.epd.url, chat(4, seed=7)))
    after = [metric(e.url, "pdserve_encoder_images_encoded_total") for e in fleet.encoders]
    assert [a - b for a, b in zip(after, before)] == [2, 2]


def test_the_same_image_again_is_a_cache_hit_on_the_encoder(fleet):
    body = chat(1, seed=11)
    text(post(fleet.to_colocated.url, body))
    hits = sum(metric(e.url, "pdserve_encoder_cache_hits_total") for e in fleet.encoders)
    # the other encoder may take it the second time: send it twice more
    text(post(fleet.to_colocated.url, body))
    text(post(fleet.to_colocated.url, body))
    assert sum(metric(e.url, "pdserve_encoder_cache_hits_total")
               for e in fleet.encoders) - hits >= 1


def test_the_same_image_at_once_is_encoded_once(fleet):
    encoder = fleet.encoders[0]
    before = metric(encoder.url, "pdserve_encoder_images_encoded_total")
    body = chat(1, seed=31)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: handles(encoder, body), range(3)))
    assert metric(encoder.url, "pdserve_encoder_images_encoded_total") - before == 1
    assert len({a[0]["lease_id"] for a in answers}) == 3  # a lease each, one computation


def test_clients_may_not_send_handles(fleet):
    body = chat(1) | {"encoder_handles": [None]}
    for url in (fleet.epd.url, fleet.colocated.url):  # the router, and P unsigned
        resp = post(url, body)
        assert resp.status_code == 400, resp.text
        assert "encoder_handles" in resp.text and "internal" in resp.text
    resp = internal("POST", fleet.colocated.url, CHAT, chat(1) | {"encoder_handles": []})
    assert resp.status_code == 400 and "one entry per image part" in resp.text
    resp = internal("POST", fleet.colocated.url, CHAT,
                    chat(1) | {"encoder_handles": [{"num_tokens": 3}]})
    assert resp.status_code == 400 and "encoder_handles[0]" in resp.text
    assert httpx.post(fleet.encoders[0].url + "/v1/encode", json={"images": []},
                      timeout=10).status_code in (401, 403)  # internal only


def test_a_bad_image_is_a_400_and_every_instance_stays_healthy(fleet):
    refused = metric(fleet.epd.url, "pdserve_router:images_encoded_total", outcome="refused")
    body = chat(1, seed=4)
    body["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,AAAA"
    for router in (fleet.epd, fleet.to_colocated):
        resp = post(router.url, body)
        assert resp.status_code == 400, resp.text
        assert "messages[0].content[0].image_url" in resp.json()["error"]["param"]
    # E refused it too (its own 400, not a failure): no encoder was marked down
    assert metric(fleet.epd.url, "pdserve_router:images_encoded_total",
                  outcome="refused") - refused == 1
    for inst in (fleet.colocated, fleet.prefill, fleet.decode, *fleet.encoders):
        assert httpx.get(inst.url + "/health", timeout=5).status_code == 200
    assert text(post(fleet.epd.url, chat(1, seed=4))) == text(
        post(fleet.colocated.url, chat(1, seed=4)))


@pytest.mark.parametrize("change", [{"lease_token": "forged-" * 6}, {"num_tokens": 7},
                                    {"hidden_size": 32}, {"content_hash": "00" * 32}])
def test_a_bad_handle_is_encoded_locally_with_the_same_text(fleet, change):
    body = chat(1, seed=3)
    reference = text(post(fleet.colocated.url, body))
    fallbacks = from_encoder(fleet.colocated, "fallback")
    bad = [h | change for h in handles(fleet.encoders[0], body)]
    resp = internal("POST", fleet.colocated.url, CHAT, body | {"encoder_handles": bad},
                    timeout=120)
    assert text(resp) == reference
    assert from_encoder(fleet.colocated, "fallback") - fallbacks == 1
    assert httpx.get(fleet.colocated.url + "/health", timeout=5).status_code == 200


def test_an_encoder_killed_mid_run_leaves_the_text_unchanged(fleet):
    body = chat(4, seed=5)
    reference = text(post(fleet.colocated.url, body))
    held = handles(fleet.spare, body)  # E encoded them; it dies before P pulls
    fleet.spare.kill()
    fallbacks = from_encoder(fleet.colocated, "fallback")
    resp = internal("POST", fleet.colocated.url, CHAT, body | {"encoder_handles": held},
                    timeout=120)
    assert text(resp) == reference
    assert from_encoder(fleet.colocated, "fallback") - fallbacks == 4
    # one of the routers' encoders dies too: the router and P carry on, text unchanged
    fleet.encoders[1].kill()
    for _ in range(2):
        assert text(post(fleet.epd.url, body)) == reference
