"""What P's pull of one image's rows costs: E's EmbeddingSource -> P's EmbeddingPuller over
tcp on loopback, the connection kept open (as P keeps it), at SmolVLM-256M's sizes.

    PYTHONPATH=. python benchmarks/bench_embedding_pull.py \
        --out benchmarks/results/embedding_pull_cpu.json

The floor is the copy: a few MB at loopback's several GB/s is well under a millisecond; the
rest is the round trip, the header check and Python.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from pdserve.security import DeploymentSecret
from pdserve.transfer.embedding_params import RemoteEmbedding
from pdserve.transfer.embedding_puller import EmbeddingPuller
from pdserve.transfer.embedding_source import EmbeddingSource, EmbeddingStore

HIDDEN = 576  # SmolVLM-256M's text hidden size
CASES = {"1 tile (detail low)": 64, "5 tiles (640x360)": 320, "17 tiles (largest)": 1088}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    secret = DeploymentSecret.generate()
    source = EmbeddingSource(EmbeddingStore(), secret).start()
    puller = EmbeddingPuller(secret)
    results = {}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for name, rows in CASES.items():
                data = torch.randn(rows, HIDDEN).to(dtype)
                times = []
                for _ in range(args.repeats + 1):
                    lease_id, token = source.store.hold(data)
                    handle = RemoteEmbedding("ab" * 32, rows, HIDDEN,
                                             str(dtype).removeprefix("torch."),
                                             source.endpoint(), lease_id, token)
                    start = time.perf_counter()
                    out = puller.pull(handle, rows, HIDDEN)
                    times.append(time.perf_counter() - start)
                    assert torch.equal(out, data)
                times = times[1:]  # the first one connects and proves the secret
                key = f"{name}, {str(dtype).removeprefix('torch.')}"
                results[key] = {"bytes": data.nbytes,
                                "median_ms": 1000 * statistics.median(times),
                                "p90_ms": 1000 * sorted(times)[int(0.9 * len(times))],
                                "GB_per_s": data.nbytes / statistics.median(times) / 1e9}
                print(f"{key:36s} {data.nbytes / 1e6:6.2f} MB  "
                      f"median {results[key]['median_ms']:.3f} ms  "
                      f"p90 {results[key]['p90_ms']:.3f} ms")
    finally:
        puller.close()
        source.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "device": "CPU, loopback, "
                       "machine shared with other jobs", "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
