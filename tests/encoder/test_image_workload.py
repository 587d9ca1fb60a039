"""`pdserve bench --dataset-name image`: seeded requests of N random images plus text, and
the image tokens counted as SGLang's benchmark counts them: the processor's expansion of
each image in the prompt (transformers' SmolVLM processor is the reference here)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from pdserve.bench.client import EndpointConfig, build_payload
from pdserve.bench.workloads import WorkloadConfig, build_workload
from pdserve.bench.workloads.images import parse_resolution
from tests.media.vision_helpers import (
    reference_processor,
    save_processor_folder,
    smolvlm_tokenizer,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tokenizer = smolvlm_tokenizer()
    return tokenizer, str(save_processor_folder(tmp_path_factory.mktemp("proc"), tokenizer))


def workload(folder, **change):
    tokenizer, path = folder
    values = dict(dataset_name="image", num_prompts=3, seed=1, random_input_len=32,
                  random_output_len=8, image_count=2, image_resolution="200x120",
                  tokenizer=path)
    cfg = WorkloadConfig(**(values | change))
    return build_workload(cfg, tokenizer)


def test_same_seed_same_requests_other_seed_other_images(folder):
    a, b, c = workload(folder), workload(folder), workload(folder, seed=2)
    assert [s.images for s in a] == [s.images for s in b]
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert a[0].images[0] != c[0].images[0]
    assert len({url for s in a for url in s.images}) == 6  # no two images alike
    image = Image.open(io.BytesIO(base64.b64decode(a[0].images[0].split(",", 1)[1])))
    assert (image.format, image.size) == ("JPEG", (200, 120))


def test_vision_tokens_are_the_processors_expansion_of_each_image(folder):
    tokenizer, _ = folder
    spec = workload(folder)[0]
    processor = reference_processor(tokenizer)
    expanded = processor(text="<image>", images=[[Image.new("RGB", (200, 120))]])
    per_image = len(expanded["input_ids"][0])  # the text is the image alone
    assert spec.vision_len == 2 * per_image > 0
    text = len(tokenizer.encode(spec.prompt, add_special_tokens=False))
    assert spec.prompt_len == text + spec.vision_len


def test_the_chat_payload_sends_the_images_before_the_text(folder):
    spec = workload(folder)[0]
    body = build_payload(EndpointConfig("http://x", "/v1/chat/completions"), spec)
    content = body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "image_url", "text"]
    assert content[0]["image_url"]["url"] == spec.images[0]
    with pytest.raises(ValueError, match="chat endpoint"):
        build_payload(EndpointConfig("http://x", "/v1/completions"), spec)


def test_resolutions():
    assert parse_resolution("1080p") == (1920, 1080)
    assert parse_resolution("640x480") == (640, 480)
    for bad in ("0x10", "huge", "10x99999"):
        with pytest.raises(ValueError, match="image-resolution"):
            parse_resolution(bad)
