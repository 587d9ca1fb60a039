"""Greedy output through the HTTP API equals transformers' greedy `generate` of the same
GGUF weights, token for token, for 64 tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

NUM_TOKENS = 64
COMPLETION_PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
CHAT_QUESTION = "Name three uses of copper and explain each briefly."


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    from pdserve.models.gguf_file import embedded_gguf_path

    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the server side runs with ignore_eos
    return model


def hf_greedy(model, prompt_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def http_tokens(client, path: str, body: dict) -> tuple[list[int], dict]:
    """The generated token ids (from logprobs named by id) and the response body."""
    chat = "messages" in body
    logprobs = {"logprobs": True, "top_logprobs": 0} if chat else {"logprobs": 0}
    resp = client.post(path, json={**body, **logprobs, "temperature": 0.0,
                                   "max_tokens": NUM_TOKENS, "ignore_eos": True,
                                   "return_tokens_as_token_ids": True})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    lp = out["choices"][0]["logprobs"]
    names = [t["token"] for t in lp["content"]] if chat else lp["tokens"]
    return [int(n.removeprefix("token_id:")) for n in names], out


def test_greedy_http_output_equals_transformers_generate(client, tokenizer, hf_model):
    chat_messages = [{"role": "user", "content": CHAT_QUESTION}]
    chat_text = tokenizer.apply_chat_template(chat_messages, add_generation_prompt=True,
                                              tokenize=False)
    prompts = [tokenizer(p).input_ids for p in COMPLETION_PROMPTS]
    chat_ids = tokenizer(chat_text, add_special_tokens=False).input_ids
    with ThreadPoolExecutor(3) as pool:  # the server batches them while transformers runs
        futures = [pool.submit(http_tokens, client, "/v1/completions", {"prompt": ids})
                   for ids in prompts]
        futures.append(pool.submit(http_tokens, client, "/v1/chat/completions",
                                   {"messages": chat_messages}))
        expected = [hf_greedy(hf_model, ids) for ids in [*prompts, chat_ids]]
        results = [f.result() for f in futures]
    for (got, body), want in zip(results, expected):
        assert body["usage"]["completion_tokens"] == NUM_TOKENS
        assert got == want, (tokenizer.decode(got), tokenizer.decode(want))
