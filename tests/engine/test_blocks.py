"""The block pool: allocation, ref counts, prefix-cache reuse and LRU eviction."""

import pytest

from pdserve.block_hashing import hash_block
from pdserve.engine.blocks import BlockPool, NoFreeBlocks


def test_allocate_takes_distinct_blocks_and_free_returns_them():
    pool = BlockPool(num_blocks=4, block_size=2)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free_blocks == 1
    pool.free(a)
    assert pool.num_free_blocks == 4


def test_allocating_more_than_free_raises():
    pool = BlockPool(num_blocks=2, block_size=2)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1)


def test_double_free_is_an_error():
    pool = BlockPool(num_blocks=2, block_size=2)
    a = pool.allocate(1)
    pool.free(a)
    with pytest.raises(RuntimeError):
        pool.free(a)


def test_chained_hash_depends_on_every_earlier_token():
    h1 = hash_block(None, [1, 2])
    assert hash_block(h1, [3, 4]) != hash_block(hash_block(None, [9, 2]), [3, 4])
    assert hash_block(h1, [3, 4]) == hash_block(hash_block(None, [1, 2]), [3, 4])


def test_registered_block_is_found_after_free_and_shared_while_used():
    pool = BlockPool(num_blocks=3, block_size=2)
    [b] = pool.allocate(1)
    pool.register(b, 123)
    assert pool.take_cached([123]) == [b]  # still in use: ref count 2
    assert pool.blocks[b].ref_count == 2
    pool.free([b])
    pool.free([b])
    assert pool.num_free_blocks == 3
    assert pool.take_cached([123, 456]) == [b]  # found again, taken out of the free queue
    assert pool.num_free_blocks == 2


def test_eviction_drops_least_recently_freed_cached_block():
    pool = BlockPool(num_blocks=2, block_size=2)
    a, b = pool.allocate(2)
    pool.register(a, 1)
    pool.register(b, 2)
    pool.free([a])
    pool.free([b])
    pool.allocate(1)  # evicts a (freed first)
    assert pool.peek_cached([1]) == 0
    assert pool.peek_cached([2]) == 1


def test_prefix_caching_disabled_never_hits():
    pool = BlockPool(num_blocks=2, block_size=2, enable_prefix_caching=False)
    [a] = pool.allocate(1)
    pool.register(a, 7)
    assert pool.take_cached([7]) == []
