"""The fused one-row GEMVs compute linear(rmsnorm(x + residual)) and linear(silu(gate) * up).

Run under the Triton interpreter. bf16 only without a residual: Triton 3.6's interpreter
truncates float32 -> bf16, so its rounded residual sum is not eager's.
"""

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pdserve.kernels.triton_activation import silu_and_mul  # noqa: E402
from pdserve.kernels.triton_fused_gemv import add_rmsnorm_gemv, silu_mul_gemv  # noqa: E402
from pdserve.kernels.triton_gemv import GemvConfig, gemv  # noqa: E402
from tests.fused_calls import count_calls  # noqa: E402

EPS = 1e-5
ULP = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}  # the output's rounding
# (K, N, config): even K; K and N multiples of no block; wider tiles; the default (one tile)
SHAPES = [
    (64, 37, GemvConfig(block_n=2, block_k=32)),
    (300, 37, GemvConfig(block_n=4, block_k=64)),
    (512, 130, GemvConfig(block_n=8, block_k=128)),
    (200, 3, None),
]
SHAPE_IDS = ["even-k", "odd-k", "block-n-8", "default"]


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close_to(out: torch.Tensor, ref: torch.Tensor, atol_of_max: float) -> None:
    """Within the output's rounding of each element plus `atol_of_max` of the largest."""
    err = (out.double() - ref).abs()
    bound = ULP[out.dtype] * ref.abs() + atol_of_max * ref.abs().max()
    assert torch.all(err <= bound), (err / ref.abs().max()).max().item()


def norm_reference(h: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = h.double()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * g.double()) @ w.double().T


@pytest.mark.parametrize("k,n,config", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rmsnorm_gemv_matches_float64(k: int, n: int, config, dtype: torch.dtype) -> None:
    x, res = randn(1, k, dtype=dtype, seed=0), randn(1, k, dtype=dtype, seed=1)
    g, w = 1 + 0.1 * randn(k, dtype=dtype, seed=2), randn(n, k, dtype=dtype, seed=3)
    x_before, res_before = x.clone(), res.clone()
    out, new_res = add_rmsnorm_gemv(x, res, g, EPS, w, config)
    summed = (x.float() + res.float()).to(dtype)  # the residual stream rounds to its dtype
    assert torch.equal(new_res, summed) and new_res.data_ptr() != res.data_ptr()
    assert torch.equal(x, x_before) and torch.equal(res, res_before)
    assert out.shape == (1, n) and out.dtype == dtype
    assert_close_to(out, norm_reference(summed, g, w), 1e-5)


@pytest.mark.parametrize("k,n,config", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rmsnorm_gemv_without_residual(k: int, n: int, config, dtype: torch.dtype) -> None:
    x, g = randn(1, k, dtype=dtype, seed=4), 1 + randn(k, dtype=dtype, seed=5)
    w = randn(n, k, dtype=dtype, seed=6)
    out, new_res = add_rmsnorm_gemv(x, None, g, EPS, w, config)
    assert new_res is x  # the first layer: the residual stream starts as the embedding
    assert_close_to(out, norm_reference(x, g, w), 1e-5)


def silu_reference(gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.double().chunk(2, -1)
    return (F.silu(gate) * up) @ w.double().T


@pytest.mark.parametrize("k,n,config", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silu_mul_gemv_matches_float64(k: int, n: int, config, dtype: torch.dtype) -> None:
    gate_up, w = randn(1, 2 * k, dtype=dtype, seed=7), randn(n, k, dtype=dtype, seed=8)
    out = silu_mul_gemv(gate_up, w, config)
    assert out.shape == (1, n) and out.dtype == dtype
    # silu, then silu * up, are rounded to the dtype before the GEMV, as silu_and_mul rounds
    assert_close_to(out, silu_reference(gate_up, w), max(2 * ULP[dtype], 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silu_mul_gemv_is_the_gemv_of_silu_and_mul(dtype: torch.dtype) -> None:
    gate_up, w = randn(1, 600, dtype=dtype, seed=9), randn(37, 300, dtype=dtype, seed=10)
    config = GemvConfig(block_n=4, block_k=64)
    unfused = gemv(silu_and_mul(gate_up), w, config)
    # the same GEMV input bit for bit; float32 sums in another order at most
    torch.testing.assert_close(silu_mul_gemv(gate_up, w, config), unfused, rtol=ULP[dtype], atol=0)


def test_strided_inputs_and_leading_dims() -> None:
    k, n = 300, 37
    x = randn(1, 2 * k, dtype=torch.float32, seed=11)[:, ::2].view(1, 1, k)  # K stride 2
    res = randn(1, 1, k, dtype=torch.float32, seed=12)
    g = randn(2 * k, dtype=torch.float32, seed=13)[::2]
    w = randn(n, 2 * k, dtype=torch.float32, seed=14)[:, ::2]
    out, new_res = add_rmsnorm_gemv(x, res, g, EPS, w, GemvConfig(4, 64))
    assert out.shape == (1, 1, n) and new_res.shape == (1, 1, k)
    assert_close_to(out.view(1, n), norm_reference((x + res).view(1, k), g, w), 1e-5)
    gate_up = randn(1, 4 * k, dtype=torch.float32, seed=15)[:, ::2].view(1, 1, 2 * k)
    out = silu_mul_gemv(gate_up, w, GemvConfig(8, 128))
    assert_close_to(out.view(1, n), silu_reference(gate_up.view(1, 2 * k), w), 1e-5)


def test_refuses_what_it_does_not_compute() -> None:
    x, g, w = torch.randn(2, 64), torch.randn(64), torch.randn(8, 64)
    with pytest.raises(ValueError, match="one row"):
        add_rmsnorm_gemv(x, None, g, EPS, w)
    with pytest.raises(ValueError, match="split_k"):
        add_rmsnorm_gemv(x[:1], None, g, EPS, w, GemvConfig(2, 32, split_k=2))
    with pytest.raises(ValueError, match="split_k"):
        silu_mul_gemv(torch.randn(1, 128), w, GemvConfig(16, 32, use_dot=True))
    with pytest.raises(ValueError, match="norm weight"):
        add_rmsnorm_gemv(x[:1], None, g[:-1], EPS, w)
    with pytest.raises(ValueError, match="residual"):
        add_rmsnorm_gemv(x[:1], x[:1].half(), g, EPS, w)
    with pytest.raises(ValueError, match="odd"):
        silu_mul_gemv(torch.randn(1, 129), w)
    with pytest.raises(ValueError, match="does not match"):
        silu_mul_gemv(torch.randn(1, 64), w)


def test_decoder_runs_the_fused_kernels_where_the_gemv_applies(monkeypatch) -> None:
    """The model's wiring, on the CPU: the GEMV's predicate made device-blind, float32."""
    from pdserve.config import ModelConfig
    from pdserve.kernels.attention import build_metadata
    from pdserve.models import layers
    from pdserve.models.llama import LlamaForCausalLM
    from pdserve.models.random_weights import init_random_weights

    config = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    init_random_weights(model, std=0.2)
    caches = [torch.zeros(2, 2, 8, 2, 16) for _ in range(2)]

    def decode_logits() -> torch.Tensor:
        with torch.inference_mode():
            model(torch.tensor([3, 14, 15]), torch.arange(3), caches,
                  build_metadata([3], [3], [[1]], 8))  # fmt: skip
            meta = build_metadata([1], [4], [[1]], 8)
            return model.compute_logits(model(torch.tensor([92]), torch.tensor([3]), caches, meta))

    unfused = decode_logits()
    blind = lambda x, w, tp_size: x.dim() == 2 and x.shape[0] <= 1 and x.dtype == w.dtype
    monkeypatch.setattr(layers, "gemv_applies", blind)
    calls = {"add_rmsnorm_gemv": 0, "silu_mul_gemv": 0}
    count_calls(monkeypatch, calls)
    fused = decode_logits()
    assert calls == {"add_rmsnorm_gemv": 4, "silu_mul_gemv": 2}  # the 3-row prefill: none
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)
