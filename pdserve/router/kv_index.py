"""The router's index of the instances' prefix caches: block hash -> instances holding it,
kept from their KV events, and for a prompt the leading tokens each instance holds.

The hashes are the engine's own (pdserve/block_hashing.py), computed over the prompt's token
ids, so the count is exact: it is what the instance will find in its cache, as long as no
eviction happens between the lookup and the request's arrival.

A prompt just routed to an instance counts as held there at once (`routed`), until the
instance's events confirm its blocks or PENDING_TTL_S passes: the events of its prefill
arrive after it ran, and a prompt that shares its prefix and comes meanwhile should follow
it, not start a second copy elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pdserve.block_hashing import (
    block_hashes,
    image_block_keys,
    image_token_positions,
    usable_blocks,
)

MAX_HASH = (1 << 64) - 1
MAX_BLOCK_SIZE = 1 << 16
PENDING_TTL_S = 30.0  # a routed prompt's blocks count as held this long without events


class KVIndex:
    """Which instance holds which block; one per router, used on its event loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._holders: dict[int, set[str]] = {}  # confirmed and pending holders
        self._hashes: dict[str, set[int]] = {}  # url -> its cached hashes (confirmed)
        self._pending: dict[str, dict[int, float]] = {}  # url -> routed hash -> expiry
        self.block_size: dict[str, int] = {}  # url -> its engine's block size
        self._clock = clock
        self._next_sweep = 0.0

    def routed(self, url: str, token_ids: Sequence[int]) -> None:
        """`url` was just sent this text prompt: its whole blocks count as held there until
        the instance's events confirm them or PENDING_TTL_S passes."""
        size = self.block_size.get(url)
        if size is None:
            return  # not indexed (no snapshot yet): nothing to anticipate
        self._expire()
        mine, pending = self._hashes[url], self._pending.setdefault(url, {})
        expiry = self._clock() + PENDING_TTL_S
        for h in block_hashes(token_ids, size, usable_blocks(len(token_ids), size)):
            if h not in mine:
                pending[h] = expiry
                self._holders.setdefault(h, set()).add(url)

    def reset(self, url: str, block_size: int, hashes: Sequence[int]) -> None:
        """A snapshot: `url` holds exactly `hashes` now."""
        if not (isinstance(block_size, int) and 0 < block_size <= MAX_BLOCK_SIZE):
            raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}]")
        self.drop(url)
        self.block_size[url] = block_size
        self._hashes[url] = set()
        self.stored(url, hashes)

    def stored(self, url: str, hashes: Sequence[int]) -> None:
        mine, pending = self._own(url), self._pending.get(url, {})
        for h in _checked(hashes):
            mine.add(h)
            pending.pop(h, None)  # confirmed
            self._holders.setdefault(h, set()).add(url)

    def removed(self, url: str, hashes: Sequence[int]) -> None:
        mine, pending = self._own(url), self._pending.get(url, {})
        for h in _checked(hashes):
            mine.discard(h)
            pending.pop(h, None)
            self._unhold(h, url)

    def drop(self, url: str) -> None:
        """Forget an instance (its stream broke: its cache is unknown until the next
        snapshot)."""
        self.block_size.pop(url, None)
        for h in self._hashes.pop(url, set()) | set(self._pending.pop(url, {})):
            self._unhold(h, url)

    def _unhold(self, h: int, url: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(url)
            if not holders:
                del self._holders[h]

    def _expire(self) -> None:
        """Routed blocks no event confirmed in time: the prefill failed or went elsewhere."""
        now = self._clock()
        if now < self._next_sweep:
            return  # at most one sweep a second: expiry is coarse, lookups stay cheap
        self._next_sweep = now + 1.0
        for url, pending in self._pending.items():
            for h in [h for h, expiry in pending.items() if expiry <= now]:
                del pending[h]
                self._unhold(h, url)

    def cached_tokens(self, token_ids: Sequence[int], image_token_id: int | None = None,
                      images: Sequence[tuple[bytes, int]] = ()) -> dict[str, int]:
        """For each indexed instance, the leading tokens of the prompt its prefix cache would
        serve (whole blocks, never the last token: the engine's rule). A prompt with images
        counts past its first image only given the images' (content hash, rows), as the
        engine keys those blocks by them."""
        self._expire()
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
        """Blocks `url` holds, routed ones still unconfirmed included."""
        return len(self._hashes.get(url, ())) + len(self._pending.get(url, ()))

    def _own(self, url: str) -> set[int]:
        if url not in self._hashes:
            raise ValueError("changes before a snapshot")
        return self._hashes[url]


def _checked(hashes: object) -> list[int]:
    if not isinstance(hashes, list) or not all(
            type(h) is int and 0 <= h <= MAX_HASH for h in hashes):
        raise ValueError("hashes must be a list of 64-bit unsigned ints")
    return hashes
