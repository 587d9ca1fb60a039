"""The embedded SmolLM2 exported as a HF folder: transformers loads it and agrees with pdserve."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve.models.export_hf import export_hf_folder
from pdserve.models.loader import load_model, load_tokenizer, model_config

GREEDY_TOKENS = 24
CHAT = [{"role": "user", "content": "Name three rivers in Europe."}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return export_hf_folder(tmp_path_factory.mktemp("smollm2-hf"))


def test_folder_config_is_the_gguf_config(folder):
    assert model_config(str(folder)) == model_config(None)


def test_tokenizer_and_chat_template_survive_the_export(folder):
    ours, exported = load_tokenizer(None), AutoTokenizer.from_pretrained(folder)
    for tokenizer in (ours, exported):
        assert tokenizer.chat_template
    prompt = dict(add_generation_prompt=True, tokenize=False)
    assert exported.apply_chat_template(CHAT, **prompt) == ours.apply_chat_template(CHAT, **prompt)
    text = "Paged attention, 42 blocks"
    assert exported(text)["input_ids"] == ours(text)["input_ids"]


def test_transformers_greedy_tokens_match_pdserve_on_the_folder(folder, paged_cache):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=GREEDY_TOKENS,
            eos_token_id=None,  # generate past EOS, as the loop below does
            pad_token_id=tokenizer.eos_token_id,
        )
    served = load_model(str(folder), torch.float32, torch.device("cpu"))
    cache = paged_cache(served.model, block_size=16, num_blocks=16)
    logits = cache.step([("a", ids)])[0][-1]
    ours = []
    for _ in range(GREEDY_TOKENS):
        ours.append(int(logits.argmax()))
        logits = cache.step([("a", ours[-1:])])[0][-1]
    assert ours == out[0, len(ids) :].tolist()
