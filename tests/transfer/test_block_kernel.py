"""The one-launch block-copy kernel writes exactly what the torch path (copy_blocks) writes.

On CPU it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET without a
GPU); on a GPU machine the same cases run on the GPU, plus real Llama-3.1-8B pieces.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed: the kernel cannot run")

import torch  # noqa: E402

from pdserve.transfer.block_kernel import kernel_available, launch  # noqa: E402
from pdserve.transfer.block_plan import plan_block_copy  # noqa: E402
from pdserve.transfer.blockcopy import Scratch, copy_blocks  # noqa: E402
from pdserve.transfer.layout import HeadSlice  # noqa: E402

DEVICE = torch.device("cuda" if kernel_available(torch.device("cuda")) else "cpu")
if not kernel_available(DEVICE):
    pytest.skip("the kernel runs neither in the interpreter nor on a GPU", allow_module_level=True)

SCATTERED = ([9, 2, 14, 0, 7], [1, 4, 0, 3, 11])
CONTIGUOUS = (list(range(3, 9)), list(range(6)))


def random_caches(layers: int, blocks: int, size: int, heads: int, dim: int, dtype) -> list:
    g = torch.Generator().manual_seed(blocks * 100 + heads)
    shape = (2, blocks, size, heads, dim)
    return [torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(layers)]


def both_ways(src, src_ids, dst_heads, dst_blocks, dst_ids, heads, **tile):
    """(kernel's result, torch path's result), each into fresh zeroed caches."""
    size, dim = src[0].shape[2], src[0].shape[4]
    shape = (2, dst_blocks, size, dst_heads, dim)
    mine = [torch.zeros(shape, dtype=src[0].dtype, device=DEVICE) for _ in src]
    want = [torch.zeros(shape, dtype=src[0].dtype, device=DEVICE) for _ in src]
    nbytes = launch(plan_block_copy(src, src_ids, mine, dst_ids, heads), DEVICE, **tile)
    assert nbytes == copy_blocks(src, src_ids, want, dst_ids, heads, Scratch(), kernel=False)
    return mine, want


def assert_same_bits(mine: list, want: list) -> None:
    for a, b in zip(mine, want, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("ids", [SCATTERED, CONTIGUOUS], ids=["scattered", "contiguous"])
def test_whole_heads(ids):
    src = random_caches(3, 16, 4, 4, 8, torch.bfloat16)
    assert_same_bits(*both_ways(src, ids[0], 4, 12, ids[1], None))


@pytest.mark.parametrize("ids", [SCATTERED, CONTIGUOUS], ids=["scattered", "contiguous"])
@pytest.mark.parametrize(
    "heads,dst_heads",
    [
        (HeadSlice(0, 2, 4, 0), 2),  # half of a rank's heads: TP 1 -> 2
        (HeadSlice(1, 0, 1, 1), 2),  # one head into the second slot: TP 4 -> 2
        (HeadSlice(0, 1, 3, 3), 6),  # a slice landing mid-row on a wider rank
    ],
)
def test_head_slices(ids, heads, dst_heads):
    src = random_caches(2, 16, 4, 4, 8, torch.bfloat16)
    assert_same_bits(*both_ways(src, ids[0], dst_heads, 12, ids[1], heads))


def test_rows_not_a_power_of_two_are_masked():
    src = random_caches(2, 16, 3, 3, 8, torch.float32)  # block of 3 tokens, 3 heads: 24 / row
    assert_same_bits(*both_ways(src, SCATTERED[0], 3, 12, SCATTERED[1], None))


def test_pieces_larger_than_a_tile_are_copied_in_steps():
    src = random_caches(2, 16, 4, 4, 8, torch.bfloat16)
    mine, want = both_ways(src, SCATTERED[0], 2, 12, SCATTERED[1], HeadSlice(0, 1, 3, 0),
                           tile_bytes=8 * 2, max_warps=1)
    assert_same_bits(mine, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.uint8])
def test_every_element_width(dtype):
    src = [c.to(dtype) for c in random_caches(1, 16, 4, 2, 8, torch.float32)]
    assert_same_bits(*both_ways(src, SCATTERED[0], 2, 12, SCATTERED[1], None))


def test_nan_payloads_arrive_unchanged():
    src = random_caches(1, 16, 4, 2, 8, torch.bfloat16)
    src[0].view(torch.int16)[0, 9, 0, 0, :4] = torch.tensor([0x7FC1, 0x7F81, -0x3F, 0x7FFF])
    assert_same_bits(*both_ways(src, SCATTERED[0], 2, 12, SCATTERED[1], None))


def test_nothing_to_copy_launches_nothing():
    src = random_caches(1, 4, 4, 2, 8, torch.bfloat16)
    assert launch(plan_block_copy(src, [], src, [], None), DEVICE) == 0


@pytest.mark.skipif(DEVICE.type != "cuda", reason="real shapes: GPU only")
@pytest.mark.parametrize("heads,dst_heads", [(None, 8), (HeadSlice(0, 4, 8, 0), 4)])
def test_llama_pieces_on_the_gpu(heads, dst_heads):
    g = torch.Generator().manual_seed(0)
    src = random_caches(4, 256, 16, 8, 128, torch.bfloat16)
    src_ids = torch.randperm(256, generator=g)[:100].tolist()
    dst_ids = torch.randperm(128, generator=g)[:100].tolist()
    assert_same_bits(*both_ways(src, src_ids, dst_heads, 128, dst_ids, heads))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="copy_blocks launches the kernel on CUDA only")
def test_copy_blocks_takes_the_kernel_on_one_gpu():
    src = random_caches(2, 16, 16, 8, 128, torch.bfloat16)
    dst = [torch.zeros(2, 12, 16, 8, 128, dtype=c.dtype, device=DEVICE) for c in src]
    want = [torch.zeros_like(c) for c in dst]
    copy_blocks(src, SCATTERED[0], dst, SCATTERED[1], None)
    copy_blocks(src, SCATTERED[0], want, SCATTERED[1], None, kernel=False)
    assert_same_bits(dst, want)
