"""`random`: prompts of random tokens with input/output lengths around the asked means."""

from __future__ import annotations

from collections.abc import Iterator
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
    return [RequestSpec(text, len(ids), n_out) for text, ids, n_out in
            random_prompts(tokenizer, rng, num, input_len, output_len, range_ratio)]


def random_prompts(tokenizer: Any, rng: np.random.Generator, num: int, input_len: int,
                   output_len: int, range_ratio: float) -> Iterator[tuple[str, list[int], int]]:
    """(text, its token ids, output length) of `num` prompts, drawn from `rng` one prompt
    at a time: a caller may draw more from `rng` between two (the image workload does)."""
    pool = usable_ids(tokenizer)
    ins = sample_lengths(rng, input_len, range_ratio, num)
    outs = sample_lengths(rng, output_len, range_ratio, num)
    for n_in, n_out in zip(ins, outs, strict=True):
        text, ids = random_prompt(tokenizer, rng, int(n_in), pool)
        yield text, ids, int(n_out)
