"""`random`: prompts of random tokens with input/output lengths around the asked means."""

from __future__ import annotations

from typing import Any

import numpy as np

from pdserve.bench.request import RequestSpec
from pdserve.bench.workloads.tokens import random_prompt, sample_lengths, usable_ids


def random_workload(
    tokenizer: Any,
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[RequestSpec]:
    """`num` requests; each prompt tokenizes back to its sampled input length."""
    rng = np.random.default_rng(seed)
    pool = usable_ids(tokenizer)
    ins = sample_lengths(rng, input_len, range_ratio, num)
    outs = sample_lengths(rng, output_len, range_ratio, num)
    specs = []
    for n_in, n_out in zip(ins, outs, strict=True):
        text, ids = random_prompt(tokenizer, rng, int(n_in), pool)
        specs.append(RequestSpec(text, len(ids), int(n_out)))
    return specs
