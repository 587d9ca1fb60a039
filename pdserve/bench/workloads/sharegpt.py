"""`sharegpt`: real conversations from a ShareGPT-style JSON file (first turn pair)."""

from __future__ import annotations

import json
import random
from typing import Any

from pdserve.bench.request import RequestSpec

MAX_PROMPT_LEN = 1024  # vLLM's filter: drop overly long prompts ...
MAX_TOTAL_LEN = 2048  # ... and conversations, and too-short ones (< 4 tokens)


def sharegpt_workload(
    tokenizer: Any, path: str, num: int, seed: int = 0, output_len: int | None = None
) -> list[RequestSpec]:
    """`num` requests: prompt = first human turn, output length = the reply's tokens
    (or `output_len`), filtered and shuffled as vLLM's ShareGPT loader does."""
    with open(path) as f:
        data = json.load(f)
    convs = [d["conversations"] for d in data if len(d.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(convs)
    specs: list[RequestSpec] = []
    for conv in convs:
        if len(specs) == num:
            break
        prompt, reply = conv[0]["value"], conv[1]["value"]
        n_in = len(tokenizer.encode(prompt, add_special_tokens=False))
        n_out = output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        if n_in < 4 or n_out < 4 or n_in > MAX_PROMPT_LEN or n_in + n_out > MAX_TOTAL_LEN:
            continue
        specs.append(RequestSpec(prompt, n_in, n_out))
    if len(specs) < num:
        raise ValueError(f"{path}: only {len(specs)} usable conversations, {num} asked")
    return specs
