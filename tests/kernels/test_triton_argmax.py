"""The one-launch argmax matches torch's, ties and -inf included, under the Triton interpreter."""

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

import torch  # noqa: E402

from pdserve.kernels.triton_argmax import SLICE, argmax_rows  # noqa: E402
from pdserve.kernels.triton_gemv import counters_for  # noqa: E402


@pytest.mark.parametrize("rows,vocab", [(1, 1), (1, 100), (3, SLICE), (2, 3 * SLICE + 17),
                                        (5, 49152)])
def test_matches_torch(rows: int, vocab: int) -> None:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab))
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=1))
    assert not counters_for(logits.device).any()  # left zero for the next launch


def test_ties_go_to_the_first_index_across_slices() -> None:
    logits = torch.zeros(3, 3 * SLICE)
    logits[0, [SLICE + 5, 2 * SLICE + 1, SLICE + 9]] = 7.0  # the maximum in two slices
    logits[1, [17, 3]] = 2.0  # twice in one slice
    logits[2] = float("-inf")  # nothing but -inf: index 0, as torch
    logits[2, 2 * SLICE :] = float("-inf")
    assert argmax_rows(logits).tolist() == [SLICE + 5, 3, 0]
    assert argmax_rows(logits).tolist() == logits.argmax(dim=1).tolist()


def test_bf16_and_strided_rows() -> None:
    wide = torch.randn(4, 2 * SLICE + 3, generator=torch.Generator().manual_seed(1))
    logits = wide.to(torch.bfloat16)[:, 2:]  # a row stride wider than the row
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=1))


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        argmax_rows(torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        argmax_rows(torch.zeros(2, 0))


def test_nan_counts_as_the_largest_value_as_in_torch() -> None:
    logits = torch.randn(2, 2 * SLICE + 5, generator=torch.Generator().manual_seed(2))
    logits[0, [SLICE + 3, 2 * SLICE + 1]] = float("nan")
    logits[1] = float("nan")
    assert argmax_rows(logits).tolist() == [SLICE + 3, 0] == logits.argmax(dim=1).tolist()
