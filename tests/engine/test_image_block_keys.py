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
