"""The one-launch seeded noise gives the torch path's noise, under the Triton interpreter."""

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

import torch  # noqa: E402

from pdserve.engine.seeded_noise import exponential_noise, prompt_digest, row_key  # noqa: E402
from pdserve.kernels.triton_seeded_noise import BLOCK, noise_rows  # noqa: E402


@pytest.mark.parametrize("rows,vocab", [(1, 7), (3, BLOCK), (2, 2 * BLOCK + 5)])
def test_matches_the_torch_path(rows: int, vocab: int) -> None:
    keys = [row_key(9, prompt_digest([4, 5]), i) for i in range(rows)]
    want = exponential_noise(keys, vocab, torch.float32, torch.device("cpu"))
    got = noise_rows(torch.tensor(keys, dtype=torch.long), vocab)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
