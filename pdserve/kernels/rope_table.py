"""The RoPE angle table that every layer's rotary embedding reads: built once per model, in
plain PyTorch (the Triton kernel on the GPU and the C kernel on the CPU both index it)."""

from __future__ import annotations

import torch


def rope_cos_sin_cache(
    inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The [max_positions, D] cache `cat(cos, sin)` for inverse frequencies [D/2].

    Same angles as HF's `LlamaRotaryEmbedding` (float32 `position * inv_freq`), so pass the
    model's `inv_freq` (e.g. `rope_inv_freq(head_dim, theta, rope_scaling)`, Llama-3 scaling
    included) and `dtype` = the model dtype for HF-identical rounding.
    """
    positions = torch.arange(max_positions, device=inv_freq.device).float()
    freqs = positions[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
