"""Block hashes of prompts with images: keyed by the images' content, text hashes unchanged."""

from __future__ import annotations

import hashlib
from array import array

import pytest

from pdserve.block_hashing import (
    ROOT,
    block_hashes,
    hash_block,
    image_block_keys,
    image_token_positions,
)

IMG = 999
BS = 4


def _text_hash(parent: int | None, tokens: list[int]) -> int:
    """The hash as it was before images: parent and token ids, nothing else."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent or ROOT).to_bytes(8, "little"))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


def _hashes(ids: list[int], images: list[tuple[bytes, int]]) -> list[int]:
    keys = image_block_keys(image_token_positions(ids, IMG), BS, images)
    return block_hashes(ids, BS, block_keys=keys)


def test_text_hashes_are_unchanged():
    ids = list(range(1, 14))
    expected, parent = [], None
    for i in range(3):
        parent = _text_hash(parent, ids[i * BS:(i + 1) * BS])
        expected.append(parent)
    assert block_hashes(ids, BS) == expected == _hashes(ids, [])
    assert hash_block(None, ids[:BS], b"") == expected[0]


def test_an_image_keys_every_block_its_rows_touch_and_only_those():
    ids = [1, 2, 3, 4, 5, IMG, IMG, IMG, IMG, IMG, 6, 7, 8, 9, 10, 11]  # rows at 5..9
    keys = image_block_keys(image_token_positions(ids, IMG), BS, [(b"a" * 32, 5)])
    assert sorted(keys) == [1, 2]
    a, b = _hashes(ids, [(b"a" * 32, 5)]), _hashes(ids, [(b"b" * 32, 5)])
    assert a[0] == b[0] == block_hashes(ids, BS)[0]  # the text block before it
    assert a[1] != b[1] and a[2] != b[2] and a[3] != b[3]  # from its first block on
    assert a == _hashes(ids, [(b"a" * 32, 5)])  # the same image: the same hashes


def test_two_images_are_keyed_in_order():
    ids = [1, IMG, IMG, 2, IMG, IMG, 3, 4]
    ab = _hashes(ids, [(b"a", 2), (b"b", 2)])
    ba = _hashes(ids, [(b"b", 2), (b"a", 2)])
    assert ab[0] != ba[0] and ab[1] != ba[1]


@pytest.mark.parametrize("rows", [[4], [6], [2, 2], [5, 0]])
def test_rows_must_fill_the_image_tokens_exactly(rows):
    ids = [1, IMG, IMG, IMG, IMG, IMG, 2]
    with pytest.raises(ValueError):
        image_block_keys(image_token_positions(ids, IMG), BS, [(b"x", n) for n in rows])


def test_the_router_index_counts_an_image_prompt_as_the_engine_hashes_it():
    from pdserve.config import VisionConfig
    from pdserve.engine.blocks import BlockPool
    from pdserve.engine.kv_manager import KVCacheManager
    from pdserve.engine.prompt_images import PromptImages
    from pdserve.engine.request import Request
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.router.kv_index import KVIndex
    from tests.smolvlm_reference import IMAGE_TOKEN_ID, image, prompt

    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          image_size=32, patch_size=4, scale_factor=2,
                          image_token_id=IMAGE_TOKEN_ID)
    images = [image(seed=1), image(seed=2, tiles=2)]
    ids = prompt(images, text=6)  # 6 + 16 + 6 + 32 + 6 = 66 tokens
    request = Request("r", ids, SamplingParams())
    request.prompt_images = PromptImages.build(ids, images, vision, 64, BS)
    KVCacheManager(BlockPool(num_blocks=32, block_size=BS)).update_hashes(request)
    index = KVIndex()
    index.reset("http://p", BS, request.block_hashes)  # the engine published every block
    keys = [(img.content_hash, img.num_tokens) for img in images]
    assert index.cached_tokens(ids, IMAGE_TOKEN_ID, keys)["http://p"] == 64  # all usable
    assert index.cached_tokens(ids)["http://p"] == 4  # token ids alone: the text before it
    other = [keys[0], (b"other", 32)]
    assert index.cached_tokens(ids, IMAGE_TOKEN_ID, other)["http://p"] == 28  # to image 1
