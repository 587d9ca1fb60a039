"""Real architectures to run with random weights: the exact configs of the published models.

Presets use the embedded SmolLM2 tokenizer, whose 49,152 ids cover only part of these
vocabularies: sampled ids beyond it decode to nothing. EOS ids are the real models' ids.
"""

from __future__ import annotations

import copy

from pdserve.config import ModelConfig, VisionConfig

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_ids=[128001], architecture="llama",
    ),
    "llama-3.1-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_ids=[128001], architecture="llama",
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=[128001],
        architecture="llama",
    ),
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=131072, tie_word_embeddings=False, attention_bias=True,
        bos_token_id=151643, eos_token_ids=[151643], architecture="qwen2",
    ),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
        bos_token_id=151643, eos_token_ids=[151643], architecture="qwen2",
    ),
    "qwen3-8b": ModelConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=False, qk_norm=True,
        bos_token_id=151643, eos_token_ids=[151645], architecture="qwen3",
    ),
    "qwen3-0.6b": ModelConfig(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True,
        bos_token_id=151643, eos_token_ids=[151645], architecture="qwen3",
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_ids=[2], architecture="llama",
    ),
    # SmolVLM-256M-Instruct: SmolLM2-135M's shape with 128 added tokens, SigLIP-B/16 at 512 px,
    # pixel shuffle by 4 (64 rows a 512 x 512 tile); model_type idefics3 in its config.json
    "smolvlm-256m": ModelConfig(
        vocab_size=49280, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=False,
        bos_token_id=1, eos_token_ids=[49279], architecture="smolvlm",
        vision=VisionConfig(hidden_size=768, intermediate_size=3072, num_layers=12,
                            num_heads=12, image_size=512, patch_size=16, scale_factor=4,
                            image_token_id=49190),
    ),
    # a few-MB SmolVLM for tests and laptops: 16 rows a 32 x 32 tile
    "smolvlm-tiny": ModelConfig(
        vocab_size=49280, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=1, eos_token_ids=[49279], architecture="smolvlm",
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, image_size=32, patch_size=4, scale_factor=2,
                            image_token_id=49190),
    ),
}  # fmt: skip


def preset_config(name: str) -> ModelConfig | None:
    """A fresh copy of the preset called `name` (case-insensitive), or None."""
    config = PRESETS.get(name.lower())
    return None if config is None else copy.deepcopy(config)
