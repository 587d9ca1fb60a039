"""Block copies between layer caches: runs of consecutive blocks and scattered blocks alike."""

from __future__ import annotations

import pytest
import torch

from pdserve.transfer.blockcopy import Scratch, copy_blocks, runs
from pdserve.transfer.layout import HeadSlice


def caches(num_blocks: int, heads: int, fill: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(heads)
    make = (lambda s: torch.randn(s, generator=g)) if fill else torch.zeros
    return [make((2, num_blocks, 4, heads, 8)) for _ in range(3)]


def test_runs_are_consecutive_on_both_sides():
    assert runs([4, 5, 6, 9, 10], [0, 1, 2, 3, 4]) == [(4, 0, 3), (9, 3, 2)]
    assert runs([1, 2], [5, 3]) == [(1, 5, 1), (2, 3, 1)]
    assert runs([], []) == []


@pytest.mark.parametrize(
    "src_ids,dst_ids",
    [
        (list(range(3, 15)), list(range(0, 12))),  # one run: direct slice copy
        ([9, 2, 14, 0, 7], [1, 4, 0, 3, 11]),  # scattered: gather + scatter
    ],
)
@pytest.mark.parametrize("heads", [None, HeadSlice(0, 2, 4, 0)])
def test_copy_blocks_matches_indexing(src_ids, dst_ids, heads):
    src = caches(16, 4, fill=True)
    dst = caches(12, 4 if heads is None else 2, fill=False)
    nbytes = copy_blocks(src, src_ids, dst, dst_ids, heads, Scratch())
    lo, hi = (0, 4) if heads is None else (2, 4)
    for s, d in zip(src, dst):
        assert torch.equal(d[:, dst_ids], s[:, src_ids, :, lo:hi])
        others = [b for b in range(12) if b not in dst_ids]
        assert not d[:, others].any()
    assert nbytes == 3 * 2 * len(src_ids) * 4 * (hi - lo) * 8 * 4


def test_scratch_is_reused_and_grown():
    scratch = Scratch()
    a = scratch.get((2, 3), torch.float32, torch.device("cpu"))
    b = scratch.get((1, 3), torch.float32, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr()
    c = scratch.get((10, 10), torch.float32, torch.device("cpu"))
    assert c.shape == (10, 10)
