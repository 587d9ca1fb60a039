"""Where the offline case's time goes, step by step, against each step's physical floor.

    python3 benchmarks/profile_offline.py --model llama-3.1-8b --out $OUT/offline_profile.json

Runs bench_engine.py's offline case (N requests, input and output lengths uniform in
100..1024, ignore_eos) and records every step: its shape (prefill tokens, decode rows, the
context each reads), its wall time between two `Engine.step()` returns, and how long the host
waited in it for the device's tokens. Each step's floor is the larger of its bytes (weights
plus the KV it reads) over the measured HBM bandwidth and its FLOPs over the measured matmul
rate; the sum over steps is the run's floor. Steps are grouped by kind (decode only, mixed,
prefill only) and by how full the batch is, so the table says which steps lose the time.
`--profile-at` steps are also traced with torch.profiler: GPU time per kernel family and the
device's idle time per step.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import (  # noqa: E402
    ceilings,
    kv_bytes_per_token,
    model_bytes,
    random_prompt,
)
from benchmarks.profile_decode_step import device_events  # noqa: E402
from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig  # noqa: E402
from pdserve.engine import step_loop  # noqa: E402
from pdserve.engine.engine import Engine  # noqa: E402
from pdserve.engine.outputs import EngineRequest  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402

# kernel name fragments -> family; the first match wins
FAMILIES = [("decode_attention", ("_decode_split", "_decode_reduce")),
            ("prefill_attention", ("_prefill_kernel", "flash", "cudnn", "fmha")),
            ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "gemv")),
            ("kv_store", ("_store_kv",)),
            ("norm_rope_act", ("rmsnorm", "_rope", "silu")),
            ("sampling", ("argmax", "softmax", "topk", "sort", "noise", "exponential")),
            ("copies", ("memcpy", "memset", "copy", "Memcpy", "Memset"))]


def family(name: str) -> str:
    return next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")


@dataclass
class StepRecord:
    prefill_tokens: int = 0
    prefill_context: int = 0  # sum over prefill tokens of the keys each attends to
    prefill_kv_tokens: int = 0  # keys the prefill chunks read (or write) once
    decode_rows: int = 0
    decode_context: int = 0  # sum over decode rows of their context
    running: int = 0
    waiting: int = 0
    wall_s: float = 0.0  # from the previous step() return to this step's apply
    waited_s: float = 0.0  # of which the host sat in the device-to-host read
    floor_s: float = 0.0

    @property
    def kind(self) -> str:
        if not self.prefill_tokens:
            return "decode_only"
        return "mixed" if self.decode_rows else "prefill_only"


def record_shapes(engine: Engine, steps: list[StepRecord]) -> None:
    """Wrap the scheduler so every plan leaves a StepRecord (observation only)."""
    schedule = engine.scheduler.schedule

    def recorded():
        plan = schedule()
        rec = StepRecord(running=len(engine.scheduler.running),
                         waiting=len(engine.scheduler.waiting))
        for s in plan.scheduled:
            r = s.request
            if s.num_new_tokens > 1 or r.num_computed_tokens < r.num_prompt_tokens:
                n0, n = r.num_computed_tokens, s.num_new_tokens
                rec.prefill_tokens += n
                rec.prefill_kv_tokens += n0 + n
                rec.prefill_context += n * n0 + n * (n + 1) // 2
            else:
                rec.decode_rows += 1
                rec.decode_context += r.num_computed_tokens + 1
        if plan.scheduled:
            steps.append(rec)
        return plan

    engine.scheduler.schedule = recorded


def time_reads(waits: list[float]) -> None:
    """Record how long each read of a step's tokens blocked the host."""
    read = step_loop.LaunchedStep.read

    def timed(self):
        t0 = time.perf_counter()
        out = read(self)
        waits.append(time.perf_counter() - t0)
        return out

    step_loop.LaunchedStep.read = timed


@dataclass(frozen=True)
class FloorModel:
    """What a step's floor needs of the model and the device, measured once."""

    weights: int  # bytes a decode step reads
    matmul_params: int
    head: int  # the LM head's parameters
    kv_tok: int  # KV bytes per token
    attention_flops_per_key: int  # per query token and key: QK^T and PV, all layers
    bandwidth: float  # bytes/s
    matmul_rate: float  # FLOP/s

    @classmethod
    def of(cls, engine: Engine, ceil: dict) -> FloorModel:
        c = engine.model_config
        return cls(*model_bytes(engine), kv_bytes_per_token(engine),
                   4 * c.head_dim * c.num_heads * c.num_layers,
                   ceil["hbm_copy_GBps"] * 1e9, ceil["bf16_matmul_TFLOPs"] * 1e12)


def floor_s(rec: StepRecord, m: FloorModel) -> float:
    tokens = rec.prefill_tokens + rec.decode_rows
    bytes_ = m.weights + m.kv_tok * (rec.decode_context + rec.prefill_kv_tokens)
    logits_rows = rec.decode_rows + (1 if rec.prefill_tokens else 0)
    flops = 2 * tokens * (m.matmul_params - m.head) + 2 * logits_rows * m.head
    flops += m.attention_flops_per_key * (rec.prefill_context + rec.decode_context)
    return max(bytes_ / m.bandwidth, flops / m.matmul_rate)


def kernel_families(prof: profile, steps: int) -> dict:
    events = device_events(prof)
    if not events:  # no CUDA
        return {}
    per: dict[str, float] = collections.defaultdict(float)
    for e in events:
        per[family(e["name"])] += e["dur"] / steps / 1e3
    span = (events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]) / steps / 1e3
    busy = sum(e["dur"] for e in events) / steps / 1e3
    top = collections.Counter()
    for e in events:
        top[e["name"][:90]] += e["dur"] / steps / 1e3
    return {"span_ms": span, "busy_ms": busy, "idle_ms": span - busy,
            "families_ms": dict(sorted(per.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": dict(top.most_common(15))}


def summarize(steps: list[StepRecord], max_seqs: int) -> dict:
    groups: dict[str, list[StepRecord]] = collections.defaultdict(list)
    for r in steps:
        fill = "full" if r.running >= 0.9 * max_seqs else "half+" if r.running >= max_seqs / 2 \
            else "under_half"
        groups[f"{r.kind}/{fill}"].append(r)
    total = sum(r.wall_s for r in steps)
    out = {}
    for key, rs in sorted(groups.items()):
        wall, fl = sum(r.wall_s for r in rs), sum(r.floor_s for r in rs)
        out[key] = {"steps": len(rs), "wall_s": round(wall, 3), "share": round(wall / total, 3),
                    "floor_s": round(fl, 3), "ratio": round(wall / fl, 3),
                    "host_waited_s": round(sum(r.waited_s for r in rs), 3),
                    "mean_rows": round(sum(r.decode_rows + bool(r.prefill_tokens)
                                           for r in rs) / len(rs), 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    ap.add_argument("--profile-at", type=int, nargs="*", default=[400],
                    help="trace this many steps in (each window --profile-steps long)")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ceil = ceilings()
    torch.cuda.empty_cache()
    engine = Engine(EngineArgs(
        model=args.model, dtype="bfloat16", device="cuda",
        cache=CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, max_model_len=10240)))
    rng = random.Random(0)
    for i in range(args.requests):
        n_in, n_out = rng.randint(100, 1024), rng.randint(100, 1024)
        engine.add_request(EngineRequest(
            f"o{i}", random_prompt(rng, n_in, engine.vocab_size),
            SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True)))
    steps: list[StepRecord] = []
    waits: list[float] = []
    record_shapes(engine, steps)
    time_reads(waits)
    walls: list[float] = []
    windows: dict[int, dict] = {}
    n_out = 0
    start = last = time.perf_counter()
    while engine.has_unfinished_requests():
        i = len(walls)
        if i in args.profile_at:
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_steps):
                    n_out += sum(len(o.new_token_ids) for o in engine.step())
                torch.cuda.synchronize()
            shapes = steps[-args.profile_steps:]
            windows[i] = {"rows_mean": sum(r.decode_rows for r in shapes) / len(shapes),
                          "prefill_tokens_mean": sum(r.prefill_tokens for r in shapes)
                          / len(shapes), **kernel_families(prof, args.profile_steps)}
            walls += [float("nan")] * args.profile_steps
            last = time.perf_counter()
            continue
        n_out += sum(len(o.new_token_ids) for o in engine.step())
        now = time.perf_counter()
        walls.append(now - last)
        last = now
    secs = time.perf_counter() - start
    # with one step in flight, call k+1 returns once step k is applied: its wall is step k's
    depth = engine.loop.depth
    floor_model = FloorModel.of(engine, ceil)
    for k, rec in enumerate(steps):
        j = k + depth
        rec.wall_s = walls[j] if j < len(walls) and walls[j] == walls[j] else 0.0
        rec.waited_s = waits[k] if k < len(waits) else 0.0
        rec.floor_s = floor_s(rec, floor_model)
    timed = [r for r in steps if r.wall_s]
    result = {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M"),
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "ceilings": ceil, "args": vars(args), "seconds": secs, "output_tokens": n_out,
              "output_tok_s": n_out / secs, "steps": len(steps),
              "floor_s_all_steps": sum(r.floor_s for r in steps),
              "wall_s_timed_steps": sum(r.wall_s for r in timed),
              "floor_s_timed_steps": sum(r.floor_s for r in timed),
              "by_kind": summarize(timed, args.max_num_seqs), "profiles": windows,
              "step_log": [asdict(r) for r in steps]}
    print(f"{n_out} output tokens in {secs:.1f} s: {n_out / secs:,.0f} tok/s; "
          f"floor of all steps {result['floor_s_all_steps']:.1f} s")
    for k, v in result["by_kind"].items():
        print(f"{k:28s} {json.dumps(v)}")
    for at, w in windows.items():
        brief = {k: v for k, v in w.items() if k != "top_kernels_ms"}
        print(f"profile at step {at}: {json.dumps(brief)}")
        for name, ms in w.get("top_kernels_ms", {}).items():
            print(f"   {ms:8.2f} ms  {name}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, separators=(",", ":")))
    engine.close()


if __name__ == "__main__":
    main()
