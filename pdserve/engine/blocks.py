"""The paged KV block pool: allocation, reference counts and the automatic prefix cache.

A full block is named by a hash chained over every token before it, so two prompts that
share their first k full blocks share those blocks. A block whose reference count drops to
zero keeps its contents and its hash: it sits in the free queue and is found again by a
later prompt until it is evicted (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.kv_events import KVEventLog


class NoFreeBlocks(Exception):
    """Raised when an allocation asks for more blocks than are free."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and its contents are final


class BlockPool:
    """Fixed set of KV blocks; `free_queue` holds unreferenced blocks in eviction order."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.cache_queries = 0  # tokens looked up
        self.cache_hits = 0  # tokens found
        self.events: KVEventLog | None = None  # set by an instance that publishes KV events

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[int]:
        """Take `count` fresh blocks (evicting cached contents of the least recently freed)."""
        if count > len(self.free_queue):
            raise NoFreeBlocks(f"need {count} blocks, {len(self.free_queue)} free")
        ids = []
        for _ in range(count):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                    if self.events is not None:
                        self.events.removed(block.block_hash)
                block.block_hash = None
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; tail blocks go first so they are evicted first."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def take_cached(self, block_hashes: Sequence[int]) -> list[int]:
        """Reference the longest run of cached blocks matching `block_hashes` from the start."""
        ids: list[int] = []
        if not self.enable_prefix_caching:
            return ids
        for block_hash in block_hashes:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            ids.append(block_id)
        return ids

    def peek_cached(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of `block_hashes` are cached, without taking them."""
        if not self.enable_prefix_caching:
            return 0
        count = 0
        for block_hash in block_hashes:
            if block_hash not in self.cached:
                break
            count += 1
        return count

    def register(self, block_id: int, block_hash: int) -> None:
        """Publish a full, final block under its hash (first writer wins on duplicates)."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        block.block_hash = block_hash
        if self.cached.setdefault(block_hash, block_id) == block_id and self.events is not None:
            self.events.stored(block_hash)

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.cache_queries += queried_tokens
        self.cache_hits += hit_tokens
