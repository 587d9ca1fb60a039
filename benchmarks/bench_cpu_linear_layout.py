"""CPU: a decode step's linears of the embedded SmolLM2, in the usual [N, K] layout and K-major.

    taskset -c 1 python3 benchmarks/bench_cpu_linear_layout.py --out cpu_linear_layout.json

Every linear of the 30 layers (qkv, o, gate_up, down: each its own weight, so they stream
from memory as in a real step) and the 49152-row LM head, `F.linear(x, W)` with W row-major
[N, K] against W the transposed view of a contiguous [K, N] tensor (what pdserve stores on
CPU, pdserve/models/cpu_layout.py), at 1 / 8 / 64 rows of x, one thread, float32. Layouts
alternate in each of `--rounds` rounds; the median per layout is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--rounds", type=int, default=5)
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
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "rows": rows_out}, indent=2))


if __name__ == "__main__":
    main()
