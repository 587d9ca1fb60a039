"""The cost of seeded sampling's counter-based noise: one sampler call (`sample_tokens`, with
temperature and top-p) on random logits, every row seeded vs none, at batch 1 and 32.

    python benchmarks/bench_seeded_sampling.py [--device cuda] [--vocab 128256] [--out f.json]

Also checks that the seeded noise is bit-identical on CPU and the device (integer hashing).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from pdserve.engine.request import Request
from pdserve.engine.sampler import sample_tokens
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.seeded_noise import exponential_noise, prompt_digest, row_key


def time_call(fn, device: torch.device, iters: int) -> float:
    """Median seconds of one call, the device synchronized around each."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "vocab": args.vocab, "rows": []}
    for batch in (1, 32):
        logits = torch.randn(batch, args.vocab, device=device)
        for seeded in (False, True):
            reqs = [Request(f"r{i}", [1, 2, 3 + i], SamplingParams(
                temperature=0.8, top_p=0.95, seed=100 + i if seeded else None))
                for i in range(batch)]
            s = time_call(functools.partial(sample_tokens, logits, reqs, []), device,
                          args.iters)
            result["rows"].append({"batch": batch, "seeded": seeded, "ms": s * 1e3})
            print(f"batch {batch:3d} seeded {seeded!s:5}: {s * 1e3:.3f} ms", flush=True)
    keys = [row_key(7, prompt_digest([1, 2, 3]), i) for i in range(8)]
    cpu = exponential_noise(keys, args.vocab, torch.float32, torch.device("cpu"))
    here = exponential_noise(keys, args.vocab, torch.float32, device).cpu()
    result["max_abs_noise_diff_vs_cpu"] = float((cpu - here).abs().max())
    print("noise vs CPU, max abs diff:", result["max_abs_noise_diff_vs_cpu"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
