"""One long prompt arrives while N requests decode: their inter-token gaps, with and without
the ITL target (--max-step-ms), on one engine (the embedded SmolLM2 unless --model).

    python benchmarks/bench_chunking.py --decodes 8 --prompt-len 1024 --max-step-ms 100

Runs alternate off/on `--repeats` times (each with fresh random prompts: no prefix hits) and
print each run's decode gaps while the long prompt prefills (its arrival to its first token)
and its time to first token. The target is switched on the one engine's scheduler config.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import time

from pdserve.config import EngineArgs, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.outputs import EngineRequest
from pdserve.engine.sampling_params import SamplingParams


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_run(engine: Engine, args: argparse.Namespace, rng: random.Random, tag: str) -> dict:
    """N decodes get going, then the long prompt arrives; returns gaps and its TTFT."""
    vocab = engine.vocab_size
    params = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
    decodes = [f"{tag}-d{i}" for i in range(args.decodes)]
    for rid in decodes:
        engine.add_request(EngineRequest(rid, [rng.randrange(vocab) for _ in range(16)], params))
    arrivals: dict[str, list[float]] = {rid: [] for rid in decodes}
    while any(len(t) < 3 for t in arrivals.values()):  # all prefilled and decoding
        for out in engine.step():
            arrivals[out.request_id].append(time.perf_counter())
    long_id = f"{tag}-long"
    long_params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    arrived = time.perf_counter()
    engine.add_request(EngineRequest(long_id, [rng.randrange(vocab)
                                               for _ in range(args.prompt_len)], long_params))
    first_token = 0.0
    while not first_token:
        for out in engine.step():
            now = time.perf_counter()
            if out.request_id == long_id:
                first_token = now
            else:
                arrivals[out.request_id].append(now)
    for _ in range(3):  # the gap that ends after the prompt's last chunk
        for out in engine.step():
            arrivals[out.request_id].append(time.perf_counter())
    for rid in decodes:
        engine.abort_request(rid)
    engine.step()
    gaps = [b - a for t in arrivals.values() for a, b in zip(t, t[1:])
            if b > arrived and a < first_token]  # gaps that overlap the prompt's prefill
    steady = [b - a for t in arrivals.values() for a, b in zip(t, t[1:])
              if b <= arrived or a >= first_token]  # decode-only steps: the floor
    return {"max": max(gaps), "p99": percentile(gaps, 0.99), "median": statistics.median(gaps),
            "ttft": first_token - arrived, "steady": statistics.median(steady)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--decodes", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--max-step-ms", type=float, default=100.0)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="write the runs here as JSON")
    args = p.parse_args()
    sched = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                            max_step_ms=args.max_step_ms, max_model_len=8192)
    engine = Engine(EngineArgs(model=args.model, device=args.device, scheduler=sched))
    print(f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, device "
          f"{engine.device} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), loadavg {os.getloadavg()}")
    print(f"step-time model: {engine.scheduler.step_time}")
    rng = random.Random(0)
    results: dict[str, list[dict]] = {"off": [], "on": []}
    for i in range(args.repeats):
        for mode in ("off", "on"):
            sched.max_step_ms = args.max_step_ms if mode == "on" else None
            results[mode].append(one_run(engine, args, rng, f"{mode}{i}"))
            r = results[mode][-1]
            print(f"run {i} target {mode:>3}: decode gap max {r['max'] * 1e3:7.1f} ms, p99 "
                  f"{r['p99'] * 1e3:7.1f} ms, median {r['median'] * 1e3:6.1f} ms; long "
                  f"prompt TTFT {r['ttft'] * 1e3:7.1f} ms; decode-only step "
                  f"{r['steady'] * 1e3:6.1f} ms", flush=True)
    print(f"loadavg after {os.getloadavg()}")
    print("| target | decode gap max (ms) | p99 (ms) | median (ms) | long TTFT (ms) | "
          "decode-only step (ms) |")
    print("|---|---|---|---|---|---|")
    for mode, runs in results.items():
        label = f"{args.max_step_ms:g} ms" if mode == "on" else "off"
        cells = [statistics.median(r[k] for r in runs) * 1e3
                 for k in ("max", "p99", "median", "ttft", "steady")]
        print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": str(engine.device),
                       "loadavg_after": os.getloadavg(),
                       "step_time_model": engine.scheduler.step_time.to_dict(),
                       "runs": results}, f, indent=1)

if __name__ == "__main__":
    main()
