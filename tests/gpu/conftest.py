"""A Llama-3-like checkpoint with random weights for the GPU tests (made once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def gpu_llama(tmp_path_factory) -> str:
    """GQA 4:1, head dim 128, llama3 rope, 6 layers; with the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
        initializer_range=0.05,
    )
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory) -> str:
    """The embedded model's tokenizer as a folder (the GPU machine carries a copy in .device)."""
    carried = REPO / ".device" / "tokenizer"
    if (carried / "tokenizer.json").is_file():
        return str(carried)
    from pdserve.models.loader import load_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(None).save_pretrained(path)
    return str(path)
