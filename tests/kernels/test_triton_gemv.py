"""The Triton GEMV computes F.linear(x, W) for a few rows, under the Triton interpreter."""

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

import torch  # noqa: E402

from pdserve.kernels.triton_gemv import (  # noqa: E402
    MAX_ROWS,
    GemvConfig,
    counters_for,
    default_config,
    gemv,
)

N, K = 37, 300  # multiples of no block size: the column clamp and the K mask both matter
FMA = GemvConfig(block_n=8, block_k=64)
FMA_SPLIT = GemvConfig(block_n=8, block_k=32, split_k=3)
DOT = GemvConfig(block_n=16, block_k=64, use_dot=True)
DOT_SPLIT = GemvConfig(block_n=16, block_k=32, split_k=4, use_dot=True)
CONFIGS = {"fma": FMA, "fma-split": FMA_SPLIT, "dot": DOT, "dot-split": DOT_SPLIT}


def inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    return x, w


def assert_matches_float64(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = x.double() @ w.double().T
    scale = ref.abs().max().item()
    # float32 accumulation, then the output's rounding: an ulp, as the interpreter truncates
    rtol = {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(out.dtype, 0.0)
    err = (out.double() - ref).abs()
    assert torch.all(err <= rtol * ref.abs() + 1e-5 * scale), err.max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_matches_float64_reference(m: int, config: GemvConfig, dtype: torch.dtype) -> None:
    if config.use_dot and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter multiplies bf16 tl.dot operands as raw integers")
    x, w = inputs(m, N, K, dtype, seed=m)
    out = gemv(x, w, config)
    assert out.shape == (m, N) and out.dtype == dtype
    assert_matches_float64(out, x, w)


@pytest.mark.parametrize("m,dtype", [(1, torch.bfloat16), (3, torch.float16)])
def test_default_config_matches_reference(m: int, dtype: torch.dtype) -> None:
    x, w = inputs(m, 200, 3000, dtype)  # FMA at one row, tl.dot split over K at three
    assert_matches_float64(gemv(x, w), x, w)


def test_split_k_is_deterministic_and_leaves_counters_zero() -> None:
    x, w = inputs(3, N, K, torch.float32)
    first = gemv(x, w, FMA_SPLIT)
    assert torch.equal(gemv(x, w, FMA_SPLIT), first)  # sums in split order, not arrival order
    assert not counters_for(x.device).any()  # ready for the next launch or graph replay


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_has_x_dtype_and_leading_dims(dtype: torch.dtype) -> None:
    x, w = inputs(4, N, K, dtype)
    out = gemv(x.view(2, 2, K), w, FMA)
    assert out.shape == (2, 2, N) and out.dtype == dtype
    assert_matches_float64(out.view(4, N), x, w)


def test_non_contiguous_x_and_weight_are_read_through_strides() -> None:
    x, w = inputs(6, 2 * N, 2 * K, torch.float32)
    x_view, w_view = x[::2, ::2], w[::2, ::2]  # strides (4K, 2) and (4K, 2)
    assert_matches_float64(gemv(x_view, w_view, FMA_SPLIT), x_view, w_view)
    xt = torch.randn(K, 2).T  # [2, K] with stride (1, 2)
    assert_matches_float64(gemv(xt, w[:N, :K], DOT), xt, w[:N, :K])


def test_empty_inputs() -> None:
    x, w = inputs(1, N, K, torch.float32)
    assert gemv(x[:0], w).shape == (0, N)
    assert torch.equal(gemv(x[:, :0], w[:, :0]), torch.zeros(1, N))


def test_refuses_what_it_does_not_compute() -> None:
    x, w = inputs(MAX_ROWS + 1, N, K, torch.float32)
    with pytest.raises(ValueError, match="rows"):
        gemv(x, w)
    with pytest.raises(TypeError):
        gemv(x[:1].bfloat16(), w)
    with pytest.raises(ValueError, match="does not match"):
        gemv(x[:1, :-1], w)
    with pytest.raises(ValueError, match="tl.dot"):
        gemv(x[:1], w, GemvConfig(block_n=8, block_k=64, use_dot=True))


def test_default_config_splits_k_only_to_fill_the_sms() -> None:
    assert default_config(8, 4096, 4096, torch.bfloat16).split_k == 2  # o_proj: 64 blocks
    assert default_config(8, 28672, 4096, torch.bfloat16).split_k == 1  # gate_up: 448 blocks
    assert default_config(1, 4096, 4096, torch.bfloat16).split_k == 1  # 2048 blocks of 2 rows
    assert default_config(2, 4096, 4096, torch.bfloat16).use_dot
    assert not default_config(1, 4096, 4096, torch.bfloat16).use_dot
