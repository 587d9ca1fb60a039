"""The Triton GEMV against cuBLAS (F.linear) on Llama-3.1-8B's linear shapes at 1..8 rows.

    python3 benchmarks/bench_gemv.py --out $OUT/gemv.json

For each shape and row count it sweeps tiles (BLOCK_N, BLOCK_K, num_warps, num_stages, FMA
or tl.dot) at the split-K `auto_split` picks, then split-K for the best tile, and the
default; it reports the best config, its time, cuBLAS's time and the weight-read floor
(weight bytes / HBM copy bandwidth). Times are per call, replayed from a CUDA graph of 10
calls over 3 rotating weights (no L2 reuse), as benchmarks/bench_gemm_layout.py times them.
Every config's
output is checked against F.linear first; odd shapes (masks) against float64.

    python3 benchmarks/bench_gemv.py --fused --out $OUT/fused_gemv.json

times instead, at one row, the fused GEMVs of triton_fused_gemv against the kernels they
replace (fused_add_rmsnorm + gemv before qkv and gate_up, silu_and_mul + gemv for down, each
at the model's default configs) for BLOCK_N 2, 4, 8, each also against the plain GEMV at the
same tile; all as ratios to the weight-read floor.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import ceilings  # noqa: E402
from benchmarks.bench_gemm_layout import graph_time, rotating  # noqa: E402
from pdserve.kernels.triton_activation import silu_and_mul  # noqa: E402
from pdserve.kernels.triton_fused_gemv import add_rmsnorm_gemv, silu_mul_gemv  # noqa: E402
from pdserve.kernels.triton_gemv import GemvConfig, auto_split, default_config, gemv  # noqa: E402
from pdserve.kernels.triton_rmsnorm import fused_add_rmsnorm  # noqa: E402

# (name, N, K, uses per decode step) of Llama-3.1-8B
SHAPES = [("qkv", 6144, 4096, 32), ("o_proj", 4096, 4096, 32), ("gate_up", 28672, 4096, 32),
          ("down", 4096, 14336, 32), ("lm_head", 128256, 4096, 1)]
ROWS = [1, 2, 4, 8]
SPLITS = [1, 2, 4, 8]
MAX_REL_ERR = 2e-2  # bf16 output against cuBLAS's bf16 output
# --fused: (name, N, K, what precedes or follows the linear) at one row, 32 uses a step each
FUSED_SHAPES = [("qkv", 6144, 4096, "norm"), ("gate_up", 28672, 4096, "norm"),
                ("down", 4096, 14336, "silu")]
FUSED_TILES = [GemvConfig(n, 1024, num_warps=w) for n in (2, 4, 8) for w in (4, 8)]


def tiles(m: int) -> list[GemvConfig]:
    """FMA tiles for 1..2 rows, tl.dot tiles from 2 rows: the neighbourhood of the defaults."""
    fma = [(1, 1024, 2, 3), (2, 512, 2, 3), (2, 1024, 4, 3), (2, 2048, 4, 3), (4, 512, 4, 3),
           (4, 1024, 4, 3), (8, 1024, 8, 3)]
    dot = [(64, 128, 4, 5), (64, 256, 4, 3), (64, 512, 4, 3), (128, 128, 4, 4), (128, 256, 8, 3)]
    out = [GemvConfig(n, k, num_warps=w, num_stages=s) for n, k, w, s in fma if m <= 2]
    out += [GemvConfig(n, k, num_warps=w, use_dot=True, num_stages=s) for n, k, w, s in dot
            if m >= 2]
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def time_config(cfg: GemvConfig, x: torch.Tensor, weights: list[torch.Tensor]) -> dict:
    """Seconds per call of gemv under `cfg`, or why it was not timed."""
    try:
        err = rel_err(gemv(x, weights[0], cfg), F.linear(x, weights[0]))
    except Exception as exc:  # a tile past the register or shared-memory budget
        return {"config": asdict(cfg), "error": f"{type(exc).__name__}: {exc}"[:200]}
    if not err < MAX_REL_ERR:
        return {"config": asdict(cfg), "error": f"relative error {err:.3g}"}
    seconds = graph_time(rotating(lambda a, w: gemv(a, w, cfg), x, weights))
    return {"config": asdict(cfg), "us": seconds * 1e6, "rel_err": err}


def sweep(m: int, n: int, k: int, weights: list[torch.Tensor], sms: int) -> list[dict]:
    """Tiles at their auto split, then every split of the best tile."""
    x = torch.randn(m, k, device="cuda", dtype=weights[0].dtype)
    tried = {}
    for tile in tiles(m):
        cfg = replace(tile, split_k=auto_split(triton.cdiv(n, tile.block_n), k, tile.block_k, sms))
        tried[cfg] = time_config(cfg, x, weights)
    best = min((r for r in tried.values() if "us" in r), key=lambda r: r["us"])
    for split in SPLITS:
        cfg = replace(GemvConfig(**best["config"]), split_k=split)
        if cfg not in tried and k // split >= cfg.block_k:
            tried[cfg] = time_config(cfg, x, weights)
    default = default_config(m, n, k, x.dtype, sms)
    if default not in tried:
        tried[default] = time_config(default, x, weights)
    tried[default]["default"] = True
    return list(tried.values())


def check_odd_shapes() -> list[str]:
    """Masked tiles (N, K multiples of no block) and split-K against float64, on the GPU."""
    failures = []
    for m, n, k in [(1, 1000, 1000), (3, 4099, 4100), (8, 777, 14350)]:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            ref = x.double() @ w.double().T
            for cfg in (None, GemvConfig(8, 256, split_k=4), GemvConfig(32, 128, 3, use_dot=True)):
                err = rel_err(gemv(x, w, cfg).double(), ref)
                tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
                if not err < tol:
                    failures.append(f"m={m} n={n} k={k} {dtype} {cfg}: {err:.3g}")
    return failures


def fused_pair(kind: str, k: int, cfg: GemvConfig | None):
    """x and two calls op(x, w), unfused and fused: norm (+ residual) then W, or SwiGLU then W."""
    if kind == "norm":
        res = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        g = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        return (x, lambda a, w: gemv(fused_add_rmsnorm(a, res, g, 1e-5)[0], w),
                lambda a, w: add_rmsnorm_gemv(a, res, g, 1e-5, w, cfg)[0])
    x = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
    return x, lambda a, w: gemv(silu_and_mul(a), w), lambda a, w: silu_mul_gemv(a, w, cfg)


def time_fused(kind: str, cfg: GemvConfig, weights: list[torch.Tensor]) -> dict:
    """Seconds per call of the fused GEMV under `cfg` and of the plain GEMV at that tile."""
    k = weights[0].shape[1]
    x, unfused, fused = fused_pair(kind, k, cfg)
    try:
        err = rel_err(fused(x, weights[0]), unfused(x, weights[0]))
    except Exception as exc:  # a tile past the register budget
        return {"config": asdict(cfg), "error": f"{type(exc).__name__}: {exc}"[:200]}
    if not err < MAX_REL_ERR:
        return {"config": asdict(cfg), "error": f"relative error {err:.3g}"}
    x_k = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    gemv_alone = graph_time(rotating(lambda a, w: gemv(a, w, cfg), x_k, weights))
    return {"config": asdict(cfg), "us": graph_time(rotating(fused, x, weights)) * 1e6,
            "gemv_alone_us": gemv_alone * 1e6, "rel_err": err}


def fused_rows(hbm: float) -> list[dict]:
    """Unfused (at the default configs) and fused, per BLOCK_N, on Llama-3.1-8B's shapes."""
    rows = []
    for name, n, k, kind in FUSED_SHAPES:
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
                   for _ in range(3)]
        floor = weights[0].nbytes / hbm
        x, unfused, _ = fused_pair(kind, k, None)
        base = graph_time(rotating(unfused, x, weights))
        tried = [time_fused(kind, cfg, weights) for cfg in FUSED_TILES]
        print(f"{name:8s} floor {floor * 1e6:6.1f} us  unfused {base * 1e6:6.1f} us "
              f"({base / floor:.3f}x)", flush=True)
        for r in tried:
            cfg = r["config"]
            tile = f"block_n={cfg['block_n']} warps={cfg['num_warps']}"
            if "us" not in r:
                print(f"  {tile}: {r['error']}")
                continue
            print(f"  {tile}: fused {r['us']:6.1f} us ({r['us'] / 1e6 / floor:.3f}x)  "
                  f"gemv alone {r['gemv_alone_us']:6.1f} us "
                  f"({r['gemv_alone_us'] / 1e6 / floor:.3f}x)", flush=True)
        rows.append({"shape": name, "n": n, "k": k, "floor_us": floor * 1e6,
                     "unfused_us": base * 1e6, "tried": tried})
        del weights
    unfused_step = 32 * sum(r["unfused_us"] for r in rows)
    fused_step = 32 * sum(min((t["us"] for t in r["tried"] if "us" in t), default=r["unfused_us"])
                           for r in rows)
    floor_step = 32 * sum(r["floor_us"] for r in rows)
    print(f"a step's qkv, gate_up and down with the norm or SwiGLU before each: unfused "
          f"{unfused_step / 1e3:.3f} ms, fused (best tile each) {fused_step / 1e3:.3f} ms, "
          f"floor {floor_step / 1e3:.3f} ms")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--fused", action="store_true",
                    help="time the fused norm/SwiGLU GEMVs against the unfused kernels instead")
    args = ap.parse_args()
    started = time.time()
    if args.fused:
        ceil = ceilings()
        rows = fused_rows(ceil["hbm_copy_GBps"] * 1e9)
        print(f"{time.time() - started:.0f} s")
        if args.out:
            Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                                  "ceilings": ceil, "fused": rows}, indent=2))
        return
    failures = check_odd_shapes()
    print("odd shapes:", "ok" if not failures else failures, flush=True)
    ceil = ceilings()
    hbm = ceil["hbm_copy_GBps"] * 1e9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, n, k, uses in SHAPES:
        if name not in args.shapes.split(","):
            continue
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        floor = weights[0].nbytes / hbm
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            linear = graph_time(rotating(F.linear, x, weights))
            tried = sweep(m, n, k, weights, sms)
            timed = [r for r in tried if "us" in r]
            best = min(timed, key=lambda r: r["us"])
            default = next(r for r in tried if r.get("default"))
            rows.append({"shape": name, "n": n, "k": k, "m": m, "uses_per_step": uses,
                         "linear_us": linear * 1e6, "floor_us": floor * 1e6, "best": best,
                         "default": default, "tried": tried})
            print(f"{name:8s} M={m}: cuBLAS {linear * 1e6:6.1f} us  gemv best {best['us']:6.1f} "
                  f"default {default.get('us', float('nan')):6.1f}  floor {floor * 1e6:6.1f}  "
                  f"{best['config']}", flush=True)
        del weights
    for m in ROWS:
        sel = [r for r in rows if r["m"] == m]
        cublas = sum(r["linear_us"] * r["uses_per_step"] for r in sel)
        best = sum(min(r["best"]["us"], r["linear_us"]) * r["uses_per_step"] for r in sel)
        floor = sum(r["floor_us"] * r["uses_per_step"] for r in sel)
        print(f"M={m}: a step's linears cuBLAS {cublas / 1e3:.3f} ms, with gemv where it wins "
              f"{best / 1e3:.3f} ms, floor {floor / 1e3:.3f} ms")
    print(f"{time.time() - started:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "ceilings": ceil,
                                              "odd_shape_failures": failures, "rows": rows},
                                             indent=2))


if __name__ == "__main__":
    main()
