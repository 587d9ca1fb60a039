"""Prompts with images through the whole engine (tiny SmolVLM, float32, CPU): greedy text
equals transformers' `generate`, whatever the chunking, batching or prefix-cache state,
and the prefix cache keys image blocks by the images' content."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.outputs import EngineRequest
from pdserve.engine.sampling_params import SamplingParams
from tests.smolvlm_reference import IMAGE_TOKEN_ID, image, prompt, reference_greedy

NUM_TOKENS = 6
BLOCK = 16
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
CASES = {"0-images": [], "1-image": [2], "4-images": [1, 2, 1, 3]}  # tiles of each image


def _engine(folder: str, budget: int = 2048, prefix_caching: bool = True) -> Engine:
    cache = CacheConfig(block_size=BLOCK, num_blocks=96, enable_prefix_caching=prefix_caching)
    return Engine(EngineArgs(model=folder, device="cpu", cache=cache,
                             scheduler=SchedulerConfig(max_num_batched_tokens=budget)))


def _case(name: str, seed: int = 0, text: int = 7) -> tuple[list[int], list]:
    images = [image(seed=100 * seed + i, tiles=n) for i, n in enumerate(CASES[name])]
    return prompt(images, seed=seed, text=text), images


def _request(rid: str, ids: list[int], images: list) -> EngineRequest:
    return EngineRequest(rid, ids, GREEDY, images=images)


@pytest.fixture(scope="module")
def expected(tiny_smolvlm) -> dict[str, list[int]]:
    reference, _ = tiny_smolvlm
    return {name: reference_greedy(reference, *_case(name), NUM_TOKENS) for name in CASES}


@pytest.fixture(scope="module")
def engine(tiny_smolvlm) -> Engine:
    return _engine(tiny_smolvlm[1])


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_text_equals_transformers(engine, expected, name):
    out = engine.generate([_request(name, *_case(name))])
    assert out[name] == expected[name]


def test_a_batch_of_image_prompts_encodes_together_and_equals_transformers(tiny_smolvlm,
                                                                            expected):
    engine = _engine(tiny_smolvlm[1], prefix_caching=False)
    out = engine.generate([_request(name, *_case(name)) for name in CASES])
    assert out == expected


def test_chunks_that_split_images_equal_transformers(tiny_smolvlm, expected):
    engine = _engine(tiny_smolvlm[1], budget=BLOCK)  # 16-token chunks: every image is split
    for name in ("1-image", "4-images"):
        engine.add_request(_request(name, *_case(name)))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        for r in engine.requests.values():  # rows are kept only while some are unconsumed
            images = r.prompt_images
            consumed = int((images.positions < r.num_computed_tokens).sum())
            assert all(int(images.ends[i]) > consumed for i in images.computed)
    assert tokens == {name: expected[name] for name in ("1-image", "4-images")}


def test_embeddings_sent_by_an_encoder_replace_the_pixels(tiny_smolvlm, expected):
    engine = _engine(tiny_smolvlm[1])
    ids, images = _case("4-images")
    model = engine.runner.model
    with torch.no_grad():
        sent = [dataclasses.replace(img, pixel_values=torch.empty(0),
                                    embeddings=model.embed_images(img.pixel_values))
                for img in images]
    assert engine.generate([_request("sent", ids, sent)])["sent"] == expected["4-images"]


def test_the_same_image_again_is_a_prefix_cache_hit(tiny_smolvlm, expected):
    engine = _engine(tiny_smolvlm[1])
    ids, images = _case("1-image")
    engine.generate([_request("first", ids, images)])
    same = [dataclasses.replace(images[0], pixel_values=images[0].pixel_values.clone())]
    engine.add_request(_request("again", ids, same))
    outputs = _run(engine)
    assert outputs["again"][0] == expected["1-image"]
    assert outputs["again"][1] == (len(ids) - 1) // BLOCK * BLOCK  # every usable block


def test_another_image_under_the_same_tokens_misses_from_its_first_block(tiny_smolvlm):
    reference, folder = tiny_smolvlm
    engine = _engine(folder)
    ids, images = _case("1-image", text=20)  # the image starts in the second block
    engine.generate([_request("first", ids, images)])
    other = [image(seed=77, tiles=2)]  # same token ids, other pixels
    engine.add_request(_request("other", ids, other))
    tokens, cached = _run(engine)["other"]
    first_image_block = ids.index(IMAGE_TOKEN_ID) // BLOCK
    assert first_image_block == 1
    assert cached == first_image_block * BLOCK  # the text before it still hits
    assert tokens == reference_greedy(reference, ids, other, NUM_TOKENS)


def test_a_text_prompt_after_an_image_prompt_shares_only_the_text_blocks(tiny_smolvlm):
    engine = _engine(tiny_smolvlm[1])
    ids, images = _case("1-image", text=20)
    engine.generate([_request("image", ids, images)])
    text = [t if t != IMAGE_TOKEN_ID else 7 for t in ids]  # same text, no image
    engine.add_request(_request("text", text, []))
    _, cached = _run(engine)["text"]
    assert cached == ids.index(IMAGE_TOKEN_ID) // BLOCK * BLOCK


@pytest.mark.parametrize("images, ids, message", [
    ([], [5, IMAGE_TOKEN_ID, 6], "image tokens"),  # placeholders without an image
    ([image(seed=1)], [5, 6, 7], "image tokens"),  # an image without placeholders
    ([dataclasses.replace(image(seed=1), num_tokens=15)], [5] + [IMAGE_TOKEN_ID] * 15,
     "rows|tokens"),  # its tiles give 16 rows
    ([dataclasses.replace(image(seed=1), pixel_values=torch.randn(1, 3, 20, 20))],
     [5] + [IMAGE_TOKEN_ID] * 16, "multiple of 8|pixel_values"),
    ([dataclasses.replace(image(seed=1), embeddings=torch.randn(16, 3))],
     [5] + [IMAGE_TOKEN_ID] * 16, "embeddings must be"),
], ids=["tokens-without-image", "image-without-tokens", "row-count", "tile-size",
        "embedding-shape"])
def test_images_that_do_not_fit_are_refused_and_the_engine_goes_on(engine, expected, images,
                                                                   ids, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request(_request("bad", ids, images))
    assert "bad" not in engine.requests
    assert engine.generate([_request("good", *_case("1-image"))])["good"] == expected["1-image"]


def test_a_text_model_refuses_images(tiny_llama):
    engine = Engine(EngineArgs(model=tiny_llama, device="cpu",
                               cache=CacheConfig(block_size=BLOCK, num_blocks=16)))
    with pytest.raises(ValueError, match="takes no images|does not accept images"):
        engine.add_request(_request("img", [5, 6, 7], [image(seed=1)]))


def _run(engine: Engine) -> dict[str, tuple[list[int], int]]:
    """Step until idle: each finished request's (tokens, prompt tokens hit in the cache)."""
    tokens: dict[str, list[int]] = {}
    result = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                result[out.request_id] = (tokens[out.request_id], out.num_cached_tokens)
    return result


def test_preempted_image_prompts_recompute_their_rows(tiny_smolvlm):
    reference, folder = tiny_smolvlm
    cases = [_case("1-image", seed=s, text=8) for s in range(3)]  # 48 + 6 tokens: 4 blocks
    engine = Engine(EngineArgs(model=folder, device="cpu", cache=CacheConfig(
        block_size=BLOCK, num_blocks=9, enable_prefix_caching=False)))
    out = engine.generate([_request(f"r{i}", *case) for i, case in enumerate(cases)])
    assert engine.stats().num_preemptions > 0
    assert out == {f"r{i}": reference_greedy(reference, *case, NUM_TOKENS)
                   for i, case in enumerate(cases)}


def test_overlapped_steps_give_the_same_text(tiny_smolvlm, expected):
    cache = CacheConfig(block_size=BLOCK, num_blocks=96)
    engine = Engine(EngineArgs(model=tiny_smolvlm[1], device="cpu", cache=cache,
                               scheduler=SchedulerConfig(max_num_batched_tokens=BLOCK),
                               async_scheduling=True))  # depth 1, as on a GPU
    assert engine.loop.depth == 1
    assert engine.generate([_request(name, *_case(name)) for name in CASES]) == expected


def test_vision_language_models_refuse_tensor_parallelism(tiny_smolvlm):
    from pdserve.models.loader import load_model

    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        load_model(tiny_smolvlm[1], torch.float32, torch.device("cpu"), tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        Engine(EngineArgs(model=tiny_smolvlm[1], device="cpu", tensor_parallel_size=2))


def test_prefill_and_decode_engines_give_the_colocated_text(tiny_smolvlm, expected):
    from pdserve.engine.handoff import HoldForDecode, parse_kv_transfer_params
    from pdserve.security import DeploymentSecret

    secret, folder = DeploymentSecret.from_env(), tiny_smolvlm[1]
    cache = CacheConfig(block_size=BLOCK, num_blocks=96)
    p, d = (Engine(EngineArgs(model=folder, device="cpu", role=role, cache=cache,
                              deployment_secret=secret)) for role in ("prefill", "decode"))
    try:
        ids, images = _case("4-images")
        first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        p.add_request(EngineRequest("r", ids, first, handoff=HoldForDecode(), images=images))
        [held] = [o for o in _steps(p) if o.finished]
        ktp = held.held.to_kv_transfer_params(None)
        handoff = parse_kv_transfer_params(ktp, 320)
        d.add_request(EngineRequest("r", ids, GREEDY, handoff=handoff, images=images))
        rest = [t for o in _steps(d) for t in o.new_token_ids]
        assert [ktp["first_token_id"]] + rest == expected["4-images"]
        assert d.stats().num_pulled_tokens == len(ids)  # D computed no image rows
    finally:
        p.close()
        d.close()


def _steps(engine: Engine, timeout_s: float = 60) -> list:
    import time

    outputs, deadline = [], time.monotonic() + timeout_s
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "request did not finish"
        outputs += engine.step()
    return outputs
