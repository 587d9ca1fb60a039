"""The chained hash that names a full KV block, shared by the engine and the router.

The router must compute exactly the hashes an instance's prefix cache holds, in another
process: Python's `hash()` cannot serve, since `hash(None)` (the first block's parent) is an
address that differs per process on Python 3.11. blake2b is stable everywhere and fast
(about a microsecond a block); 64 bits keep the events small and leave a second preimage out
of reach. Torch-free, so the router can import it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT = 0  # the parent of a prompt's first block
_MASK = (1 << 64) - 1


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra: bytes = b"") -> int:
    """Chained hash of a full block: equal only if every earlier token is equal too.

    `extra` keys what the token ids do not say: the images whose rows fill the block's
    image-token positions (`image_block_keys`). Empty for text, whose hashes it leaves as
    they were."""
    h = hashlib.blake2b(digest_size=8)
    h.update(((parent_hash or ROOT) & _MASK).to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    if extra:  # after a fixed-length token part: no text block hashes the same bytes
        h.update(extra)
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, limit: int | None = None,
                 block_keys: dict[int, bytes] | None = None) -> list[int]:
    """The hashes of the leading full blocks of `token_ids` (at most `limit` of them);
    `block_keys` are the blocks' image keys (`image_block_keys`), if the prompt has images."""
    count = len(token_ids) // block_size
    if limit is not None:
        count = min(count, limit)
    keys = block_keys or {}
    hashes: list[int] = []
    parent: int | None = None
    for i in range(count):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size],
                            keys.get(i, b""))
        hashes.append(parent)
    return hashes


def image_token_positions(token_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Where a prompt's image rows go: the positions of its image placeholder tokens."""
    return [i for i, t in enumerate(token_ids) if t == image_token_id]


def image_block_keys(positions: Sequence[int], block_size: int,
                     images: Sequence[tuple[bytes, int]]) -> dict[int, bytes]:
    """Block index -> the key of the images whose rows fall in that block.

    `images` are (content hash, rows) in prompt order; their rows fill `positions` in order
    (pdserve/multimodal.py). An image keys every block from its first row's to its last's,
    by its content hash and row count: with the chained parent, the same key means the
    same pixels at the same positions, so the same image is a prefix-cache hit and another
    image under the same token ids a miss."""
    if sum(rows for _, rows in images) != len(positions):
        raise ValueError(f"the prompt has {len(positions)} image tokens but its images fill "
                         f"{sum(rows for _, rows in images)}")
    keys: dict[int, bytearray] = {}
    start = 0
    for content_hash, rows in images:
        if rows < 1:
            raise ValueError("an image must fill at least one image token")
        key = len(content_hash).to_bytes(2, "little") + content_hash + rows.to_bytes(8, "little")
        for block in range(positions[start] // block_size,
                           positions[start + rows - 1] // block_size + 1):
            keys.setdefault(block, bytearray()).extend(key)
        start += rows
    return {block: bytes(key) for block, key in keys.items()}


def usable_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks of a prompt the prefix cache may serve: never the last token, which must run
    to give logits (the engine's rule, kv_manager.take_prefix)."""
    return max(num_tokens - 1, 0) // block_size
