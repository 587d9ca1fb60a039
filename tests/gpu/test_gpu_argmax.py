"""The one-launch argmax on a GPU equals torch's, at vocabulary sizes of real models, and
replays from a CUDA graph. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.triton_argmax import argmax_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (7, 151936), (256, 49152)])
def test_matches_torch(rows: int, vocab: int, dtype: torch.dtype) -> None:
    torch.manual_seed(rows)
    logits = torch.randn(rows, vocab, device="cuda").to(dtype)
    logits[0, vocab // 2] = logits[0].max()  # a tie: the lowest index wins in both
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=1))


def test_replays_from_a_cuda_graph() -> None:
    logits = torch.randn(4, 128256, device="cuda")
    argmax_rows(logits)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = argmax_rows(logits)
    for _ in range(3):
        logits.copy_(torch.randn_like(logits))
        graph.replay()
        assert torch.equal(tokens, logits.argmax(dim=1))
