"""The encoder's own parts: the LRU cache by bytes, and the batcher that encodes the images
of concurrent requests in one vision-tower call per tile size."""

from __future__ import annotations

import asyncio

import torch

from pdserve.encoder.batcher import EncodeBatcher
from pdserve.encoder.cache import EmbeddingCache


def test_cache_evicts_the_least_recently_used_to_fit():
    rows = {k: torch.zeros(4, 8) for k in (b"a", b"b", b"c")}  # 128 bytes each
    cache = EmbeddingCache(max_bytes=256)
    cache.put(b"a", rows[b"a"])
    cache.put(b"b", rows[b"b"])
    assert cache.get(b"a") is rows[b"a"]  # a is now the most recent
    cache.put(b"c", rows[b"c"])
    assert cache.get(b"b") is None and cache.get(b"a") is not None
    assert cache.bytes == 256 and len(cache) == 2
    cache.put(b"big", torch.zeros(100, 8))  # larger than the cache: not kept, nothing evicted
    assert len(cache) == 2 and (cache.hits, cache.misses) == (2, 1)


def test_batcher_gathers_concurrent_images_into_one_call_per_tile_size():
    calls = []

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return pixels.flatten(1)[:, :2].repeat_interleave(2, 0)  # 2 rows a tile, 2 wide

    batcher = EncodeBatcher(embed, window_s=0.05)

    async def main():
        images = [torch.full((tiles, 3, 4, 4), float(i)) for i, tiles in enumerate((1, 2, 1))]
        other = torch.full((1, 3, 8, 8), 9.0)  # another tile size: its own call
        return await asyncio.gather(*(batcher.encode(img, 2 * img.shape[0])
                                      for img in (*images, other)))

    try:
        out = asyncio.run(main())
    finally:
        batcher.close()
    assert sorted(calls) == [1, 4]  # 1 + 2 + 1 tiles together; the 8x8 tile alone
    assert [o.shape[0] for o in out] == [2, 4, 2, 2]
    assert [float(o[0, 0]) for o in out] == [0.0, 1.0, 2.0, 9.0]  # each its own rows
    assert batcher.stats.largest_batch == 4


def test_batcher_fails_the_jobs_of_a_failed_call_and_goes_on():
    def embed(pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] == 5:
            raise ValueError("bad tiles")
        return torch.zeros(pixels.shape[0], 2)

    batcher = EncodeBatcher(embed, window_s=0.0)

    async def main():
        bad = await asyncio.gather(batcher.encode(torch.zeros(1, 3, 5, 5), 1),
                                   return_exceptions=True)
        good = await batcher.encode(torch.zeros(1, 3, 4, 4), 1)
        return bad, good

    try:
        bad, good = asyncio.run(main())
    finally:
        batcher.close()
    assert isinstance(bad[0], ValueError) and good.shape == (1, 2)
