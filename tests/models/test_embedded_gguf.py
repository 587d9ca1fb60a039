"""The embedded SmolLM2 GGUF: our loader against transformers' own GGUF loading of the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pdserve.models.gguf_file import embedded_gguf_path, unpermute_rope_rows
from pdserve.models.loader import load_model, load_tokenizer, model_config

GREEDY_TOKENS = 64
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
]
CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="session")
def smollm():
    return load_model(None, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="session")
def reference():
    """transformers' GGUF loader dequantizes and un-permutes Q/K on its own: independent."""
    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    model.generation_config.eos_token_id = None  # generate past EOS, as our loop does
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(None)


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def test_unpermute_inverts_llama_cpp_permutation():
    weight = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    assert np.array_equal(unpermute_rope_rows(_llama_cpp_permute(weight, 3), 3), weight)


def test_config_comes_from_gguf_metadata():
    config = model_config(None)
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.rope_theta, config.tie_word_embeddings) == (49152, 1e5, True)
    assert config.eos_token_ids == [2]


def test_served_name_is_smollm2(smollm):
    assert smollm.name == "SmolLM2-135M-Instruct"
    assert smollm.source.startswith("embedded:")


def test_logits_match_transformers_gguf_loader(smollm, reference, tokenizer, paged_cache):
    ids = tokenizer("Paged attention keeps the KV cache in fixed-size blocks, so")["input_ids"]
    (ours,) = paged_cache(smollm.model).step([("a", ids)])
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].float()
    assert float((ours - expected).abs().max() / expected.abs().max()) < 1e-4


def _prompt_ids(tokenizer, which: int) -> list[int]:
    if which < len(PROMPTS):
        return tokenizer(PROMPTS[which])["input_ids"]
    return tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["plain", "code", "chat"])
def test_greedy_generation_matches_transformers(smollm, reference, tokenizer, paged_cache, which):
    ids = _prompt_ids(tokenizer, which)
    cache = paged_cache(smollm.model, block_size=16, num_blocks=16)
    logits = cache.step([("a", ids)])[0][-1]
    ours = []
    for _ in range(GREEDY_TOKENS):
        ours.append(int(logits.argmax()))
        logits = cache.step([("a", ours[-1:])])[0][-1]
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=GREEDY_TOKENS,
            pad_token_id=tokenizer.eos_token_id,
        )
    assert ours == out[0, len(ids) :].tolist()
