"""The cost of structured output: decode step time with a JSON-schema grammar on every row
vs the same requests without one, at batch 1 and 32, on the engine built directly.

Both runs sample (temperature 1, seeded), so the only difference is the grammar: the
bitmask fill (xgrammar, C++), its batched application to the logits, and the matchers'
advance in `_check_stop`. The schema needs at least 200 array items, so no request ends
within the measured steps. Also timed alone: the mask step (fill + apply) per batch.

    python3 benchmarks/bench_grammar.py [--steps 10 --rounds 3] [--device cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.config import CacheConfig, EngineArgs  # noqa: E402
from pdserve.engine.engine import Engine  # noqa: E402
from pdserve.engine.grammar import GrammarSpec  # noqa: E402
from pdserve.engine.grammar_mask import apply_grammar_masks  # noqa: E402
from pdserve.engine.outputs import EngineRequest  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402

SCHEMA = {"type": "array", "minItems": 200, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                     "age": {"type": "integer"},
                                     "role": {"enum": ["admin", "user", "guest"]}},
    "required": ["name", "age", "role"]}}
PROMPT = "List the people of a small company as JSON records: name, age, role."


def decode_steps(engine: Engine, prompt: list[int], batch: int, steps: int, grammar: bool,
                 tag: str) -> list[float]:
    """Seconds of each of `steps` decode steps with `batch` requests running."""
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA)) if grammar else None
    ids = [f"{tag}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.add_request(EngineRequest(rid, prompt, SamplingParams(
            max_tokens=steps + 50, temperature=1.0, seed=i, ignore_eos=True, grammar=spec)))
    while any(not engine.requests[r].output_token_ids for r in ids):
        engine.step()  # prefill
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    assert all(r in engine.requests for r in ids), "a request ended inside the measured steps"
    if grammar:  # the mask step alone, on the matchers' current states
        reqs = [engine.requests[r] for r in ids]
        logits = torch.randn(batch, engine.vocab_size, device=engine.device)
        mask_times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            apply_grammar_masks(logits, reqs)
            mask_times.append(time.perf_counter() - t0)
        times.append(statistics.median(mask_times))  # last: the mask step's median
    for r in ids:
        engine.abort_request(r)
    engine.step()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="decode steps timed per run")
    ap.add_argument("--rounds", type=int, default=3, help="plain/grammar runs, alternated")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/grammar_cpu.json")
    args = ap.parse_args()
    engine = Engine(EngineArgs(device=args.device,
                               cache=CacheConfig(kv_cache_memory=512 * 2**20)))
    from pdserve.models.loader import load_tokenizer

    tok = load_tokenizer(None)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = list(tok(text, add_special_tokens=False).input_ids)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        decode_steps(engine, prompt, batch, 3, True, f"warm{batch}")  # caches, allocator
        plain, guided, mask = [], [], []
        for r in range(args.rounds):  # alternated: a loaded machine drifts between runs
            plain += decode_steps(engine, prompt, batch, args.steps, False, f"p{batch}.{r}")
            guided += decode_steps(engine, prompt, batch, args.steps, True, f"g{batch}.{r}")
            mask.append(guided.pop())
        p, g = statistics.median(plain), statistics.median(guided)
        # the fastest step: on a shared machine, the one least disturbed by other work
        pmin, gmin = min(plain), min(guided)
        rows.append({"batch": batch, "plain_step_ms": p * 1e3, "grammar_step_ms": g * 1e3,
                     "ratio": g / p, "plain_min_ms": pmin * 1e3, "grammar_min_ms": gmin * 1e3,
                     "ratio_of_min": gmin / pmin, "mask_step_ms": statistics.median(mask) * 1e3,
                     "steps": args.steps * args.rounds})
    print("medians and minima of the decode steps' times; mask: fill + apply alone")
    print(f"{'batch':>5} {'plain ms':>9} {'grammar ms':>11} {'ratio':>6} {'min plain':>10} "
          f"{'min grammar':>12} {'ratio':>6} {'mask ms':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['plain_step_ms']:>9.2f} {r['grammar_step_ms']:>11.2f} "
              f"{r['ratio']:>6.3f} {r['plain_min_ms']:>10.2f} {r['grammar_min_ms']:>12.2f} "
              f"{r['ratio_of_min']:>6.3f} {r['mask_step_ms']:>8.3f}")
    result = {"device": str(engine.device), "torch_threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_average_1m": os.getloadavg()[0], "model": engine.model_name,
              "medians_of_steps": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
