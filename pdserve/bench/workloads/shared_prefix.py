"""`shared-prefix`: groups of requests that share a system prompt (prefix-cache load)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pdserve.bench.request import RequestSpec
from pdserve.bench.workloads.tokens import random_prompt, usable_ids


def shared_prefix_workload(
    tokenizer: Any,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    seed: int = 0,
) -> list[RequestSpec]:
    """num_groups × prompts_per_group requests, shuffled; group g's share its system prompt."""
    rng = np.random.default_rng(seed)
    pool = usable_ids(tokenizer)
    specs = []
    for g in range(num_groups):
        system, _ = random_prompt(tokenizer, rng, system_prompt_len, pool)
        for _ in range(prompts_per_group):
            question, _ = random_prompt(tokenizer, rng, question_len, pool)
            prompt = system + "\n" + question  # newline keeps the two from merging tokens
            n = len(tokenizer.encode(prompt, add_special_tokens=False))
            specs.append(RequestSpec(prompt, n, output_len, group=g))
    order = rng.permutation(len(specs))  # interleave groups, as SGLang's generator does
    return [specs[i] for i in order]
