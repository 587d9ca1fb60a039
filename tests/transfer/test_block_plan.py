"""Planning one-launch block copies: address tables, head-slice strides, tiles and grid."""

from __future__ import annotations

import pytest
import torch

from pdserve.transfer.block_plan import NotPlannable, Side, plan_block_copy
from pdserve.transfer.layout import HeadSlice


def caches(num_layers: int, num_blocks: int, heads: int, dtype=torch.bfloat16) -> list:
    return [torch.zeros(2, num_blocks, 4, heads, 8, dtype=dtype) for _ in range(num_layers)]


def test_table_lists_layer_addresses_then_block_ids():
    src, dst = caches(3, 10, 4), caches(3, 6, 4)
    plan = plan_block_copy(src, [7, 2], dst, [0, 5], None)
    assert plan.table == [c.data_ptr() for c in src] + [c.data_ptr() for c in dst] + [7, 2, 0, 5]
    assert plan.grid == (4, 3)  # K and V of 2 pairs, 3 layers


def test_strides_are_in_elements_of_each_side():
    plan = plan_block_copy(caches(1, 10, 4), [1], caches(1, 6, 2), [0], HeadSlice(0, 2, 4, 0))
    assert (plan.src.kv_stride, plan.src.block_stride, plan.src.row_stride) == (10 * 128, 128, 32)
    assert (plan.dst.kv_stride, plan.dst.block_stride, plan.dst.row_stride) == (6 * 64, 64, 16)


def test_head_slice_sets_row_width_and_offsets():
    plan = plan_block_copy(caches(1, 4, 4), [0], caches(1, 4, 6), [0], HeadSlice(1, 1, 3, 4))
    assert (plan.rows, plan.row) == (4, 2 * 8)
    assert (plan.src.offset, plan.dst.offset) == (1 * 8, 4 * 8)


def test_precomputed_sides_give_the_same_plan_for_any_head_slice():
    src, dst = caches(2, 4, 4), caches(2, 4, 6)
    sides = Side.of(src, 0), Side.of(dst, 0)  # what a puller keeps across pulls
    for heads in (None, HeadSlice(1, 1, 3, 4), HeadSlice(0, 0, 4, 2)):
        dst_now = dst if heads is not None else caches(2, 4, 4)
        both = sides if heads is not None else (sides[0], Side.of(dst_now, 0))
        assert (plan_block_copy(src, [0, 3], dst_now, [1, 2], heads, both)
                == plan_block_copy(src, [0, 3], dst_now, [1, 2], heads))


def test_whole_heads_copy_whole_rows():
    plan = plan_block_copy(caches(2, 4, 4), [0, 1, 2], caches(2, 4, 4), [3, 2, 1], None)
    assert plan.row == plan.src.row_stride == plan.dst.row_stride == 32
    assert plan.nbytes == 2 * 2 * 3 * 4 * 32 * 2  # layers, K/V, pairs, rows, row, bf16


def test_tile_is_a_whole_piece_when_it_fits():
    plan = plan_block_copy(caches(1, 4, 4), [0], caches(1, 4, 4), [0], None)
    assert plan.tile(1 << 20) == (4, 32)
    assert plan.tile(64 * 2) == (2, 32)  # 64 elements: two rows per step
    assert plan.tile(8 * 2) == (1, 8)  # narrower than a row: columns in steps too


def test_tile_rounds_odd_rows_up_to_a_power_of_two():
    plan = plan_block_copy(caches(1, 4, 6), [0], caches(1, 4, 3), [0], HeadSlice(0, 0, 3, 0))
    assert plan.row == 24
    assert plan.tile(1 << 20) == (4, 32)


def test_warps_give_each_thread_at_least_four_wide_vectors():
    plan = plan_block_copy(caches(1, 4, 4), [0], caches(1, 4, 4), [0], None)
    assert plan.warps((16, 1024), 8) == 8  # 32 KiB: 8 warps of 4 KiB
    assert plan.warps((16, 128), 8) == 2  # 4 KiB: one head of a Llama block
    assert plan.warps((4, 32), 8) == 1


def test_alignment_is_what_every_address_shares():
    big = torch.zeros(2 * 4 * 4 * 4 * 8 + 1, dtype=torch.bfloat16)
    odd = big[1:].view(2, 4, 4, 4, 8)  # 2 bytes past a 16-byte boundary
    assert plan_block_copy(caches(1, 4, 4), [0], caches(1, 4, 4), [0], None).align == 16
    assert plan_block_copy([odd], [0], caches(1, 4, 4), [0], None).align == 2


def test_ids_outside_a_pool_are_refused():
    with pytest.raises(IndexError, match="source"):
        plan_block_copy(caches(1, 4, 4), [4], caches(1, 8, 4), [0], None)
    with pytest.raises(IndexError, match="destination"):
        plan_block_copy(caches(1, 4, 4), [0], caches(1, 8, 4), [-1], None)


def test_heads_outside_a_rank_are_refused():
    with pytest.raises(IndexError):
        plan_block_copy(caches(1, 4, 4), [0], caches(1, 4, 2), [0], HeadSlice(0, 0, 4, 0))
    with pytest.raises(IndexError):
        plan_block_copy(caches(1, 4, 4), [0], caches(1, 4, 4), [0], HeadSlice(0, 2, 6, 0))


@pytest.mark.parametrize(
    "src,dst",
    [
        (caches(1, 4, 4), caches(1, 4, 4, torch.float16)),  # the torch path converts
        (caches(2, 4, 4), caches(1, 4, 4)),
        ([torch.zeros(2, 4, 4, 8, 4).transpose(3, 4)], caches(1, 4, 4, torch.float32)),
        (caches(1, 4, 4) + caches(1, 5, 4), caches(2, 4, 4)),
    ],
)
def test_what_the_kernel_cannot_copy_is_not_planned(src, dst):
    with pytest.raises(NotPlannable):
        plan_block_copy(src, [0], dst, [0], None)
