"""The fused elementwise Triton kernels (RMSNorm, RoPE, SiLU*mul) match HF / PyTorch eager."""

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from pdserve.kernels.rope_table import rope_cos_sin_cache  # noqa: E402
from pdserve.kernels.triton_activation import silu_and_mul  # noqa: E402
from pdserve.kernels.triton_rmsnorm import fused_add_rmsnorm, rmsnorm  # noqa: E402
from pdserve.kernels.triton_rope import apply_rope_  # noqa: E402
from pdserve.models.layers import rope_inv_freq  # noqa: E402

EPS = 1e-5
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so that all three frequency bands occur
}
MAX_POS = 4096


def hf_norm(hidden: int, dtype: torch.dtype = torch.float32) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(hidden, eps=EPS).to(dtype)
    with torch.no_grad():  # HF initialises the weight to 1, which would hide a missing multiply
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden))
    return norm


@pytest.mark.parametrize("hidden", [64, 576, 960, 4096])
def test_rmsnorm_matches_hf(hidden: int) -> None:
    torch.manual_seed(hidden)
    norm = hf_norm(hidden)
    x = 3 * torch.randn(5, hidden)
    torch.testing.assert_close(rmsnorm(x, norm.weight, EPS), norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [576, 960])
def test_fused_add_rmsnorm_adds_then_normalizes_like_hf(hidden: int) -> None:
    torch.manual_seed(hidden)
    norm = hf_norm(hidden)
    x, residual = torch.randn(4, hidden), torch.randn(4, hidden)
    x_before, residual_before = x.clone(), residual.clone()
    normed, new_residual = fused_add_rmsnorm(x, residual, norm.weight, EPS)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(normed, norm(x + residual), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_fused_add_rmsnorm_without_residual_passes_x_on() -> None:
    norm = hf_norm(576)
    x = torch.randn(3, 576)
    normed, new_residual = fused_add_rmsnorm(x, None, norm.weight, EPS)
    assert new_residual is x
    torch.testing.assert_close(normed, norm(x), rtol=1e-5, atol=1e-5)


def test_rmsnorm_takes_strided_rows_and_leading_dims() -> None:
    norm = hf_norm(96)
    wide = torch.randn(6, 200)
    rows = wide[:, 8:104]  # row stride 200, as a slice of a packed projection
    torch.testing.assert_close(rmsnorm(rows, norm.weight, EPS), norm(rows), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 96)
    torch.testing.assert_close(rmsnorm(x, norm.weight, EPS), norm(x), rtol=1e-5, atol=1e-5)


def test_rmsnorm_in_half_precision_rounds_like_hf() -> None:
    torch.manual_seed(0)
    norm = hf_norm(960, torch.float16)
    x, residual = torch.randn(4, 960, dtype=torch.float16), torch.randn(4, 960, dtype=torch.float16)
    normed, new_residual = fused_add_rmsnorm(x, residual, norm.weight, EPS)
    assert normed.dtype == torch.float16 and torch.equal(new_residual, x + residual)
    # one fp16 ulp at most: only the float32 sum of squares may round differently
    torch.testing.assert_close(normed, norm(x + residual), rtol=1e-3, atol=1e-3)


def hf_rotary(head_dim: int) -> LlamaRotaryEmbedding:
    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=MAX_POS,
        rope_parameters=LLAMA3_ROPE,
    )
    return LlamaRotaryEmbedding(config)


def our_cache(head_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    inv_freq = rope_inv_freq(head_dim, LLAMA3_ROPE["rope_theta"], LLAMA3_ROPE)
    return rope_cos_sin_cache(inv_freq, MAX_POS, dtype)


def test_cos_sin_cache_from_our_inv_freq_is_hf_cos_and_sin() -> None:
    positions = torch.tensor([0, 1, 17, 300, 4095])
    cos, sin = hf_rotary(128)(torch.empty(0), positions)
    cache = our_cache(128)[positions]
    assert torch.equal(cache, torch.cat((cos[:, :64], sin[:, :64]), dim=-1))


@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(64, 4, 2), (128, 8, 2), (64, 9, 3)])
def test_rope_matches_hf_apply_rotary_pos_emb(
    head_dim: int, num_heads: int, num_kv_heads: int
) -> None:
    torch.manual_seed(head_dim + num_heads)
    positions = torch.tensor([0, 5, 63, 64, 1000, 4095])
    q = torch.randn(len(positions), num_heads, head_dim)
    k = torch.randn(len(positions), num_kv_heads, head_dim)
    cos, sin = hf_rotary(head_dim)(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    apply_rope_(q, k, positions, our_cache(head_dim))
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)


def test_rope_rotates_views_of_the_packed_qkv_and_leaves_v_alone() -> None:
    heads, kv_heads, dim, tokens = 4, 1, 64, 3
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    positions = torch.tensor([7, 8, 9])
    cos, sin = hf_rotary(dim)(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    v_before = v.clone()
    apply_rope_(q, k, positions, our_cache(dim))
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(v, v_before)


def test_rope_in_half_precision_with_a_half_cache_is_eager_exact() -> None:
    torch.manual_seed(1)
    positions = torch.tensor([3, 100, 2000])
    q = torch.randn(3, 4, 64, dtype=torch.float16)
    k = torch.randn(3, 2, 64, dtype=torch.float16)
    cos, sin = hf_rotary(64)(q, positions)  # HF rounds cos/sin to q's dtype
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    apply_rope_(q, k, positions, our_cache(64, torch.float16))
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


@pytest.mark.parametrize("inter_size", [64, 960, 1500])
def test_silu_and_mul_matches_eager(inter_size: int) -> None:
    torch.manual_seed(inter_size)
    gate_up = 4 * torch.randn(3, 2 * inter_size)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


def test_silu_and_mul_takes_strided_rows_and_leading_dims() -> None:
    wide = torch.randn(4, 300)
    gate_up = wide[:, :256]
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    batched = torch.randn(2, 3, 128)
    gate, up = batched.chunk(2, dim=-1)
    out = silu_and_mul(batched)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=1e-5, atol=1e-5)
