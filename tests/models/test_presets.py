"""Random-weight presets carry the real architectures' numbers and run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.models.loader import load_model, load_tokenizer, model_config, serving_tokenizer
from pdserve.models.presets import PRESETS

REQUIRED = ["llama-3.1-8b", "qwen2.5-7b", "qwen3-8b", "llama-3.1-70b", "smollm2-135m"]


def test_required_presets_exist():
    assert set(REQUIRED) <= set(PRESETS)


def test_llama_3_1_8b_is_the_real_config():
    config = model_config("llama-3.1-8b")
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (32, 4096, 14336)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (32, 8, 128)
    assert (config.vocab_size, config.rope_theta) == (128256, 500000.0)
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_scaling["factor"] == 8.0
    assert not config.tie_word_embeddings


def test_llama_3_1_70b_is_the_real_config():
    config = model_config("Llama-3.1-70B")  # names are case-insensitive
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        80, 8192, 64, 8,
    )  # fmt: skip
    assert config.intermediate_size == 28672


def test_qwen2_5_7b_has_qkv_bias():
    config = model_config("qwen2.5-7b")
    assert config.attention_bias and config.architecture == "qwen2"
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        28, 3584, 28, 4,
    )  # fmt: skip
    assert (config.vocab_size, config.rope_theta) == (152064, 1e6)


def test_qwen3_8b_has_qk_norm():
    config = model_config("qwen3-8b")
    assert config.qk_norm and not config.attention_bias and config.architecture == "qwen3"
    assert (config.num_layers, config.intermediate_size, config.vocab_size) == (36, 12288, 151936)


def test_smollm2_preset_matches_the_embedded_model():
    preset, embedded = model_config("smollm2-135m"), model_config(None)
    assert preset.rms_norm_eps == pytest.approx(embedded.rms_norm_eps)  # GGUF stores a float32
    assert dataclasses.replace(preset, rms_norm_eps=embedded.rms_norm_eps) == embedded


def test_presets_are_copies():
    model_config("qwen3-8b").num_layers = 1
    assert model_config("qwen3-8b").num_layers == 36


def test_presets_use_the_embedded_tokenizer():
    assert load_tokenizer("qwen3-8b").eos_token == "<|im_end|>"


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        model_config("no-such-model")


def test_smollm2_random_weights_run_in_bfloat16(paged_cache):
    loaded = load_model("smollm2-135m", torch.bfloat16, torch.device("cpu"), seed=1)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    (logits,) = paged_cache(loaded.model).step([("a", [1, 2, 3, 4, 5, 6])])
    assert logits.shape == (6, 49152) and logits.dtype == torch.float32
    assert bool(torch.isfinite(logits).all()) and float(logits.std()) > 0


def test_every_id_of_a_preset_decodes_to_text():
    # random weights sample ids past the embedded tokenizer's 49,152: each must reach a
    # stream as text, or a client sees gaps of several steps between tokens
    tok = serving_tokenizer("llama-3.1-8b")
    assert len(tok) == model_config("llama-3.1-8b").vocab_size == 128256
    assert tok.decode([128255]) == "<|id_128255|>"
    assert tok.decode([49151, 49152]).endswith("<|id_49152|>")
    assert tok.encode("Hello world", add_special_tokens=False) == \
        load_tokenizer(None).encode("Hello world", add_special_tokens=False)
