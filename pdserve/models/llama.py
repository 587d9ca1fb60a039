"""The Llama-family decoder (Llama 3.x, SmolLM2, Qwen2/2.5, Qwen3) over a paged KV cache.

The differences between the families are three flags of `ModelConfig`: `attention_bias`
(Qwen2), `qk_norm` (Qwen3) and `tie_word_embeddings`. Weights arrive under Hugging Face
names through `load_weights`, whatever file they came from.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pdserve.config import ModelConfig
from pdserve.kernels.attention import AttentionMetadata, paged_attention
from pdserve.models.layers import (
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SwiGLUMLP,
    VocabParallelEmbedding,
    default_weight_loader,
)

# HF parameter name fragment -> (our fused parameter fragment, shard index)
_PACKED = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv, optional per-head q/k RMSNorm, RoPE, paged attention, o_proj.

    The decoder layer runs `qkv_proj` itself (fused with its norm at one row), then `attend`."""

    def __init__(self, config: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            bias=config.attention_bias,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = config.head_dim
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim, config.hidden_size, False, tp_rank, tp_size
        )
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.scale = config.head_dim**-0.5

    def attend(
        self,
        positions: torch.Tensor,
        qkv: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The layer after `qkv_proj`, which the decoder layer runs fused with its norm."""
        tokens, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        q = q.view(tokens, self.num_heads, d)
        k = k.view(tokens, self.num_kv_heads, d)
        v = v.view(tokens, self.num_kv_heads, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = paged_attention(q, k, v.contiguous(), kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(tokens, self.num_heads * d))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, tp_rank, tp_size)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this block's MLP output, the residual stream before adding it)."""
        # at one row on the GPU each norm runs inside the GEMV after it, and the SwiGLU inside
        # down_proj's: 3 launches a layer fewer (layers.fused_gemv_applies)
        qkv, residual = self.input_layernorm.add_norm_linear(
            hidden, residual, self.self_attn.qkv_proj
        )
        hidden = self.self_attn.attend(positions, qkv, kv_cache, meta)
        gate_up, residual = self.post_attention_layernorm.add_norm_linear(
            hidden, residual, self.mlp.gate_up_proj
        )
        return self.mlp.activate_down(gate_up), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp_rank, tp_size
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, tp_rank, tp_size) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM holding tensor-parallel rank `tp_rank` of `tp_size`."""

    def __init__(self, config: ModelConfig, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config, self.tp_rank, self.tp_size = config, tp_rank, tp_size
        self.model = LlamaModel(config, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp_rank, tp_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run this step's tokens [T] at `positions` [T]; returns final hidden states [T, hidden].

        `kv_caches[i]` is layer i's cache [2, num_blocks, block_size, kv_heads_per_rank, head_dim];
        this step's K/V are written into it at `meta.slot_mapping`. `input_embeds` [T, hidden],
        when given, replaces the embedding of `input_ids` (a VLM's prompt with image rows).
        """
        hidden = self.model.embed_tokens(input_ids) if input_embeds is None else input_embeds
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        return self.model.norm.add_norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] of hidden states [N, hidden] (e.g. each sequence's last)."""
        return self.lm_head(hidden).float()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) tensors under Hugging Face names; each rank keeps its slice.

        Raises if a parameter of the model was not in `named_tensors`.
        """
        # the text model's own parameters (a VLM's vision tower loads its part itself)
        params = {name: p for name, p in self.named_parameters(remove_duplicate=False)
                  if name.startswith(("model.", "lm_head."))}
        modules = dict(self.named_modules(remove_duplicate=False))
        loaded: set[tuple[str, int | None]] = set()
        for hf_name, tensor in named_tensors:
            if "rotary_emb.inv_freq" in hf_name:
                continue  # computed, not learned
            if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding is the head
            name, shard = _our_name(hf_name)
            if name not in params:
                raise KeyError(f"unexpected weight {hf_name!r}")
            param = params[name]
            owner = modules[name.rpartition(".")[0]]
            loader = getattr(owner, "weight_loader", default_weight_loader)
            loader(param, tensor.to(device=param.device, dtype=param.dtype), shard)
            loaded.add((name, shard))
        if self.config.tie_word_embeddings:
            loaded.add(("lm_head.weight", None))
        missing = sorted(str(key) for key in _expected_shards(params) - loaded)
        if missing:
            raise KeyError(f"weights missing from the checkpoint: {missing[:5]} ...")


def _expected_shards(params: dict[str, nn.Parameter]) -> set[tuple[str, int | None]]:
    """Every (parameter, shard) a complete checkpoint fills."""
    expected: set[tuple[str, int | None]] = set()
    for name in params:
        shards = (
            [0, 1, 2] if ".qkv_proj." in name else [0, 1] if ".gate_up_proj." in name else [None]
        )
        expected.update((name, shard) for shard in shards)
    return expected


def _our_name(hf_name: str) -> tuple[str, int | None]:
    """Map a HF parameter name to ours and the shard index within a fused parameter."""
    for fragment, (fused, shard) in _PACKED.items():
        if fragment in hf_name:
            return hf_name.replace(fragment, fused), shard
    return hf_name, None
