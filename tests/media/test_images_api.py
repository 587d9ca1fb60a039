"""Images over HTTP, with real processes: a text-only instance refuses image parts with a
400; an instance whose engine takes images (the engine stand-in, given a SmolVLM processor
folder: the server side is the real one) serves them with the processor's token count and
refuses every hostile image with a 400 naming the field, staying healthy; a router passes
images through, its body limit sized for them and its cache-aware tokenizer unbothered."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.media.vision_helpers import (
    data_url,
    encoded,
    random_image,
    reference_processor,
    save_processor_folder,
    smolvlm_tokenizer,
)
from tests.router.cluster import Proc, start_instance, start_router, wait_healthy

MAX_IMAGES = 2
MAX_PIXELS = 10**6
URL = "messages[0].content[0].image_url.url"


@dataclass
class Fleet:
    text: Proc  # the embedded SmolLM2, text only
    vision: Proc  # the stand-in engine with SmolVLM's processor settings
    router: Proc  # cache-aware, in front of `vision`
    media: Path  # --allowed-local-media-path of `vision`
    tokenizer: object


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("images")
    tokenizer = smolvlm_tokenizer()
    folder = save_processor_folder(tmp / "smolvlm", tokenizer)
    media = tmp / "media"
    media.mkdir()
    random_image(60, 90).save(media / "cat.png")
    random_image(60, 90, seed=9).save(tmp / "secret.png")
    os.symlink(tmp / "secret.png", media / "link.png")
    text = start_instance(tmp, "colocated", "--max-num-seqs", "4")
    vision = start_instance(
        tmp, "colocated", "--engine-standin", "2", "--tokenizer", str(folder),
        "--limit-mm-per-prompt", f'{{"image": {MAX_IMAGES}}}',
        "--max-image-pixels", str(MAX_PIXELS), "--allowed-local-media-path", str(media))
    procs = [text, vision]
    try:
        wait_healthy(text, vision)
        router = start_router(tmp, colocated=[vision],
                              flags=("--routing-policy", "cache_aware",
                                     "--tokenizer", str(folder)))
        procs.append(router)
        wait_healthy(router)
        yield Fleet(text, vision, router, media, tokenizer)
    finally:
        for p in procs:
            p.stop()


def image_chat(*urls: str, text: str = "What is this?", detail: str = "auto") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u, "detail": detail}} for u in urls]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
            "max_tokens": 2}


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def assert_400(resp: httpx.Response, param: str, words: str) -> None:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error


def expected_prompt_tokens(tokenizer, images: list[Image.Image], text: str) -> int:
    conversation = [{"role": "user", "content": [
        *({"type": "image"} for _ in images), {"type": "text", "text": text}]}]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=False)
    ids = reference_processor(tokenizer)(text=[rendered], images=[images])["input_ids"][0]
    return len(ids)


def assert_healthy(proc: Proc) -> None:
    assert httpx.get(proc.url + "/health", timeout=10).status_code == 200


# --- a text-only model ---


def hostile_bodies(fleet: Fleet) -> dict[str, dict]:
    """Every way a client may get an image wrong, as request bodies."""
    bomb = encoded(Image.new("1", (12_000, 12_000)))  # 144 Mpx in a few KiB
    png = encoded(random_image(40, 40))
    return {
        "bad base64": image_chat("data:image/png;base64,@@not-base64@@"),
        "not an image": image_chat(data_url(b"just some text, no pixels")),
        "truncated": image_chat(data_url(png[: len(png) // 2])),
        "too big": image_chat("data:image/png;base64," + "A" * (11 * 2**20 + 4)),
        "bomb": image_chat(data_url(bomb)),
        "http URL": image_chat("http://169.254.169.254/latest/meta-data"),
        "path escape": image_chat(f"file://{fleet.media}/../secret.png"),
        "symlink escape": image_chat(f"file://{fleet.media}/link.png"),
        "too many": image_chat(*[data_url(png)] * (MAX_IMAGES + 1)),
    }


def test_a_text_only_model_refuses_image_parts_and_stays_healthy(fleet):
    for body in hostile_bodies(fleet).values():
        resp = post(fleet.text.url, body)
        assert_400(resp, "messages[0].content[0]", "does not accept images")
    assert_healthy(fleet.text)
    resp = post(fleet.text.url, {"messages": [{"role": "user", "content": "Hi"}],
                                 "max_tokens": 2})
    assert resp.status_code == 200, resp.text


# --- a model that takes images ---


def test_an_image_is_served_with_the_processors_token_count(fleet):
    image = random_image(100, 300)
    resp = post(fleet.vision.url, image_chat(data_url(encoded(image))))
    assert resp.status_code == 200, resp.text
    expected = expected_prompt_tokens(fleet.tokenizer, [image], "What is this?")
    assert resp.json()["usage"]["prompt_tokens"] == expected


def test_two_images_and_a_jpeg(fleet):
    a, b = random_image(50, 50, 1), random_image(120, 40, 2)
    body = image_chat(data_url(encoded(a)), data_url(encoded(b, "JPEG"), "image/jpeg"))
    resp = post(fleet.vision.url, body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] > 2 * 4  # at least a global image each


def test_a_file_inside_the_allowed_folder_is_served(fleet):
    image = Image.open(fleet.media / "cat.png").convert("RGB")
    resp = post(fleet.vision.url, image_chat(f"file://{fleet.media}/cat.png"))
    assert resp.status_code == 200, resp.text
    expected = expected_prompt_tokens(fleet.tokenizer, [image], "What is this?")
    assert resp.json()["usage"]["prompt_tokens"] == expected


HOSTILE_WORDS = {
    "bad base64": (URL, "base64"),
    "not an image": (URL, "not an image"),
    "truncated": (URL, "truncated or corrupt"),
    "too big": (URL, "--max-image-bytes"),
    "bomb": (URL, "--max-image-pixels"),
    "http URL": (URL, "network fetches are off"),
    "path escape": (URL, "not inside"),
    "symlink escape": (URL, "not inside"),
    "too many": ("messages", "at most 2 images"),
}


def test_each_hostile_image_gets_a_400_naming_it_and_the_server_stays_healthy(fleet):
    for name, body in hostile_bodies(fleet).items():
        param, words = HOSTILE_WORDS[name]
        assert_400(post(fleet.vision.url, body), param, words)
    assert_healthy(fleet.vision)
    resp = post(fleet.vision.url, image_chat(data_url(encoded(random_image(30, 30)))))
    assert resp.status_code == 200, resp.text


def test_hostile_images_at_once_all_get_400s_and_good_ones_still_pass(fleet):
    bodies = list(hostile_bodies(fleet).items()) * 2
    good = image_chat(data_url(encoded(random_image(64, 64))))
    with ThreadPoolExecutor(8) as pool:
        bad = list(pool.map(lambda item: (item[0], post(fleet.vision.url, item[1])), bodies))
        fine = list(pool.map(lambda _: post(fleet.vision.url, good), range(4)))
    for name, resp in bad:
        assert resp.status_code == 400, (name, resp.text)
    assert all(resp.status_code == 200 for resp in fine)
    assert_healthy(fleet.vision)


@pytest.mark.parametrize("part,words", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==",
                                         "detail": "ultra"}}, "detail"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==", "x": 1}}, "x"),
    ({"type": "image_url", "image_url": "data:image/png;base64,AA=="}, "image_url"),
    ({"type": "image_url"}, "image_url"),
])
def test_malformed_image_parts_are_refused_by_validation(fleet, part, words):
    body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    resp = post(fleet.vision.url, body)
    assert resp.status_code == 400 and words in resp.text, resp.text


def test_an_image_outside_a_user_message_is_refused(fleet):
    part = {"type": "image_url", "image_url": {"url": data_url(encoded(random_image(8, 8)))}}
    body = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [part]}], "max_tokens": 2}
    resp = post(fleet.vision.url, body)
    assert resp.status_code == 400 and "user messages only" in resp.text, resp.text


def test_image_tokens_in_a_completion_prompt_are_refused(fleet):
    resp = httpx.post(fleet.vision.url + "/v1/completions",
                      json={"prompt": "look <image> here", "max_tokens": 2}, timeout=60)
    assert resp.status_code == 400 and "image tokens" in resp.text, resp.text


def test_the_openai_client_sends_an_image(fleet):
    import openai

    client = openai.OpenAI(base_url=fleet.vision.url + "/v1", api_key="unused")
    out = client.chat.completions.create(
        model=client.models.list().data[0].id, max_tokens=2,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Describe:"},
            {"type": "image_url", "image_url": {"url": data_url(encoded(random_image(20, 20))),
                                                "detail": "low"}}]}])
    assert out.usage.prompt_tokens > 4


# --- through the router ---


def test_the_router_passes_images_through(fleet):
    image = random_image(100, 300)
    resp = post(fleet.router.url, image_chat(data_url(encoded(image))))
    assert resp.status_code == 200, resp.text
    expected = expected_prompt_tokens(fleet.tokenizer, [image], "What is this?")
    assert resp.json()["usage"]["prompt_tokens"] == expected


def test_the_routers_body_limit_lets_a_large_image_reach_the_instance(fleet):
    """11 MiB of base64: over the default 8 MiB body limit, under the image budget; the
    instance, not the router, judges it."""
    resp = post(fleet.router.url, hostile_bodies(fleet)["too big"])
    assert_400(resp, URL, "--max-image-bytes")
    assert_healthy(fleet.router)


def test_tokenize_counts_an_images_tokens_and_a_text_model_refuses_them(fleet):
    image = random_image(100, 300)
    body = {"messages": image_chat(data_url(encoded(image)))["messages"]}
    resp = httpx.post(fleet.vision.url + "/tokenize", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["count"] == expected_prompt_tokens(fleet.tokenizer, [image],
                                                          "What is this?")
    resp = httpx.post(fleet.text.url + "/tokenize", json=body, timeout=60)
    assert_400(resp, "messages[0].content[0]", "does not accept images")


def test_a_tokenizer_naming_another_image_token_stops_the_server(fleet, tmp_path):
    """The model fills the positions of its image token id: a tokenizer whose <image> is
    another id would put every embedding in the wrong place. The server refuses to start."""
    folder = save_processor_folder(tmp_path / "mismatch", fleet.tokenizer)
    (folder / "config.json").write_text('{"image_token_id": 5}')
    proc = start_instance(tmp_path, "colocated", "--engine-standin", "2",
                          "--tokenizer", str(folder))
    try:
        assert proc.proc.wait(timeout=120) != 0
        assert "is not the model's image token 5" in proc.log()
    finally:
        proc.stop()


def shared_pixel_files(pid: int) -> int:
    """Open shared-memory files of torch tensors in process `pid`."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += "torch_" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass  # closed meanwhile
    return count


def test_a_running_requests_pixels_live_in_the_engine_not_the_server(fleet):
    """The server lets go of an image's pixels once the engine has them: a long decode
    must not keep 40-50 MB an image in the server too."""
    server_pid = fleet.vision.proc.pid
    engine_pid = int(httpx.get(fleet.vision.url + "/health", timeout=10).json()["engine_pid"])
    body = {**image_chat(data_url(encoded(random_image(100, 300)))), "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", fleet.vision.url + "/v1/chat/completions", json=body,
                      timeout=120) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(5):
            next(lines)  # decoding has begun
        assert shared_pixel_files(engine_pid) >= 1
        assert shared_pixel_files(server_pid) == 0
