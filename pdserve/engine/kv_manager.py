"""Per-request block bookkeeping on top of the BlockPool: prefix hits, slots, publishing."""

from __future__ import annotations

from pdserve.block_hashing import hash_block, usable_blocks
from pdserve.engine.blocks import BlockPool
from pdserve.engine.request import Request


class KVCacheManager:
    """Gives requests the blocks their next tokens need and publishes full blocks for reuse."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_size = pool.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def update_hashes(self, request: Request) -> None:
        """Extend the request's chained hashes over every full block of its known tokens."""
        bs = self.block_size
        if (len(request.block_hashes) + 1) * bs > request.num_tokens:
            return  # the common decode step: no new full block, skip building the token list
        tokens = request.all_token_ids
        images = request.prompt_images
        keys = images.block_keys if images is not None else {}  # blocks holding image rows
        while (len(request.block_hashes) + 1) * bs <= len(tokens):
            i = len(request.block_hashes)
            parent = request.block_hashes[-1] if i else None
            request.block_hashes.append(
                hash_block(parent, tokens[i * bs : (i + 1) * bs], keys.get(i, b"")))

    def take_prefix(self, request: Request) -> int:
        """Attach the cached leading blocks of a request that holds none; returns tokens hit."""
        assert not request.block_ids and request.num_computed_tokens == 0
        self.update_hashes(request)
        # Never hit the whole sequence: the last token must run to give logits.
        usable = usable_blocks(request.num_tokens, self.block_size)
        request.block_ids = self.pool.take_cached(request.block_hashes[:usable])
        hit = len(request.block_ids) * self.block_size
        request.num_computed_tokens = hit
        request.num_registered_blocks = len(request.block_ids)
        return hit

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more computed tokens; False if the pool is short."""
        need = self.blocks_needed(request.num_computed_tokens + num_new_tokens)
        extra = need - len(request.block_ids)
        if extra <= 0:
            return True
        if extra > self.pool.num_free_blocks:
            return False
        request.block_ids.extend(self.pool.allocate(extra))
        return True

    def publish_full_blocks(self, request: Request) -> None:
        """Register blocks whose every token is computed, so later prompts can reuse them."""
        if request.num_computed_tokens // self.block_size <= request.num_registered_blocks:
            return
        self.update_hashes(request)
        full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        for i in range(request.num_registered_blocks, full):
            self.pool.register(request.block_ids[i], request.block_hashes[i])
        request.num_registered_blocks = max(request.num_registered_blocks, full)

    def free(self, request: Request) -> None:
        """Return the request's blocks; its full blocks stay findable until evicted."""
        if request.block_ids:
            self.pool.free(request.block_ids)
        request.block_ids = []
        request.block_array = None  # the next blocks may have the same count but other ids
        request.num_registered_blocks = 0
