"""The fused one-row GEMVs on a GPU (bf16): against the unfused kernels, in a CUDA graph, and in
a decoder forward with the fusion on and off.

Skipped without CUDA; run on the GPU machine with `python3 -m pytest -q tests/gpu`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pdserve import switches
from pdserve.config import ModelConfig
from pdserve.kernels.attention import build_metadata
from pdserve.kernels.triton_activation import silu_and_mul
from pdserve.kernels.triton_fused_gemv import add_rmsnorm_gemv, silu_mul_gemv
from pdserve.kernels.triton_gemv import GemvConfig, gemv
from pdserve.kernels.triton_rmsnorm import fused_add_rmsnorm
from pdserve.models import layers
from pdserve.models.layers import build_rope_tables, fused_gemv_applies
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import _building_on
from pdserve.models.random_weights import init_random_weights
from tests.fused_calls import count_calls

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EPS = 1e-5
BF16_REL = 2e-2  # max |a - b| / max |b| between two bf16 computations of one thing
CONFIGS = {"default": None, "n4": GemvConfig(4, 1024), "n8": GemvConfig(8, 1024)}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def bf16(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, device="cuda")).to(torch.bfloat16)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "first-layer"])
@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 28672), (1000, 777)])
def test_add_rmsnorm_gemv_matches_norm_then_gemv(k, n, with_residual, config) -> None:
    torch.manual_seed(0)
    x, g, w = bf16(1, k), 1 + bf16(k, scale=0.1), bf16(n, k, scale=k**-0.5)
    residual = bf16(1, k) if with_residual else None
    normed, ref_residual = fused_add_rmsnorm(x, residual, g, EPS)
    out, new_residual = add_rmsnorm_gemv(x, residual, g, EPS, w, config)
    assert torch.equal(new_residual, ref_residual)
    assert rel_err(out, gemv(normed, w)) < BF16_REL
    h = ref_residual.double()  # no intermediate roundings: the fused kernel is closer to it
    exact = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * g.double()) @ w.double().T
    assert rel_err(out, exact) < 1e-2


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("k,n", [(14336, 4096), (1000, 777)])
def test_silu_mul_gemv_matches_silu_and_mul_then_gemv(k, n, config) -> None:
    torch.manual_seed(0)
    gate_up, w = bf16(1, 2 * k), bf16(n, k, scale=k**-0.5)
    assert rel_err(silu_mul_gemv(gate_up, w, config), gemv(silu_and_mul(gate_up), w)) < BF16_REL


def test_replays_from_a_cuda_graph_with_new_inputs() -> None:
    torch.manual_seed(0)
    x, res, g, w = bf16(1, 512), bf16(1, 512), 1 + bf16(512, scale=0.1), bf16(300, 512)
    gate_up, w_down = bf16(1, 1024), bf16(300, 512)
    run = lambda: (*add_rmsnorm_gemv(x, res, g, EPS, w), silu_mul_gemv(gate_up, w_down))
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for t in (x, res, gate_up):
        t.copy_(torch.randn_like(t))
    graph.replay()
    for got, want in zip(captured, run(), strict=True):
        assert torch.equal(got, want)  # deterministic: same inputs, same bits


def test_fusion_applies_exactly_at_one_row_of_a_one_gpu_gemv(monkeypatch) -> None:
    w, x = bf16(8, 64), bf16(1, 64)
    assert fused_gemv_applies(x, w, None, 1)
    assert not fused_gemv_applies(x, w, torch.zeros_like(w[:, 0]), 1)  # Qwen2's qkv bias
    assert not fused_gemv_applies(x, w, None, 2)  # tensor parallel: no GEMV either
    assert not fused_gemv_applies(bf16(2, 64), w, None, 1)
    assert not fused_gemv_applies(x.float(), w, None, 1)
    assert not fused_gemv_applies(x.cpu(), w, None, 1)
    monkeypatch.setattr(switches, "SWITCHES", replace(switches.SWITCHES, fused_gemv=False))
    assert not fused_gemv_applies(x, w, None, 1) and layers.gemv_applies(x, w, 1)


def small_config(variant: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=1000, hidden_size=512, intermediate_size=1376, num_layers=3, num_heads=8,
        num_kv_heads=2, head_dim=64, rope_theta=500000.0, attention_bias=variant == "qwen2",
        qk_norm=variant == "qwen3", architecture="llama" if variant == "llama" else variant,
    )  # fmt: skip


def decode_logits(model: LlamaForCausalLM, caches: list[torch.Tensor]) -> torch.Tensor:
    """A 6-token prefill (more than one row: never fused), then the logits of one decode step."""
    prompt = [5, 17, 300, 42, 9, 811]
    block_size, table = 16, [1]
    with torch.inference_mode():
        meta = build_metadata([6], [6], [table], block_size, device="cuda")
        ids, pos = torch.tensor(prompt, device="cuda"), torch.arange(6, device="cuda")
        model(ids, pos, caches, meta)
        meta = build_metadata([1], [7], [table], block_size, device="cuda")
        ids, pos = torch.tensor([77], device="cuda"), torch.tensor([6], device="cuda")
        return model.compute_logits(model(ids, pos, caches, meta))


@pytest.mark.parametrize("variant", ["llama", "qwen3", "qwen2"])
def test_decoder_logits_with_and_without_fusion(variant, monkeypatch) -> None:
    config = small_config(variant)
    with _building_on(torch.device("cuda"), torch.bfloat16):
        model = LlamaForCausalLM(config).eval()
    init_random_weights(model, std=0.05)
    build_rope_tables(model, 64, torch.bfloat16)
    shape = (2, 4, 16, config.num_kv_heads, config.head_dim)
    caches = [torch.zeros(shape, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
    calls = {"add_rmsnorm_gemv": 0, "silu_mul_gemv": 0}
    count_calls(monkeypatch, calls)
    fused = decode_logits(model, caches)
    # 3 layers; Qwen2's qkv has a bias, so only its post-attention norm fuses
    expected = {"add_rmsnorm_gemv": 3 if variant == "qwen2" else 6, "silu_mul_gemv": 3}
    assert calls == expected
    monkeypatch.setattr(switches, "SWITCHES", replace(switches.SWITCHES, fused_gemv=False))
    unfused = decode_logits(model, caches)  # the decode step overwrites its own K/V slot
    assert calls == expected  # no more calls
    assert rel_err(fused, unfused) < BF16_REL
