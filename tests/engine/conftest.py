"""A tiny random Llama checkpoint whose heads split over tensor-parallel ranks."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LAYERS, TINY_MAX_LEN = 2, 128


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A HF folder: 4 q heads and 2 KV heads (TP=2 gives each rank one KV head)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=TINY_MAX_LEN)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.1)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return str(path)
