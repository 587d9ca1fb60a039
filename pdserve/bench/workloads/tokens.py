"""Prompts of an exact token length: random ids that tokenize back to what was asked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def usable_ids(tokenizer: Any) -> np.ndarray:
    """Every token id except special ones (they would change the prompt's meaning)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = len(tokenizer)
    return np.array([i for i in range(vocab) if i not in special], dtype=np.int64)


def fit_to_length(
    tokenizer: Any,
    ids: list[int],
    n: int,
    more: Callable[[int], list[int]],
    tries: int = 10,
    restarts: int = 5,
) -> tuple[str, list[int]]:
    """Text whose tokenization is `n` tokens, starting from `ids`.

    Decoding arbitrary ids and encoding again can merge or split tokens, so iterate:
    truncate what came back too long, extend with `more(k)` what came back too short;
    when that oscillates, start again from fresh ids. Returns the text and its real
    token ids (length n unless no attempt converged).
    """
    ids = list(ids[:n])
    text, got = "", []
    for _ in range(restarts):
        if len(ids) < n:
            ids += more(n - len(ids))
        for _ in range(tries):
            text = tokenizer.decode(ids)
            got = tokenizer.encode(text, add_special_tokens=False)
            if len(got) == n:
                return text, got
            ids = got[:n] if len(got) > n else got + more(n - len(got))
        ids = []  # oscillating at a seam: draw fresh ids
    return text, got


def random_prompt(
    tokenizer: Any, rng: np.random.Generator, n: int, pool: np.ndarray
) -> tuple[str, list[int]]:
    """A prompt of `n` random tokens drawn from `pool`."""

    def more(k: int) -> list[int]:
        return rng.choice(pool, size=k).tolist()

    if n <= 0:
        return "", []
    return fit_to_length(tokenizer, more(n), n, more)


def sample_lengths(
    rng: np.random.Generator, mean: int, range_ratio: float, size: int, minimum: int = 1
) -> np.ndarray:
    """Lengths uniform in [mean*(1-r), mean*(1+r)], as vLLM's --random-range-ratio."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("range ratio must be in [0, 1)")
    low = max(minimum, int(mean * (1 - range_ratio)))
    high = max(low, int(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=size)
