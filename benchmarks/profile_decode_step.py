"""Where a decode step's time goes: GPU time per kernel, and the idle time between kernels.

    python3 benchmarks/profile_decode_step.py --model llama-3.1-8b --batch 1 --context 1024

Runs the engine as bench_engine.py does (CUDA graphs, async scheduling unless
--no-async-scheduling), profiles `--steps` decode steps with torch.profiler and prints the
kernels by GPU time per step, the device's busy and idle time per step, and (with --out) the
same as JSON. Kernel names are cuBLAS's and ours; a GEMV shows up as an `nvjet_*` kernel.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import (  # noqa: E402
    random_prompt,
    steady_step_time,
    step_until_decoding,
)
from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig  # noqa: E402
from pdserve.engine.engine import Engine  # noqa: E402
from pdserve.engine.outputs import EngineRequest  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402

DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def device_events(prof: profile) -> list[dict]:
    """The profile's device-side events (kernels, copies, sets), in time order."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    return sorted((e for e in events if e.get("cat") in DEVICE_EVENTS), key=lambda e: e["ts"])


def summarize(events: list[dict], steps: int) -> dict:
    """GPU time per kernel name, and busy/idle time, all per step, in microseconds."""
    per_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        per_kernel[e["name"]][0] += e["dur"] / steps
        per_kernel[e["name"]][1] += 1 / steps
    span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
    busy = sum(e["dur"] for e in events)
    kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
    return {"span_us": span / steps, "busy_us": busy / steps, "idle_us": (span - busy) / steps,
            "kernels": [{"name": k, "us": round(us, 2), "calls": round(n, 2)}
                        for k, (us, n) in kernels]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="decode steps profiled")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--out", default=None, help="write the summary here as JSON")
    args = ap.parse_args()
    engine = Engine(EngineArgs(
        model=args.model, dtype="bfloat16", device="cuda", async_scheduling=args.async_scheduling,
        cache=CacheConfig(gpu_memory_utilization=0.9),
        scheduler=SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=max(args.batch, 8),
                                  max_model_len=args.context + 512)))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(EngineRequest(f"r{i}", random_prompt(rng, args.context,
                                                                engine.vocab_size), params))
    step_until_decoding(engine, args.batch)
    step_ms = steady_step_time(engine.step, windows=3) * 1e3
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    summary = {"model": args.model, "batch": args.batch, "context": args.context,
               "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
               "async_scheduling": engine.loop.depth == 1, "step_ms": step_ms,
               **summarize(device_events(prof), args.steps)}
    print(f"step {step_ms:.3f} ms unprofiled; profiled: busy {summary['busy_us']:.0f} us, "
          f"idle {summary['idle_us']:.0f} us a step")
    for k in summary["kernels"][:25]:
        print(f"{k['us']:9.1f} us  x{k['calls']:5.1f}  {k['name'][:100]}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
