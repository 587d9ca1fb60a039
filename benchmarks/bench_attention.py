"""Check and time pdserve's Triton attention kernels on a GPU, against their rooflines.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim 128), bf16, block size 16.

1. Ceilings, measured in this run: HBM copy bandwidth and the bf16 matmul rate.
2. Correctness on real shapes (lengths up to 32k) against a float32 reference.
3. Timing (CUDA events, L2 flushed before each run, median of many runs after warm-up):
   decode at batch 1/64/256 x context 1k/2k/8k, eager and as a CUDA-graph replay, against
   KV bytes / HBM bandwidth; prefill of 1 x 8k and of a 2k chunk over a 6k cached prefix,
   against attention FLOPs / bf16 matmul rate, with torch's SDPA (cuDNN, flash) as the peer.

    python3 benchmarks/bench_attention.py [--sweep]      (JSON to $OUT when set)
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.kernels.attention import AttentionMetadata, build_metadata  # noqa: E402
from pdserve.kernels.triton_attention import triton_paged_attention  # noqa: E402
from pdserve.kernels.triton_decode import (  # noqa: E402
    DecodeConfig,
    DecodeScratch,
    decode_attention,
    num_splits_for,
)
from pdserve.kernels.triton_prefill import PrefillConfig, prefill_attention  # noqa: E402

HEADS, KV_HEADS, DIM, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = DIM**-0.5
DEV = torch.device("cuda")
_flush = None  # a buffer larger than L2, rewritten before each timed run


def timed(fn, reps: int, warmup: int = 5) -> float:
    """Median seconds of `fn` over `reps` runs, each after an L2 flush, timed with events."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        _flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ceilings() -> dict:
    """HBM copy bandwidth (read + write) and bf16 matmul rate, as ../shared/device/ceilings.py."""
    n = 2 << 30
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    hbm = 2 * n / timed(lambda: b.copy_(a), 20, 2)
    x = torch.randn(8192, 8192, device=DEV, dtype=DTYPE)
    y = torch.randn(8192, 8192, device=DEV, dtype=DTYPE)
    mm = 2 * 8192**3 / timed(lambda: x @ y, 20, 2)
    return {"hbm_copy_GBps": round(hbm / 1e9, 1), "bf16_matmul_TFLOPs": round(mm / 1e12, 1)}


def make_batch(query_lens, seq_lens, cache_blocks: int, seed: int) -> AttentionMetadata:
    """Metadata whose sequences own random (shuffled) blocks of a cache of `cache_blocks`."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(cache_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in seq_lens:
        need = -(-n // PAGE)
        tables.append(order[used : used + need])
        used += need
    assert used <= cache_blocks, "cache too small for the batch"
    return build_metadata(list(query_lens), list(seq_lens), tables, PAGE, DEV)


def new_qkv(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(tokens, HEADS, DIM, device=DEV, dtype=DTYPE)
    k = torch.randn(tokens, KV_HEADS, DIM, device=DEV, dtype=DTYPE)
    v = torch.randn(tokens, KV_HEADS, DIM, device=DEV, dtype=DTYPE)
    return q, k, v


def reference(q, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
    """Float32 attention over the cache (K/V already stored), in query chunks of 512."""
    torch.backends.cuda.matmul.allow_tf32 = False
    out = torch.empty(q.shape, dtype=torch.float32, device=DEV)
    group = HEADS // KV_HEADS
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        blocks = meta.block_tables[i, : -(-seq_len // PAGE)].long()
        keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, 1)
        vals = kv_cache[1, blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, 1)
        keys, vals = keys.transpose(0, 1), vals.transpose(0, 1)  # [Hq, seq_len, D]
        for c in range(0, q_len, 512):
            rows = min(512, q_len - c)
            qc = q[start + c : start + c + rows].float().transpose(0, 1)  # [Hq, rows, D]
            scores = torch.bmm(qc, keys.transpose(1, 2)) * SCALE
            pos = seq_len - q_len + c + torch.arange(rows, device=DEV)
            hidden = torch.arange(seq_len, device=DEV)[None, :] > pos[:, None]
            scores.masked_fill_(hidden, float("-inf"))
            o = torch.bmm(scores.softmax(-1), vals)
            out[start + c : start + c + rows] = o.transpose(0, 1)
        start += q_len
    return out


def check(name: str, query_lens, seq_lens, kv_cache, seed: int) -> dict:
    """Run one mixed batch through the Triton path and compare with the float32 reference."""
    meta = make_batch(query_lens, seq_lens, kv_cache.shape[1], seed)
    q, k, v = new_qkv(sum(query_lens))
    out = torch.full_like(q, float("nan"))
    triton_paged_attention(q, k, v, kv_cache, meta, SCALE, out=out)
    expected = reference(q, kv_cache, meta)
    stored = kv_cache[0].flatten(0, 1)[meta.slot_mapping]
    err = float((out.float() - expected).norm() / expected.norm())
    ok = err < 1e-2 and not bool(out.isnan().any()) and torch.equal(stored, k)
    return {
        "case": name,
        "rel_error": err,
        "max_abs": float((out.float() - expected).abs().max()),
        "kv_stored": torch.equal(stored, k),
        "ok": ok,
    }


def bench_decode(batch: int, context: int, kv_cache, reps: int) -> dict:
    """Decode step of `batch` sequences of `context` tokens: eager call and CUDA-graph replay."""
    meta = make_batch([1] * batch, [context] * batch, kv_cache.shape[1], seed=batch + context)
    q, k, v = new_qkv(batch)
    out = torch.empty_like(q)
    splits = num_splits_for(batch, KV_HEADS, DEV)
    scratch = DecodeScratch.allocate(batch, HEADS, DIM, splits, DEV)

    def step():
        triton_paged_attention(q, k, v, kv_cache, meta, SCALE, out=out, scratch=scratch)

    eager = timed(step, reps)
    host = host_seconds(step)
    replay = graph_timed(step, reps)
    kv_bytes = batch * context * KV_HEADS * DIM * 2 * kv_cache.element_size()
    return {
        "batch": batch,
        "context": context,
        "splits": splits,
        "kv_bytes": kv_bytes,
        "eager_s": eager,
        "graph_s": replay,
        "host_launch_s": host,
    }


def bench_prefill(q_len: int, context: int, kv_cache, reps: int, config=None) -> dict:
    """One sequence: `q_len` new tokens over `context` cached ones; whole Triton call."""
    seq_len = context + q_len
    meta = make_batch([q_len], [seq_len], kv_cache.shape[1], seed=seq_len)
    q, k, v = new_qkv(q_len)
    out = torch.empty_like(q)
    call = lambda: triton_paged_attention(q, k, v, kv_cache, meta, SCALE, out=out)  # noqa: E731
    full = timed(call, reps)
    host = host_seconds(call, 10)
    # visible (query, key) pairs: query i sees context + i + 1 keys; 2 matmuls x 2 FLOPs
    pairs = q_len * context + q_len * (q_len + 1) // 2
    flops = 4 * pairs * DIM * HEADS
    return {
        "q_len": q_len,
        "context": context,
        "flops": flops,
        "call_s": full,
        "host_launch_s": host,
    }


def bench_sdpa(q_len: int, reps: int) -> dict:
    """torch SDPA on contiguous [1, Hq, L, D] (K/V expanded to Hq heads), causal: the peer."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, HEADS, q_len, DIM, device=DEV, dtype=DTYPE)
    k = torch.randn(1, HEADS, q_len, DIM, device=DEV, dtype=DTYPE)
    v = torch.randn(1, HEADS, q_len, DIM, device=DEV, dtype=DTYPE)
    result = {}
    for name, backend in [
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
    ]:
        try:
            with sdpa_kernel(backend):
                result[name] = timed(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps
                )
        except RuntimeError as err:  # backend unavailable on this build
            result[name] = f"unavailable: {str(err)[:120]}"
    return result


def graph_timed(fn, reps: int) -> float:
    """Median seconds of a CUDA-graph replay of `fn` (launch overhead excluded)."""
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed(graph.replay, reps)


def host_seconds(fn, calls: int = 50) -> float:
    """CPU time to launch `fn` once (the GPU queue absorbs the work meanwhile)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return elapsed


def sweep(kv_cache, rows: list[dict], checkpoint) -> None:
    """Tile settings and split counts tried on the device, appended to `rows` as measured."""
    decode_cfgs = [(64, 4, 3), (128, 4, 3), (64, 4, 2), (32, 4, 3), (64, 8, 3), (128, 4, 2)]
    for batch, context, splits in [(1, 8192, [16, 32, 64]), (1, 2048, [8, 16, 32, 64]),
                                   (64, 8192, [1, 2, 4]), (64, 1024, [1, 2, 4, 8]),
                                   (256, 2048, [1, 2])]:  # fmt: skip
        meta = make_batch([1] * batch, [context] * batch, kv_cache.shape[1], seed=7)
        q, k, v = new_qkv(batch)
        out = torch.empty_like(q)
        kv_bytes = batch * context * KV_HEADS * DIM * 4
        for n in splits:
            for block_n, warps, stages in decode_cfgs:
                cfg = DecodeConfig(block_n, warps, stages)
                row = {"kind": "decode", "batch": batch, "context": context, "splits": n,
                       "config": cfg.__dict__}  # fmt: skip
                try:
                    t = graph_timed(
                        lambda c=cfg, n=n, q=q, k=k, v=v, m=meta, o=out: decode_attention(
                            q, kv_cache, m, SCALE, o, num_splits=n, config=c, new_kv=(k, v)
                        ),
                        30,
                    )
                    row.update(graph_s=t, GBps=kv_bytes / t / 1e9)
                except Exception as err:  # noqa: BLE001 - a config that fails to compile is a result
                    row["error"] = str(err)[:200]
                rows.append(row)
        checkpoint()
    prefill_cfgs = [(128, 32, 4, 3), (128, 32, 8, 3), (256, 32, 8, 3), (256, 64, 8, 2),
                    (128, 128, 8, 2), (128, 32, 4, 4), (128, 64, 8, 3), (64, 32, 4, 3),
                    (128, 64, 4, 2)]  # fmt: skip
    for q_len, context in [(8192, 0), (2048, 6144)]:
        meta = make_batch([q_len], [context + q_len], kv_cache.shape[1], seed=9)
        q, k, v = new_qkv(q_len)
        out = torch.empty_like(q)
        flops = 4 * (q_len * context + q_len * (q_len + 1) // 2) * DIM * HEADS
        for m, n, w, st in prefill_cfgs:
            cfg = PrefillConfig(m, n, w, st)
            row = {"kind": "prefill", "q_len": q_len, "context": context, "config": cfg.__dict__}
            try:
                t = timed(
                    lambda c=cfg, q=q, k=k, v=v, m=meta, o=out: prefill_attention(
                        q, k, v, kv_cache, m, SCALE, o, config=c
                    ),
                    10,
                )
                row.update(s=t, TFLOPs=flops / t / 1e12)
            except Exception as err:  # noqa: BLE001
                row["error"] = str(err)[:200]
            rows.append(row)
        checkpoint()


def save(result: dict) -> None:
    """Write what is measured so far, so a crash later in the run keeps it."""
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "attention_h100.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also try several tile settings")
    args = parser.parse_args()
    import triton

    t0 = time.time()
    result: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": DIM,
            "block_size": PAGE,
            "dtype": "bf16",
        },
    }
    ceil = result["ceilings"] = ceilings()
    print("ceilings", ceil, flush=True)

    blocks = 256 * 8192 // PAGE + 64  # the largest decode batch, 8.6 GB of bf16 K/V
    kv_cache = torch.randn(2, blocks, PAGE, KV_HEADS, DIM, device=DEV, dtype=DTYPE)
    checks = [
        check("decode ragged up to 32k", [1] * 6, [1, 17, 1000, 4099, 8193, 32768], kv_cache, 1),
        check("prefill 8k fresh", [8192], [8192], kv_cache, 2),
        check("chunk 4k over 28k prefix (32k)", [4096], [32768], kv_cache, 3),
        check(
            "mixed decode + chunks", [1, 2048, 1, 700, 1], [6000, 8192, 20000, 700, 31], kv_cache, 4
        ),
    ]
    result["checks"] = checks
    save(result)
    for c in checks:
        print(
            f"check {c['case']:<34} rel_err {c['rel_error']:.2e}  {'ok' if c['ok'] else 'FAIL'}",
            flush=True,
        )

    hbm, mm = ceil["hbm_copy_GBps"] * 1e9, ceil["bf16_matmul_TFLOPs"] * 1e12
    decode = []
    for batch in (1, 64, 256):
        for context in (1024, 2048, 8192):
            row = bench_decode(batch, context, kv_cache, reps=100 if batch < 256 else 50)
            row["floor_s"] = row["kv_bytes"] / hbm
            decode.append(row)
            print(
                f"decode b={batch:<3} ctx={context:<5} splits={row['splits']:<2} "
                f"eager {row['eager_s'] * 1e6:8.1f} us"
                f"  graph {row['graph_s'] * 1e6:8.1f} us  floor {row['floor_s'] * 1e6:8.1f} us",
                flush=True,
            )
    result["decode"] = decode
    save(result)

    prefill = [bench_prefill(8192, 0, kv_cache, 20), bench_prefill(2048, 6144, kv_cache, 20)]
    for row in prefill:
        row["floor_s"] = row["flops"] / mm
    sdpa = bench_sdpa(8192, 20)
    prefill[0]["sdpa_s"] = sdpa
    result["prefill"] = prefill
    save(result)
    if args.sweep:
        result["sweep"] = []
        sweep(kv_cache, result["sweep"], lambda: save(result))
        for row in result["sweep"]:
            print_sweep_row(row)
    result["wall_s"] = round(time.time() - t0, 1)
    save(result)
    print_table(result)


def print_sweep_row(row: dict) -> None:
    """One compact line per sweep setting."""
    cfg = tuple(row["config"].values())
    if row["kind"] == "decode":
        what = f"decode b={row['batch']} ctx={row['context']} splits={row['splits']} {cfg}"
        value = f"{row['graph_s'] * 1e6:8.1f} us {row['GBps']:7.0f} GB/s" if "GBps" in row else ""
    else:
        what = f"prefill {row['q_len']} over {row['context']} {cfg}"
        value = f"{row['s'] * 1e6:8.1f} us {row['TFLOPs']:6.1f} TFLOP/s" if "s" in row else ""
    print(f"sweep {what:<52} {value or row.get('error', '')}")


def print_table(result: dict) -> None:
    """The short table: each figure beside its floor and the ratio."""
    print(
        f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}  "
        f"{result['ceilings']}"
    )
    for c in result["checks"]:
        print(
            f"  check {c['case']:<34} rel_err {c['rel_error']:.2e}  {'ok' if c['ok'] else 'FAIL'}"
        )
    print(f"{'figure':<34}{'time us':>10}{'floor us':>10}{'ratio':>8}")
    for r in result["decode"]:
        for mode in ("eager", "graph"):
            t = r[f"{mode}_s"]
            name = f"decode b={r['batch']} ctx={r['context']} {mode}"
            host = f"  host launch {r['host_launch_s'] * 1e6:.0f} us" if mode == "eager" else ""
            print(
                f"{name:<34}{t * 1e6:>10.1f}{r['floor_s'] * 1e6:>10.1f}"
                f"{t / r['floor_s']:>8.2f}{host}"
            )
    for r in result["prefill"]:
        for key in ("call_s",):
            name = f"prefill {r['q_len']} over {r['context']} {key[:-2]}"
            t = r[key]
            print(
                f"{name:<34}{t * 1e6:>10.1f}{r['floor_s'] * 1e6:>10.1f}{t / r['floor_s']:>8.2f}"
                f"  {r['flops'] / t / 1e12:6.1f} TFLOP/s"
                f"  host launch {r['host_launch_s'] * 1e6:.0f} us"
            )
        for peer, t in r.get("sdpa_s", {}).items():
            if isinstance(t, float):
                print(
                    f"{'  peer sdpa ' + peer:<34}{t * 1e6:>10.1f}{r['floor_s'] * 1e6:>10.1f}"
                    f"{t / r['floor_s']:>8.2f}  {r['flops'] / t / 1e12:6.1f} TFLOP/s"
                )
            else:
                print(f"  peer sdpa {peer}: {t}")


if __name__ == "__main__":
    main()
