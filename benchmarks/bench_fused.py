"""Time pdserve's fused elementwise Triton kernels against the eager PyTorch ops they replace.

Llama-3.1-8B shapes (hidden 4096, 32 query heads, 8 KV heads, head dim 128, intermediate
14336), bf16, at T = 1 (batch-1 decode), 256 and 8192 tokens. Per kernel:

- rmsnorm            vs pdserve's `RMSNorm` module (pow / mean / rsqrt / mul ...)
- fused_add_rmsnorm  vs `x + residual` then `RMSNorm`
- apply_rope_        vs pdserve's `RotaryEmbedding` (cos/sin from positions, rotate-half, cat)
- silu_and_mul       vs `F.silu(gate) * up` on the packed gate_up

Each is timed two ways, both with CUDA events and the median of many runs:
  graph: 16 back-to-back calls captured in one CUDA graph, replayed after an L2 flush, time
         per call (how the decode step runs them: inputs are L2-warm after the first call);
  eager: one call after an L2 flush (launch overhead included, inputs cold).
Each time is also given as a ratio to its HBM floor: the fused kernel's bytes read + written
divided by the copy bandwidth measured in this run. A bf16 check of fused against eager (max
abs difference and share of bit-identical elements) comes first.

    python3 benchmarks/bench_fused.py          (prints a table; JSON to $OUT when set)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.kernels.rope_table import rope_cos_sin_cache  # noqa: E402
from pdserve.kernels.triton_activation import silu_and_mul  # noqa: E402
from pdserve.kernels.triton_rmsnorm import fused_add_rmsnorm, rmsnorm  # noqa: E402
from pdserve.kernels.triton_rope import apply_rope_  # noqa: E402
from pdserve.models.layers import RMSNorm, RotaryEmbedding  # noqa: E402

HIDDEN, HEADS, KV_HEADS, DIM, INTER = 4096, 32, 8, 128, 14336
THETA, MAX_POS, EPS = 500000.0, 131072, 1e-5
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
TOKENS = (1, 256, 8192)
DTYPE = torch.bfloat16
DEV = torch.device("cuda")
GRAPH_CALLS = 16  # calls captured per graph, so the replay's own launch cost is amortized
_flush = None  # a buffer larger than L2, rewritten before each timed run


def _flush_l2() -> None:
    global _flush
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    _flush.zero_()


def _median_time(run: Callable[[], None], reps: int) -> float:
    """Median seconds of `run` over `reps` runs, each after an L2 flush, timed with events."""
    times = []
    for _ in range(reps):
        _flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_eager(fn: Callable[[], object], reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    return _median_time(fn, reps)


def time_graph(fn: Callable[[], object], reps: int = 30) -> float:
    """Seconds per call of `fn` replayed from a CUDA graph of GRAPH_CALLS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return _median_time(graph.replay, reps) / GRAPH_CALLS


def copy_bandwidth() -> float:
    """HBM copy bandwidth in bytes/s, read + written, as bench_attention measures it."""
    n = 1 << 30
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    return 2 * n / time_eager(lambda: b.copy_(a), 20)


def rope_inputs(tokens: int):
    """q, k (views of a packed qkv), positions, the eager RotaryEmbedding and the bf16 cache."""
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * DIM, device=DEV, dtype=DTYPE)
    q, k, _ = qkv.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], -1)
    q, k = q.view(tokens, HEADS, DIM), k.view(tokens, KV_HEADS, DIM)
    positions = torch.randint(0, 8192, (tokens,), device=DEV)
    with torch.device(DEV):
        rotary = RotaryEmbedding(DIM, THETA, LLAMA31_ROPE)
    cache = rope_cos_sin_cache(rotary.inv_freq, MAX_POS, DTYPE)  # model dtype: HF's rounding
    return q, k, positions, rotary, cache


def cases(tokens: int) -> dict[str, tuple[Callable, Callable, int]]:
    """name -> (fused call, eager call, bytes the fused kernel must move) at `tokens` tokens."""
    x = torch.randn(tokens, HIDDEN, device=DEV, dtype=DTYPE)
    residual = torch.randn_like(x)
    norm = RMSNorm(HIDDEN, EPS).to(DEV, DTYPE)
    norm.weight.data.copy_(1 + 0.1 * torch.randn(HIDDEN, device=DEV))
    rows = tokens * HIDDEN * 2  # one bf16 [T, hidden] tensor

    q, k, positions, rotary, cache = rope_inputs(tokens)
    rope_bytes = 2 * tokens * (HEADS + KV_HEADS) * DIM * 2 + tokens * (DIM * 2 + 8)

    gate_up = torch.randn(tokens, 2 * INTER, device=DEV, dtype=DTYPE)
    return {
        "rmsnorm": (lambda: rmsnorm(x, norm.weight, EPS), lambda: norm(x), 2 * rows + HIDDEN * 2),
        "fused_add_rmsnorm": (
            lambda: fused_add_rmsnorm(x, residual, norm.weight, EPS),
            lambda: norm(x + residual),
            4 * rows + HIDDEN * 2,
        ),
        "rope": (
            lambda: apply_rope_(q, k, positions, cache),
            lambda: rotary(positions, q, k),
            rope_bytes,
        ),
        "silu_and_mul": (
            lambda: silu_and_mul(gate_up),
            lambda: F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:],
            tokens * INTER * 3 * 2,
        ),
    }


def agreement(fused: torch.Tensor, eager: torch.Tensor) -> dict:
    return {
        "max_abs_diff": (fused.float() - eager.float()).abs().max().item(),
        "identical_share": round((fused == eager).float().mean().item(), 5),
    }


def check_bf16(tokens: int = 256) -> dict:
    """Fused vs eager outputs in bf16 on the same inputs, at `tokens` tokens."""
    c = cases(tokens)
    out = {}
    for name in ("rmsnorm", "silu_and_mul"):
        out[name] = agreement(c[name][0](), c[name][1]())
    normed, _ = c["fused_add_rmsnorm"][0]()
    out["fused_add_rmsnorm"] = agreement(normed, c["fused_add_rmsnorm"][1]())
    q, k, positions, rotary, cache = rope_inputs(tokens)
    q_ref, k_ref = rotary(positions, q, k)  # eager first: it leaves q and k as they are
    apply_rope_(q, k, positions, cache)
    out["rope"] = agreement(
        torch.cat([q.flatten(), k.flatten()]), torch.cat([q_ref.flatten(), k_ref.flatten()])
    )
    return out


def main() -> None:
    bandwidth = copy_bandwidth()
    print(f"HBM copy bandwidth: {bandwidth / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}")
    results = {"device": torch.cuda.get_device_name(), "hbm_copy_GBps": bandwidth / 1e9}
    results["bf16_agreement_T256"] = check_bf16()
    for name, stats in results["bf16_agreement_T256"].items():
        print(
            f"  bf16 {name:18s} max|diff| {stats['max_abs_diff']:.3g}  "
            f"identical {stats['identical_share']:.2%}"
        )
    header = (
        f"{'kernel':18s} {'T':>5s} {'floor us':>9s} {'fused us':>9s} {'eager us':>9s}"
        f" {'fused/fl':>9s} {'eager/fl':>9s} {'speedup':>8s}"
        f" {'fused1 us':>9s} {'eager1 us':>9s}"
    )
    print(f"\n(graph replay, per call; the last two columns: one eager call, L2 cold)\n{header}")
    rows = []
    for tokens in TOKENS:
        for name, (fused, eager, nbytes) in cases(tokens).items():
            floor = nbytes / bandwidth
            row = {
                "kernel": name,
                "tokens": tokens,
                "bytes": nbytes,
                "floor_us": floor * 1e6,
                "fused_graph_us": time_graph(fused) * 1e6,
                "eager_graph_us": time_graph(eager) * 1e6,
                "fused_eager_us": time_eager(fused) * 1e6,
                "eager_eager_us": time_eager(eager) * 1e6,
            }
            row["fused_over_floor"] = row["fused_graph_us"] / row["floor_us"]
            row["eager_over_floor"] = row["eager_graph_us"] / row["floor_us"]
            rows.append(row)
            print(
                f"{name:18s} {tokens:5d} {row['floor_us']:9.2f} {row['fused_graph_us']:9.2f}"
                f" {row['eager_graph_us']:9.2f} {row['fused_over_floor']:9.1f}"
                f" {row['eager_over_floor']:9.1f}"
                f" {row['eager_graph_us'] / row['fused_graph_us']:7.2f}x"
                f" {row['fused_eager_us']:9.2f} {row['eager_eager_us']:9.2f}"
            )
    results["rows"] = rows
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_fused.json"
        path.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
