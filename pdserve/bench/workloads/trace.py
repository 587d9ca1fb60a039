"""`trace`: replay a Mooncake-format JSONL trace with its timing and shared blocks.

Each line: {"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [..]}.
Each hash id names one `block_size`-token block; requests listing the same ids share the
same prompt prefix, so a server's prefix cache sees the reuse the trace recorded.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pdserve.bench.request import RequestSpec
from pdserve.bench.workloads.tokens import random_prompt, usable_ids

MOONCAKE_BLOCK_SIZE = 512


def read_trace(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trace_workload(
    tokenizer: Any,
    path: str,
    num: int | None = None,
    seed: int = 0,
    block_size: int = MOONCAKE_BLOCK_SIZE,
    time_scale: float = 1.0,
) -> list[RequestSpec]:
    """Requests with `arrival_s` = (timestamp − first) / 1000 × time_scale."""
    rows = read_trace(path)[:num]
    pool = usable_ids(tokenizer)
    blocks: dict[int, list[int]] = {}

    def block(h: int) -> list[int]:
        if h not in blocks:  # the same id always gives the same tokens, whatever the order
            rng = np.random.default_rng([seed, h])
            blocks[h] = random_prompt(tokenizer, rng, block_size, pool)[1]
        return blocks[h]

    t_first = min((r["timestamp"] for r in rows), default=0)
    rng = np.random.default_rng(seed)
    specs = []
    for r in rows:
        n_in = int(r["input_length"])
        hash_ids = r.get("hash_ids") or []
        if hash_ids:
            ids = [t for h in hash_ids for t in block(int(h))][:n_in]
            if len(ids) < n_in:  # the trace's blocks did not cover the input: pad at random
                ids += rng.choice(pool, size=n_in - len(ids)).tolist()
            prompt = tokenizer.decode(ids)
        else:
            prompt, ids = random_prompt(tokenizer, rng, n_in, pool)
        n = len(tokenizer.encode(prompt, add_special_tokens=False))
        arrival = (r["timestamp"] - t_first) / 1000.0 * time_scale
        specs.append(RequestSpec(prompt, n, int(r["output_length"]), arrival_s=arrival))
    return specs
