"""CPU: a decode step's linears of the embedded SmolLM2 in four layouts: the usual [N, K] and
K-major on MKL, packed for oneDNN, and packed in panels for pdserve's C kernel
(pdserve/kernels/cpu_linear.c, pdserve/models/cpu_layout.py), beside the time it takes to
read every weight once (the floor of a step of a few rows).

    taskset -c 1 python3 benchmarks/bench_cpu_linear_layout.py --out cpu_linear_layout.json

Every linear of the 30 layers (qkv, o, gate_up, down: each its own weight, so they stream
from memory as in a real step) and the 49152-row LM head: `F.linear(x, W)` with W row-major
[N, K], the same with W the transposed view of a contiguous [K, N] tensor, oneDNN's
`_linear_pointwise` on W packed by `_reorder_linear_weight`, the C kernel on W packed by
`cpu_native.pack_panels` (up to 64 rows), and what pdserve runs (`layers.linear`: the C
kernel up to 64 rows, oneDNN past them, a prompt's rows in 64-row multiples); `read` is
`torch.sum` over every weight. float32, `--threads` threads (1). Layouts rotate in each of
`--rounds` rounds; the median per layout is reported.
`--engine-batches 1 8 16` also times whole decode steps of the engine (256-token contexts)
with the packed copies as pdserve runs them, with oneDNN's only, and with neither (MKL on
the K-major weights), in turn within one process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pdserve, for --engine-batches

HIDDEN, INTERMEDIATE, QKV, LAYERS, VOCAB = 576, 1536, 960, 30, 49152
SHAPES = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
LAYOUTS = ("read", "usual", "k_major", "onednn", "panels", "pdserve")
Linear = Callable[[torch.Tensor], torch.Tensor]


def layout_linears(weights: list[torch.Tensor], layout: str) -> list[tuple[int, Linear]]:
    """(K, x -> x W^T) for each weight, in `layout`."""
    from pdserve.kernels import cpu_native
    from pdserve.models.layers import linear

    out = []
    for w in weights:
        k = w.shape[1]
        if layout == "read":  # the floor: every weight read once
            out.append((k, lambda x, w=w: w.sum()))
        elif layout == "usual":
            out.append((k, lambda x, w=w: F.linear(x, w)))
        elif layout == "k_major":
            wk = w.t().contiguous().t()
            out.append((k, lambda x, wk=wk: F.linear(x, wk)))
        elif layout == "onednn":
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            out.append((k, lambda x, p=packed: torch.ops.mkldnn._linear_pointwise(
                x, p, None, "none", [], "")))
        elif layout == "panels":
            panels = cpu_native.pack_panels(w)
            out.append((k, lambda x, p=panels: cpu_native.linear_rows(x, p, None)))
        else:  # what pdserve runs: layers.linear picks the C kernel, oneDNN or MKL
            wk, packed = w.t().contiguous().t(), torch.ops.mkldnn._reorder_linear_weight(w)
            panels = cpu_native.pack_panels(w)
            out.append((k, lambda x, wk=wk, p=packed, q=panels: linear(
                x, wk, onednn_weight=p, panel_weight=q)))
    return out


def step_ms(linears: list[tuple[int, Linear]], rows: int, reps: int = 3) -> float:
    xs = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}
    for k, f in linears:  # warm-up
        f(xs[k])
    start = time.perf_counter()
    for _ in range(reps):
        for k, f in linears:
            f(xs[k])
    return (time.perf_counter() - start) / reps * 1e3


def engine_step_ms(batch: int, threads: int, windows: int = 8, steps: int = 8) -> dict:
    """Median decode step of the engine on each layout's linears, in turn (windows of `steps`)."""
    import random

    from benchmarks.bench_engine import step_until_decoding
    from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig
    from pdserve.engine.engine import Engine
    from pdserve.engine.outputs import EngineRequest
    from pdserve.engine.sampling_params import SamplingParams

    engine = Engine(EngineArgs(model=None, device="cpu", dtype="float32", cpu_threads=threads,
                               cache=CacheConfig(kv_cache_memory=256 * 2**20),
                               scheduler=SchedulerConfig(max_num_seqs=max(batch, 8),
                                                         max_model_len=4096)))
    modules = [m for m in engine.runner.model.modules()
               if getattr(m, "onednn_weight", None) is not None]
    packed = [(m.onednn_weight, m.panel_weight) for m in modules]
    if not modules or any(p is None for _, p in packed):
        raise SystemExit("needs oneDNN and the C kernels (PDSERVE_CPU_ONEDNN, "
                         "PDSERVE_CPU_PANELS and a C compiler)")
    rng = random.Random(0)
    for i in range(batch):
        engine.add_request(EngineRequest(
            f"r{i}", [rng.randrange(100, 40000) for _ in range(256)],
            SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)))
    step_until_decoding(engine, batch)
    modes = ("k_major", "onednn", "panels")
    times: dict[str, list[float]] = {name: [] for name in modes}
    for w in range(windows):
        for name in modes[w % 3:] + modes[:w % 3]:  # rotate which goes first
            for m, (onednn, panels) in zip(modules, packed):
                m.onednn_weight = None if name == "k_major" else onednn
                m.panel_weight = panels if name == "panels" else None
            engine.step()
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    engine.close()
    return {"batch": batch, **{f"{name}_ms": statistics.median(times[name]) for name in modes},
            "windows_ms": times}


def cpu_name() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                "unknown")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 8, 16, 64, 512])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engine-batches", type=int, nargs="*", default=[],
                    help="also time the engine's decode step at these batch sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from pdserve.kernels.cpu_native import PANEL_MAX_ROWS
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = {"layers": [torch.randn(n, k) for _ in range(LAYERS) for n, k in SHAPES],
               "lm_head": [torch.randn(VOCAB, HIDDEN)]}
    rows_out = []
    for rows in args.rows:
        for part, ws in weights.items():
            linears = {name: layout_linears(ws, name) for name in LAYOUTS}
            times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
            for r in range(args.rounds):
                for i in range(len(LAYOUTS)):  # rotate which layout goes first
                    name = LAYOUTS[(r + i) % len(LAYOUTS)]
                    beyond = name == "panels" and rows > PANEL_MAX_ROWS  # the kernel declines
                    times[name].append(math.nan if beyond else step_ms(linears[name], rows))
            ms = {name: statistics.median(t) for name, t in times.items()}
            rows_out.append({"rows": rows, "part": part,
                             **{f"{name}_ms": v for name, v in ms.items()}})
            print(f"{rows:4d} rows, {part:8s}: " + ", ".join(
                f"{name} {v:7.2f} ms" for name, v in ms.items()) +
                f" (pdserve / read {ms['pdserve'] / ms['read']:.2f}x, oneDNN / pdserve "
                f"{ms['onednn'] / ms['pdserve']:.2f}x)", flush=True)
            del linears
    engine_rows = []
    for batch in args.engine_batches:
        r = engine_step_ms(batch, args.threads)
        engine_rows.append(r)
        print(f"engine decode step, {batch} sequences: K-major on MKL {r['k_major_ms']:.1f} ms, "
              f"oneDNN {r['onednn_ms']:.1f} ms, panels (as served) {r['panels_ms']:.1f} ms",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "threads": args.threads, "cpu": cpu_name(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "rows": rows_out, "engine": engine_rows}, indent=2))


if __name__ == "__main__":
    main()
