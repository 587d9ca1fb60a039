"""`multi-turn`: conversations whose every turn's prompt extends the previous one (the
history, then a new user message), conversations interleaved turn by turn, as a chat
service sees them. The history is the earlier prompts, not the model's answers: prompts are
built ahead of the run, and prefix reuse is the same either way."""

from __future__ import annotations

from typing import Any

import numpy as np

from pdserve.bench.request import RequestSpec
from pdserve.bench.workloads.tokens import random_prompt, usable_ids


def system_prompts(tokenizer: Any, num_conversations: int, system_prompt_len: int,
                   seed: int = 0) -> list[str]:
    """Each conversation's system prompt, the text its every turn begins with (a benchmark
    warms these to measure a steady state, where no system prompt is new)."""
    return _system_prompts(tokenizer, np.random.default_rng(seed), usable_ids(tokenizer),
                           num_conversations, system_prompt_len)


def _system_prompts(tokenizer: Any, rng: np.random.Generator, pool: np.ndarray,
                    num_conversations: int, system_prompt_len: int) -> list[str]:
    return [random_prompt(tokenizer, rng, system_prompt_len, pool)[0]
            for _ in range(num_conversations)]


def multi_turn_workload(
    tokenizer: Any,
    num_conversations: int,
    turns: int,
    system_prompt_len: int,
    turn_len: int,
    output_len: int,
    seed: int = 0,
) -> list[RequestSpec]:
    """num_conversations × turns requests; turn t of every conversation before turn t+1 of
    any, conversations shuffled within a turn; `group` is the conversation."""
    rng = np.random.default_rng(seed)
    pool = usable_ids(tokenizer)
    prompts = _system_prompts(tokenizer, rng, pool, num_conversations, system_prompt_len)
    specs = []
    for _ in range(turns):
        turn = []
        for c in range(num_conversations):
            message, _ = random_prompt(tokenizer, rng, turn_len, pool)
            prompts[c] = prompts[c] + "\n" + message  # newline: no token merges across turns
            n = len(tokenizer.encode(prompts[c], add_special_tokens=False))
            turn.append(RequestSpec(prompts[c], n, output_len, group=c, category=""))
        specs += [turn[i] for i in rng.permutation(len(turn))]
    return specs
