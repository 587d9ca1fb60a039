"""Engine speed on one GPU, each figure against its floor (run on the GPU machine).

    python3 benchmarks/bench_engine.py --model llama-3.1-8b --out $OUT/engine_llama.json

Cases (all bf16, random weights of a real architecture's preset):
  decode_b1_1k     time per decode step, batch 1, 1k context; floor = (weights read + KV) / HBM
                   BW (also ratio_all_weights: against all weight bytes / HBM BW, the issue's)
  decode_bN_2k     batch 256 (or the most that fit), 2k context each; same floor with all KV
  prefill_8k       one 8k-token prompt in one step; floor = FLOPs (matmuls + causal attention)
                   / measured bf16 matmul rate
  offline          N requests, input and output lengths uniform in 100..1024, ignore_eos:
                   output and total tokens per second (vLLM 0.26 on an H100: 9,162 output tok/s)
Decode times are per step over runs of back-to-back steps (median of 5 runs of 20), so
async scheduling's overlap counts; prefill times are single steps. CUDA events, after warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig  # noqa: E402
from pdserve.engine.engine import Engine  # noqa: E402
from pdserve.engine.outputs import EngineRequest  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402


def steady_step_time(step, windows: int = 5, steps: int = 20) -> float:
    """Seconds per step in steady state: the median over `windows` runs of `steps` back-to-back
    calls, synchronized only at each window's end. A sync after every call (median_time) would
    drain async scheduling's queued step each time and time serial steps instead."""
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / steps)
    return statistics.median(times)


def median_time(fn, reps: int = 20) -> float:
    """Seconds per call of `fn`, each call timed alone (the median of `reps`)."""
    return steady_step_time(fn, windows=reps, steps=1)


def ceilings() -> dict:
    """HBM copy bandwidth and bf16 matmul rate, as ../shared/device/ceilings.py measures them."""
    n = 2 << 30
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    hbm = 2 * n / median_time(lambda: b.copy_(a)) / 1e9
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = 2 * 8192**3 / median_time(lambda: x @ y) / 1e12
    return {"device": torch.cuda.get_device_name(0), "hbm_copy_GBps": round(hbm, 1),
            "bf16_matmul_TFLOPs": round(mm, 1)}


def model_bytes(engine: Engine) -> tuple[int, int, int]:
    """Per GPU (rank 0's shard under tensor parallelism): bytes of weights a decode step
    reads, matmul parameters per token, and the LM head's parameters."""
    params = dict(engine.runner.model.named_parameters())  # a tied head is listed once
    total = sum(p.numel() * p.element_size() for p in params.values())
    embed = params["model.embed_tokens.weight"]
    head = params.get("lm_head.weight", embed)  # tied: the embedding is the head
    tied = head is embed
    embed_bytes = 0 if tied else embed.numel() * embed.element_size()  # only gathered
    matmul_params = sum(p.numel() for p in params.values() if p.dim() == 2) - (
        0 if tied else embed.numel())
    return total - embed_bytes, matmul_params, head.numel()


def kv_bytes_per_token(engine: Engine) -> int:
    """KV bytes per token on one GPU (its share of the KV heads)."""
    c = engine.model_config
    heads = max(c.num_kv_heads // engine.args.tensor_parallel_size, 1)
    return 2 * c.num_layers * heads * c.head_dim * engine.dtype.itemsize


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1000, vocab - 1000) for _ in range(n)]


def step_until_decoding(engine: Engine, batch: int) -> None:
    """Step until `batch` requests run and none is still prefilling: steady decode from here."""
    while len(engine.scheduler.running) < batch or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()


def decode_case(engine: Engine, batch: int, context: int, ceil: dict, rng) -> dict:
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(EngineRequest(rid, random_prompt(rng, context, engine.vocab_size),
                                         params))
    step_until_decoding(engine, batch)
    step_s = steady_step_time(engine.step)
    weights, _, _ = model_bytes(engine)
    kv = kv_bytes_per_token(engine) * batch * (context + 60)
    bandwidth = ceil["hbm_copy_GBps"] * 1e9
    floor = (weights + kv) / bandwidth
    # the floor: every weight byte (the embedding table too, of which a step reads
    # one row per token) over the bandwidth, without the KV
    params = dict(engine.runner.model.named_parameters())
    all_weights = sum(p.numel() * p.element_size() for p in params.values())
    for rid in ids:
        engine.abort_request(rid)
    engine.step()
    return {"batch": batch, "context": context, "step_ms": step_s * 1e3,
            "floor_ms": floor * 1e3, "ratio": step_s / floor, "weight_bytes": weights,
            "kv_bytes": kv, "all_weight_bytes": all_weights,
            "ratio_all_weights": step_s / (all_weights / bandwidth)}


def prefill_case(engine: Engine, n: int, ceil: dict, rng) -> dict:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for i in range(6):
        engine.add_request(EngineRequest(f"p{i}", random_prompt(rng, n, engine.vocab_size),
                                         params))
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        engine.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        while engine.has_unfinished_requests():
            engine.step()
    t = statistics.median(times[1:])
    c = engine.model_config
    _, matmul_params, lm_head = model_bytes(engine)  # per GPU
    flops = 2 * n * (matmul_params - lm_head) + 2 * lm_head
    heads = c.num_heads // engine.args.tensor_parallel_size
    flops += 2 * n * n * c.head_dim * heads * c.num_layers  # causal QK^T and PV
    floor = flops / (ceil["bf16_matmul_TFLOPs"] * 1e12)
    return {"tokens": n, "step_ms": t * 1e3, "floor_ms": floor * 1e3, "ratio": t / floor,
            "fraction_of_matmul_rate": floor / t, "tflops": flops / t / 1e12}


def offline_case(engine: Engine, num: int, rng) -> dict:
    reqs = []
    for i in range(num):
        n_in, n_out = rng.randint(100, 1024), rng.randint(100, 1024)
        reqs.append(EngineRequest(f"o{i}", random_prompt(rng, n_in, engine.vocab_size),
                                  SamplingParams(max_tokens=n_out, temperature=0.0,
                                                 ignore_eos=True)))
    n_in = sum(len(r.prompt_token_ids) for r in reqs)
    start = time.perf_counter()
    out = engine.generate(reqs)
    secs = time.perf_counter() - start
    n_out = sum(len(v) for v in out.values())
    return {"requests": num, "seconds": secs, "input_tokens": n_in, "output_tokens": n_out,
            "output_tok_s": n_out / secs, "total_tok_s": (n_in + n_out) / secs,
            "requests_s": num / secs, "preemptions": engine.stats().num_preemptions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--cases", default="decode_b1_1k,decode_b256_2k,prefill_8k,offline")
    ap.add_argument("--offline-requests", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="queue step k+1 before reading step k's tokens back (default: the "
                    "engine's, i.e. on with one GPU)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="GPUs per engine; floors are per GPU (communication excluded)")
    ap.add_argument("--max-model-len", type=int, default=10240)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="write a cProfile of the cases here")
    args = ap.parse_args()
    ceil = ceilings()
    torch.cuda.empty_cache()
    result: dict = {"model": args.model, "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__, "async_scheduling": args.async_scheduling,
                    "tensor_parallel_size": args.tensor_parallel_size,
                    "ceilings": ceil, "cases": {}}

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    t0 = time.perf_counter()
    engine = Engine(EngineArgs(
        model=args.model, dtype="bfloat16", device="cuda", enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, tensor_parallel_size=args.tensor_parallel_size,
        cache=CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs,
                                  max_model_len=args.max_model_len)))
    result["init_s"] = time.perf_counter() - t0
    result["async_scheduling"] = engine.loop.depth == 1  # what the engine chose
    result["num_kv_tokens"] = engine.num_blocks * engine.args.cache.block_size
    print(json.dumps({k: result[k] for k in ("ceilings", "init_s", "num_kv_tokens")}), flush=True)
    rng = random.Random(0)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    for case in args.cases.split(","):
        try:
            if case == "decode_b1_1k":
                r = decode_case(engine, 1, 1024, result["ceilings"], rng)
            elif case.startswith("decode_b"):
                batch, ctx = case.removeprefix("decode_b").split("_")
                context = int(ctx.removesuffix("k")) * 1024
                fit = result["num_kv_tokens"] // (context + 128)
                r = decode_case(engine, min(int(batch), fit), context, result["ceilings"], rng)
            elif case == "prefill_8k":
                r = prefill_case(engine, 8192, result["ceilings"], rng)
            elif case == "offline":
                r = offline_case(engine, args.offline_requests, rng)
            else:
                raise ValueError(f"unknown case {case}")
        except Exception as e:  # keep the other cases' figures
            r = {"error": f"{type(e).__name__}: {e}"}
        result["cases"][case] = r
        print(case, json.dumps(r), flush=True)
        save()
    if profiler is not None:
        import pstats

        profiler.disable()
        with open(args.profile, "w") as f:
            pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(40)
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
