"""KV transfer bandwidth: one prompt's KV moved from a prefill process to this (decode) process.

Default shape: an 8k-token Llama-3.1-8B prompt (32 layers, 8 KV heads, head dim 128, bf16,
block 16) = 512 blocks = 1 GiB, gathered from non-contiguous blocks of P's pool into
non-contiguous blocks of D's pool, through each transport. Each figure is reported beside
the ceiling measured in the same run: GPU-to-GPU peer copy (--device cuda, as in
shared/device/ceilings.py) or a single-threaded host memcpy of the same bytes (--device cpu).

  GPU (2 GPUs: P on cuda:0, D on cuda:1):  python benchmarks/bench_kv_transfer.py
  CPU (host and tcp only):                 python benchmarks/bench_kv_transfer.py --device cpu

Prints one JSON line (also written to --out).  On --device cuda every transport pulls from
P's GPU: host goes through P's pinned shared-memory staging buffer (--staging-mib).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch

from pdserve.transfer import (
    KVLayout,
    KVSource,
    LeaseTable,
    RemoteKV,
    allocate_shared_kv_caches,
    unlink_shared_kv_caches,
)
from pdserve.transfer.transports import KVPuller


def source_main(
    conn, layout: KVLayout, num_blocks: int, device: str, shared: bool, staging: int
) -> None:
    """The prefill side: random caches, one lease over every block, a KVSource."""
    name = f"bench-{device.replace(':', '')}"
    if shared:
        caches = allocate_shared_kv_caches(layout, num_blocks, name)
    else:
        shape = layout.cache_shape(num_blocks)
        caches = [
            torch.empty(shape, dtype=layout.torch_dtype, device=device)
            for _ in range(layout.num_layers)
        ]
    for c in caches:
        c.normal_()
    leases = LeaseTable()
    leases.hold("bench", list(range(num_blocks)), ttl_s=3600)
    shm_name = name if shared else None
    source = KVSource(caches, layout, leases, shm_name=shm_name, staging_bytes=staging).start()
    conn.send(source.endpoint())
    while (msg := conn.recv()) != "stop":
        ids = torch.tensor(msg, device=caches[0].device)  # checksum of the blocks D pulled
        conn.send(sum(float(c.index_select(1, ids).double().sum()) for c in caches))
    source.close()
    if shared:
        unlink_shared_kv_caches(name)


def start_source(layout: KVLayout, num_blocks: int, device: str, shared: bool, staging: int):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=source_main, args=(child, layout, num_blocks, device, shared, staging)
    )
    proc.start()
    return proc, parent, parent.recv()


def sync(device: torch.device) -> None:
    """Wait for every GPU: peer copies and gathers may run on either."""
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def ceiling_gbps(device: torch.device, nbytes: int) -> tuple[str, float]:
    """Peer copy cuda:0 -> D's GPU (like ceilings.py), or a host memcpy on CPU."""
    if device.type == "cuda":
        a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        b = torch.empty(nbytes, dtype=torch.uint8, device=device)
        kind = "peer_copy_GBps" if device.index != 0 else "same_gpu_copy_GBps"
    else:
        a = torch.ones(nbytes, dtype=torch.uint8)
        b = torch.empty_like(a)
        kind = "host_memcpy_GBps"
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - start)
    return kind, nbytes / statistics.median(times[1:]) / 1e9


def bench_transport(
    name: str, layout: KVLayout, args: argparse.Namespace, device: torch.device
) -> dict:
    pool = args.blocks * 2  # P and D hold other requests' blocks too: ids are scattered
    on_gpu = device.type == "cuda"
    shared = name == "host" and not on_gpu  # CPU P: caches in shared memory; GPU P: staging
    staging = args.staging_mib << 20 if name == "host" and on_gpu else 0
    proc, conn, endpoint = start_source(
        layout, pool, "cuda:0" if on_gpu else "cpu", shared, staging
    )
    try:
        g = torch.Generator().manual_seed(0)
        if args.ids == "scattered":
            remote_ids = torch.randperm(pool, generator=g)[: args.blocks].tolist()
            local_ids = torch.randperm(pool, generator=g)[: args.blocks].tolist()
        else:  # blocks allocated in order on both sides: one run
            remote_ids = list(range(args.blocks // 2, args.blocks // 2 + args.blocks))
            local_ids = list(range(args.blocks))
        shape = layout.cache_shape(pool)
        local = [
            torch.zeros(shape, dtype=layout.torch_dtype, device=device)
            for _ in range(layout.num_layers)
        ]
        remote = RemoteKV("bench-p", "bench", remote_ids, layout, [endpoint])
        puller = KVPuller(layout, local, transport=name, timeout_s=300)
        seconds, nbytes = [], 0
        for _ in range(args.reps + 1):  # the first pull maps / connects: a warm-up
            sync(device)
            stats = puller.pull(remote, local_ids)
            sync(device)
            seconds.append(stats.seconds)
            nbytes = stats.bytes
        conn.send(remote_ids)
        want = conn.recv()
        got = sum(
            float(c.index_select(1, torch.tensor(local_ids, device=device)).double().sum())
            for c in local
        )
        puller.close()
        median = statistics.median(seconds[1:])
        return {
            "transport": name,
            "bytes": nbytes,
            "first_pull_s": round(seconds[0], 4),
            "median_s": round(median, 4),
            "GBps": round(nbytes / median / 1e9, 2),
            "checksum_ok": abs(got - want) <= 1e-6 * max(1.0, abs(want)),
        }
    finally:
        conn.send("stop")
        proc.join(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--staging-mib", type=int, default=256, help="GPU P's host staging")
    parser.add_argument(
        "--ids",
        default="scattered",
        choices=["scattered", "contiguous"],
        help="block ids on both sides: random (worst case) or one consecutive run",
    )
    parser.add_argument("--transports", default=None, help="comma list (default: all that apply)")
    parser.add_argument("--out", default=None, help="write the JSON result here too")
    args = parser.parse_args()
    args.blocks = -(-args.tokens // args.block_size)

    layout = KVLayout(args.dtype, args.block_size, args.layers, args.kv_heads, args.head_dim)
    if args.device == "cuda":
        device = torch.device("cuda", 1 if torch.cuda.device_count() > 1 else 0)
        names = ["cuda_ipc", "host", "tcp"]
    else:
        device, names = torch.device("cpu"), ["host", "tcp"]
    names = args.transports.split(",") if args.transports else names

    nbytes = args.blocks * layout.bytes_per_block
    ceiling_name, ceiling = ceiling_gbps(device, nbytes)
    result = {
        "bench": "kv_transfer",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "torch_threads": torch.get_num_threads(),
        "layout": layout.to_dict(),
        "tokens": args.tokens,
        "blocks": args.blocks,
        "ids": args.ids,
        "bytes": nbytes,
        ceiling_name: round(ceiling, 2),
        "results": [],
    }
    for name in names:
        r = bench_transport(name, layout, args, device)
        r["ratio_to_ceiling"] = round(r["GBps"] / ceiling, 3)
        result["results"].append(r)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    for r in result["results"]:
        print(
            f"{r['transport']:>9}: {r['GBps']:8.2f} GB/s  {r['median_s'] * 1e3:8.1f} ms  "
            f"{r['ratio_to_ceiling']:.3f} x {ceiling_name} ({ceiling:.1f})  ok={r['checksum_ok']}"
        )


if __name__ == "__main__":
    main()
