"""cuBLAS on the Llama-3.1-8B linear shapes: F.linear(x, W[N, K]) against x @ Wt with Wt the
contiguous [K, N] transpose, from decode (M=1) to prefill (M=8192) token counts.

    python3 benchmarks/bench_gemm_layout.py --out $OUT/gemm_layout.json

Each time is per call, replayed from a CUDA graph of 10 calls over 3 rotating weights (no L2
reuse); the ratio to the floor is weight bytes / HBM copy bandwidth at small M.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import ceilings  # noqa: E402

# (N, K, uses per decode step) of Llama-3.1-8B: qkv, o, gate_up, down, LM head
SHAPES = [(6144, 4096, 32), (4096, 4096, 32), (28672, 4096, 32), (4096, 14336, 32),
          (128256, 4096, 1)]
TOKENS = [1, 8, 32, 256, 2048, 8192]


def graph_time(fn, calls: int = 10, reps: int = 15) -> float:
    """Seconds per call of `fn` replayed from one CUDA graph of `calls` calls (median)."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def rotating(op, x: torch.Tensor, weights: list[torch.Tensor]):
    """A call of `op(x, w)` that takes the next of `weights` each time."""
    turn = [0]

    def call() -> None:
        turn[0] = (turn[0] + 1) % len(weights)
        op(x, weights[turn[0]])

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="*", default=TOKENS, help="rows of x (M)")
    ap.add_argument("--blas", choices=["default", "cublas", "cublaslt"], default="default",
                    help="torch's preferred BLAS library for these GEMMs")
    args = ap.parse_args()
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    ceil = ceilings()
    hbm = ceil["hbm_copy_GBps"] * 1e9
    rows = []
    for n, k, uses in SHAPES:
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        transposed = [w.t().contiguous() for w in weights]
        for m in args.tokens:
            if n > 100_000 and m > 256:
                continue  # the LM head only sees the sampled rows
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a = graph_time(rotating(F.linear, x, weights))
            b = graph_time(rotating(torch.mm, x, transposed))
            floor = weights[0].nbytes / hbm
            rows.append({"n": n, "k": k, "m": m, "uses_per_step": uses, "linear_us": a * 1e6,
                         "transposed_us": b * 1e6, "floor_us": floor * 1e6})
            print(f"{n:6d}x{k:5d} M={m:5d}: linear {a * 1e6:8.1f} us ({floor / a:.2f} of the "
                  f"floor)  x@Wt {b * 1e6:8.1f} us ({b / a:.3f}x)", flush=True)
        del weights, transposed
    for m in args.tokens:
        sel = [r for r in rows if r["m"] == m]
        a = sum(r["linear_us"] * r["uses_per_step"] for r in sel)
        b = sum(r["transposed_us"] * r["uses_per_step"] for r in sel)
        print(f"M={m}: a step's linears {a / 1e3:.3f} ms, pre-transposed {b / 1e3:.3f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "blas": args.blas,
                                              "ceilings": ceil, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
