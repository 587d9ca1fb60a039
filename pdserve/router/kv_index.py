"""The router's index of the instances' prefix caches: block hash -> instances holding it,
kept from their KV events, and for a prompt the leading tokens each instance holds.

The hashes are the engine's own (pdserve/block_hashing.py), computed over the prompt's token
ids, so the count is exact: it is what the instance will find in its cache, as long as no
eviction happens between the lookup and the request's arrival.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.block_hashing import (
    block_hashes,
    image_block_keys,
    image_token_positions,
    usable_blocks,
)

MAX_HASH = (1 << 64) - 1
MAX_BLOCK_SIZE = 1 << 16


class KVIndex:
    """Which instance holds which block; one per router, used on its event loop."""

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}
        self._hashes: dict[str, set[int]] = {}  # url -> its cached hashes
        self.block_size: dict[str, int] = {}  # url -> its engine's block size

    def reset(self, url: str, block_size: int, hashes: Sequence[int]) -> None:
        """A snapshot: `url` holds exactly `hashes` now."""
        if not (isinstance(block_size, int) and 0 < block_size <= MAX_BLOCK_SIZE):
            raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}]")
        self.drop(url)
        self.block_size[url] = block_size
        self._hashes[url] = set()
        self.stored(url, hashes)

    def stored(self, url: str, hashes: Sequence[int]) -> None:
        mine = self._own(url)
        for h in _checked(hashes):
            mine.add(h)
            self._holders.setdefault(h, set()).add(url)

    def removed(self, url: str, hashes: Sequence[int]) -> None:
        mine = self._own(url)
        for h in _checked(hashes):
            mine.discard(h)
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(url)
                if not holders:
                    del self._holders[h]

    def drop(self, url: str) -> None:
        """Forget an instance (its stream broke: its cache is unknown until the next
        snapshot)."""
        self.block_size.pop(url, None)
        for h in self._hashes.pop(url, ()):
            holders = self._holders[h]
            holders.discard(url)
            if not holders:
                del self._holders[h]

    def cached_tokens(self, token_ids: Sequence[int], image_token_id: int | None = None,
                      images: Sequence[tuple[bytes, int]] = ()) -> dict[str, int]:
        """For each indexed instance, the leading tokens of the prompt its prefix cache would
        serve (whole blocks, never the last token: the engine's rule). A prompt with images
        counts past its first image only given the images' (content hash, rows), as the
        engine keys those blocks by them."""
        positions = image_token_positions(token_ids, image_token_id) if images else []
        out: dict[str, int] = {}
        for size in set(self.block_size.values()):
            urls = {u for u, bs in self.block_size.items() if bs == size}
            limit = usable_blocks(len(token_ids), size)
            keys = image_block_keys(positions, size, images) if images else None
            for i, h in enumerate(block_hashes(token_ids, size, limit, keys)):
                holders = self._holders.get(h, ())
                for url in [u for u in urls if u not in holders]:
                    out[url] = i * size
                    urls.discard(url)
                if not urls:
                    break
            out.update({url: limit * size for url in urls})
        return out

    def num_blocks(self, url: str) -> int:
        return len(self._hashes.get(url, ()))

    def _own(self, url: str) -> set[int]:
        if url not in self._hashes:
            raise ValueError("changes before a snapshot")
        return self._hashes[url]


def _checked(hashes: object) -> list[int]:
    if not isinstance(hashes, list) or not all(
            type(h) is int and 0 <= h <= MAX_HASH for h in hashes):
        raise ValueError("hashes must be a list of 64-bit unsigned ints")
    return hashes
