"""A vision-language preset served over HTTP: images in chat through the real openai client,
prompt lengths as transformers' SmolVLMProcessor counts them, and the image-keyed prefix
cache (the same image hits, another one does not)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from pdserve.models.loader import serving_tokenizer
from tests.media.vision_helpers import data_url, encoded, random_image, reference_processor
from tests.router.cluster import start_instance, wait_healthy

MODEL = "smolvlm-tiny"  # 32-px tiles, 16 image tokens a tile, images up to 128 px a side


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[openai.OpenAI]:
    server = start_instance(tmp_path_factory.mktemp("vlm"), "colocated", "--model", MODEL,
                            "--cpu-threads", "1")
    try:
        wait_healthy(server)
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    finally:
        server.stop()


def ask(client: openai.OpenAI, images, text: str = "Describe it."):
    parts = [{"type": "image_url", "image_url": {"url": data_url(encoded(i))}} for i in images]
    return client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": text}]}])


def reference_prompt_tokens(images, text: str = "Describe it.") -> int:
    tokenizer = serving_tokenizer(MODEL)
    turn = {"role": "user", "content": [{"type": "image"}] * len(images)
            + [{"type": "text", "text": text}]}
    prompt = tokenizer.apply_chat_template([turn], add_generation_prompt=True, tokenize=False)
    processor = reference_processor(tokenizer, tile=32, longest_edge=128, image_seq_len=16)
    return len(processor(text=[prompt], images=[images] if images else None)["input_ids"][0])


@pytest.mark.parametrize("num_images", [0, 1, 4])
def test_prompt_tokens_are_the_processors(client, num_images):
    images = [random_image(40 + 30 * i, 90, seed=i) for i in range(num_images)]
    answer = ask(client, images)
    assert answer.usage.prompt_tokens == reference_prompt_tokens(images)
    assert answer.usage.completion_tokens == 4


def test_the_same_image_hits_the_prefix_cache_and_another_does_not(client):
    image, other = random_image(64, 64, seed=10), random_image(64, 64, seed=11)
    first = ask(client, [image], "What is this?")
    again = ask(client, [image], "What is this?")
    different = ask(client, [other], "What is this?")
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 16  # all but the last partial block
    assert different.usage.prompt_tokens_details.cached_tokens < 16  # the image's block on
