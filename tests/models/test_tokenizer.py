"""The embedded tokenizer comes from the GGUF metadata and is cached after its first conversion."""

from __future__ import annotations

import time

import pytest
from transformers import PreTrainedTokenizerFast

from pdserve import switches
from pdserve.models.cache import cache_root
from pdserve.models.loader import load_tokenizer, model_config
from pdserve.switches import read_switches


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(None)


def test_is_a_fast_tokenizer(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)


def test_round_trips_text(tokenizer):
    text = "Disaggregated serving: prefill here, decode there. 123 + ünïcode ✓"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_eos_is_im_end_and_matches_the_model_config(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert model_config(None).eos_token_ids == [tokenizer.eos_token_id]


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_second_load_hits_the_cache(tokenizer):
    start = time.perf_counter()
    again = load_tokenizer(None)
    assert time.perf_counter() - start < 3.0  # the GGUF conversion takes ~10 s
    assert again.get_vocab() == tokenizer.get_vocab()
    assert any((cache_root() / "tokenizers").glob("SmolLM2-135M-Instruct*/tokenizer.json"))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    read = read_switches({"PDSERVE_CACHE_DIR": str(tmp_path)})
    monkeypatch.setattr(switches, "SWITCHES", read)
    assert cache_root() == tmp_path
