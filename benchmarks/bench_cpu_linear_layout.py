"""CPU: a decode step's linears of the embedded SmolLM2, in the usual [N, K] layout and K-major.

    taskset -c 1 python3 benchmarks/bench_cpu_linear_layout.py --out cpu_linear_layout.json

Every linear of the 30 layers (qkv, o, gate_up, down: each its own weight, so they stream
from memory as in a real step) and the 49152-row LM head, `F.linear(x, W)` with W row-major
[N, K] against W the transposed view of a contiguous [K, N] tensor (what pdserve stores on
CPU, pdserve/models/cpu_layout.py), at 1 / 8 / 64 rows of x, one thread, float32. Layouts
alternate in each of `--rounds` rounds; the median per layout is reported.
`--engine-batches 1 8 16` also times whole decode steps of the engine (256-token contexts),
swapping the model's weights between the two layouts in turn within one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pdserve, for --engine-batches

HIDDEN, INTERMEDIATE, QKV, LAYERS, VOCAB = 576, 1536, 960, 30, 49152
SHAPES = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]


def step_ms(weights: list[torch.Tensor], rows: int, reps: int = 3) -> float:
    xs = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}
    for w in weights:  # warm-up
        F.linear(xs[w.shape[1]], w)
    start = time.perf_counter()
    for _ in range(reps):
        for w in weights:
            F.linear(xs[w.shape[1]], w)
    return (time.perf_counter() - start) / reps * 1e3


def engine_step_ms(batch: int, windows: int = 8, steps: int = 8) -> dict:
    """Median decode step of the engine, each layout in turn (windows of `steps` steps)."""
    import random

    from benchmarks.bench_engine import step_until_decoding
    from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig
    from pdserve.engine.engine import Engine
    from pdserve.engine.outputs import EngineRequest
    from pdserve.engine.sampling_params import SamplingParams

    engine = Engine(EngineArgs(model=None, device="cpu", dtype="float32", cpu_threads=1,
                               cache=CacheConfig(kv_cache_memory=256 * 2**20),
                               scheduler=SchedulerConfig(max_num_seqs=max(batch, 8),
                                                         max_model_len=4096)))
    params = [p for p in engine.runner.model.parameters() if p.dim() == 2]
    layouts = {"k_major": [p.data for p in params],
               "usual": [p.data.contiguous() for p in params]}
    rng = random.Random(0)
    for i in range(batch):
        engine.add_request(EngineRequest(
            f"r{i}", [rng.randrange(100, 40000) for _ in range(256)],
            SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)))
    step_until_decoding(engine, batch)
    times: dict[str, list[float]] = {"usual": [], "k_major": []}
    for w in range(windows):
        for name in ("usual", "k_major")[:: 1 if w % 2 == 0 else -1]:
            for p, data in zip(params, layouts[name]):
                p.data = data
            engine.step()
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    engine.close()
    return {"batch": batch, "usual_ms": statistics.median(times["usual"]),
            "k_major_ms": statistics.median(times["k_major"]), "windows_ms": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engine-batches", type=int, nargs="*", default=[],
                    help="also time the engine's decode step at these batch sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    usual = {"layers": [torch.randn(n, k) for _ in range(LAYERS) for n, k in SHAPES],
             "lm_head": [torch.randn(VOCAB, HIDDEN)]}
    k_major = {part: [w.t().contiguous().t() for w in ws] for part, ws in usual.items()}
    rows_out = []
    for rows in args.rows:
        for part in usual:
            times: dict[str, list[float]] = {"usual": [], "k_major": []}
            for r in range(args.rounds):
                order = [("usual", usual), ("k_major", k_major)][:: 1 if r % 2 == 0 else -1]
                for name, layout in order:
                    times[name].append(step_ms(layout[part], rows))
            a, b = statistics.median(times["usual"]), statistics.median(times["k_major"])
            rows_out.append({"rows": rows, "part": part, "usual_ms": a, "k_major_ms": b,
                             "speedup": a / b})
            print(f"{rows:3d} rows, {part:8s}: usual {a:7.2f} ms, K-major {b:7.2f} ms "
                  f"({a / b:.2f}x)", flush=True)
    engine_rows = []
    for batch in args.engine_batches:
        r = engine_step_ms(batch)
        engine_rows.append(r)
        print(f"engine decode step, {batch} sequences: usual {r['usual_ms']:.1f} ms, K-major "
              f"{r['k_major_ms']:.1f} ms", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "rows": rows_out, "engine": engine_rows}, indent=2))


if __name__ == "__main__":
    main()
