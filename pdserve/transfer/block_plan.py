"""The arithmetic of one-launch block copies: address tables, head-slice strides, tiles, grid.

Pure Python over tensor metadata, so it is tested on CPU; block_kernel.py launches it.
Each layer cache is [2, num_blocks, block_size, heads, head_dim], contiguous. A "piece" is
one block of one layer, K or V: `rows` (block_size) token rows, each holding `row`
contiguous elements (the copied heads * head_dim) at `offset` within a row of `row_stride`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from pdserve.transfer.layout import HeadSlice

MAX_ALIGN = 16  # bytes: one 128-bit load or store per thread is the widest there is


class NotPlannable(ValueError):
    """These caches cannot go through the block-copy kernel (the torch path takes them)."""


@dataclass(frozen=True)
class Side:
    """One side's caches, in elements: where layers start and how blocks, rows, K/V stride."""

    addresses: list[int]  # data_ptr() of each layer's cache, in bytes
    num_blocks: int
    kv_stride: int
    block_stride: int
    row_stride: int
    offset: int  # first copied element within a row (head slice start * head_dim)

    @classmethod
    def of(cls, caches: list[torch.Tensor], first_head: int) -> Side:
        first = caches[0]
        for c in caches:
            if c.dim() != 5 or not c.is_contiguous():
                raise NotPlannable("layer caches must be contiguous [2, blocks, size, heads, dim]")
            if c.shape != first.shape or c.dtype != first.dtype or c.device != first.device:
                raise NotPlannable("layer caches differ in shape, dtype or device")
        kv, block, row = first.stride()[:3]
        offset = first_head * first.shape[4]
        return cls([c.data_ptr() for c in caches], first.shape[1], kv, block, row, offset)


@dataclass(frozen=True)
class BlockCopyPlan:
    """Every (src block -> dst block) pair of every layer, K and V: one launch's worth."""

    src: Side
    dst: Side
    src_ids: list[int]
    dst_ids: list[int]
    rows: int  # token rows per block
    row: int  # contiguous elements copied per row
    elem_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.src.addresses)

    @property
    def num_pairs(self) -> int:
        return len(self.src_ids)

    @property
    def grid(self) -> tuple[int, int]:
        """(K and V of every pair, layers): one program per piece."""
        return (2 * self.num_pairs, self.num_layers)

    @property
    def nbytes(self) -> int:
        return self.num_layers * 2 * self.num_pairs * self.rows * self.row * self.elem_bytes

    @property
    def table(self) -> list[int]:
        """What the kernel reads: src layer addresses, dst layer addresses, src ids, dst ids."""
        return self.src.addresses + self.dst.addresses + self.src_ids + self.dst_ids

    @property
    def align(self) -> int:
        """Bytes every layer's base address is a multiple of (lets the kernel use wide loads)."""
        return math.gcd(MAX_ALIGN, *self.src.addresses, *self.dst.addresses)

    def tile(self, max_tile_bytes: int) -> tuple[int, int]:
        """(rows, columns) one program copies per step: powers of two, a whole piece if it fits."""
        max_elems = max(1, max_tile_bytes // self.elem_bytes)
        cols = min(_pow2_at_least(self.row), _pow2_at_most(max_elems))
        rows = min(_pow2_at_least(self.rows), max(1, _pow2_at_most(max_elems // cols)))
        return rows, cols

    def warps(self, tile: tuple[int, int], max_warps: int) -> int:
        """Warps per program: each thread moves at least four 16-byte vectors of a tile."""
        tile_bytes = tile[0] * tile[1] * self.elem_bytes
        return min(max_warps, _pow2_at_most(max(1, tile_bytes // (32 * 4 * MAX_ALIGN))))


def plan_block_copy(
    src: list[torch.Tensor],
    src_ids: list[int],
    dst: list[torch.Tensor],
    dst_ids: list[int],
    heads: HeadSlice | None,
    sides: tuple[Side, Side] | None = None,
) -> BlockCopyPlan:
    """The plan for copy_blocks' arguments; NotPlannable if the caches do not fit the kernel.

    `sides`: `Side.of(src, 0)` and `Side.of(dst, 0)` from an earlier pull between the same
    caches (checking 32 layers on each side costs more host time than the rest of the plan).
    IndexError for a block id outside either pool: the kernel does not check bounds.
    """
    if len(src) != len(dst) or not src:
        raise NotPlannable(f"{len(src)} source layers, {len(dst)} destination layers")
    if len(src_ids) != len(dst_ids):
        raise ValueError("source and destination block lists differ in length")
    if src[0].dtype != dst[0].dtype:
        raise NotPlannable(f"dtypes differ: {src[0].dtype} -> {dst[0].dtype}")
    src_heads, dst_heads = src[0].shape[3], dst[0].shape[3]
    if heads is None:
        heads = HeadSlice(0, 0, src_heads, 0)
    if not (0 <= heads.remote_start < heads.remote_stop <= src_heads
            and 0 <= heads.local_start and heads.local_stop <= dst_heads):
        raise IndexError(f"{heads} does not fit {src_heads} source, {dst_heads} local heads")
    if src[0].shape[2] != dst[0].shape[2] or src[0].shape[4] != dst[0].shape[4]:
        raise NotPlannable("block size or head dim differ")
    if sides is None:
        sides = Side.of(src, 0), Side.of(dst, 0)
    head_dim = src[0].shape[4]
    s = dataclasses.replace(sides[0], offset=heads.remote_start * head_dim)
    d = dataclasses.replace(sides[1], offset=heads.local_start * head_dim)
    _check_ids(src_ids, s.num_blocks, "source")
    _check_ids(dst_ids, d.num_blocks, "destination")
    rows = src[0].shape[2]
    elem = src[0].element_size()
    return BlockCopyPlan(s, d, list(src_ids), list(dst_ids), rows, heads.num_heads * head_dim, elem)


def _check_ids(ids: list[int], num_blocks: int, side: str) -> None:
    if ids and (min(ids) < 0 or max(ids) >= num_blocks):
        raise IndexError(f"{side} block ids {min(ids)}..{max(ids)} outside 0..{num_blocks - 1}")


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)
