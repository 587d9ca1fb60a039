"""`code`: a code-assistant mix — inline completion, code explanation, function generation.

Each kind has its own length distributions and TTFT target (carried per request into
goodput): inline completion is long context, a few tokens out, and must feel instant;
explanation reads code and writes prose; generation reads a short ask and writes code.
Prompt text is real Python (windows of the standard library's own source).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdserve.bench.request import RequestSpec
from pdserve.bench.workloads.tokens import fit_to_length

_CORPUS_MODULES = ("argparse", "dataclasses", "textwrap", "heapq", "functools", "shutil")


@dataclass(frozen=True)
class CodeTask:
    """One kind of code-assistant request."""

    name: str
    weight: float  # share of the mix
    input_mean: int  # tokens; lengths are lognormal around the mean
    output_mean: int
    ttft_target_ms: float
    instruction: str


CODE_TASKS = (
    CodeTask("inline-completion", 0.6, 1024, 32, 200.0, "Complete the code at the cursor.\n"),
    CodeTask("code-explanation", 0.2, 512, 384, 1000.0, "Explain what this code does.\n"),
    CodeTask("function-generation", 0.2, 128, 256, 500.0, "Write a Python function like:\n"),
)

_SIGMA = 0.4  # spread of the lognormal lengths


def _corpus_ids(tokenizer: Any) -> list[int]:
    source = "\n".join(inspect.getsource(__import__(m)) for m in _CORPUS_MODULES)
    return tokenizer.encode(source, add_special_tokens=False)


def _lognormal_len(rng: np.random.Generator, mean: float, lo: int = 4) -> int:
    mu = np.log(mean) - _SIGMA**2 / 2  # so that the mean is `mean`
    return max(lo, int(round(rng.lognormal(mu, _SIGMA))))


def code_workload(
    tokenizer: Any,
    num: int,
    seed: int = 0,
    length_scale: float = 1.0,
    tasks: tuple[CodeTask, ...] = CODE_TASKS,
) -> list[RequestSpec]:
    """`num` requests drawn from `tasks` by weight; `length_scale` shrinks lengths (CPU)."""
    rng = np.random.default_rng(seed)
    corpus = _corpus_ids(tokenizer)
    weights = np.array([t.weight for t in tasks]) / sum(t.weight for t in tasks)
    specs = []
    for k in rng.choice(len(tasks), size=num, p=weights):
        task = tasks[int(k)]
        n_in = _lognormal_len(rng, task.input_mean * length_scale)
        n_out = _lognormal_len(rng, task.output_mean * length_scale, lo=1)
        head = tokenizer.encode(task.instruction, add_special_tokens=False)
        body_len = max(1, n_in - len(head))
        start = int(rng.integers(0, max(1, len(corpus) - body_len)))
        window = corpus[start : start + body_len]
        cursor = [start + body_len]

        def more(n: int, cursor: list[int] = cursor) -> list[int]:
            ids = [corpus[(cursor[0] + i) % len(corpus)] for i in range(n)]
            cursor[0] += n
            return ids

        body, _ = fit_to_length(tokenizer, window, body_len, more)
        prompt = task.instruction + body
        n = len(tokenizer.encode(prompt, add_special_tokens=False))
        specs.append(
            RequestSpec(prompt, n, n_out, category=task.name, slo_ms={"ttft": task.ttft_target_ms})
        )
    return specs
