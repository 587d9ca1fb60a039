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
cuda_ipc is the one-launch Triton block copy; cuda_ipc_torch the per-layer gather + scatter
it replaced. For both, "pull" rows time whole pulls (lease round trips over P's socket
included) and "copy" rows the copy alone on the mapped caches; both --ipc-reps runs.
`--tiles 16:8,32:8` adds copy rows of the kernel at other tile sizes (KiB) and max warps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass

import torch

from pdserve.security import DeploymentSecret
from pdserve.transfer.block_kernel import launch
from pdserve.transfer.block_plan import plan_block_copy
from pdserve.transfer.blockcopy import Scratch, copy_blocks
from pdserve.transfer.connections import SourceConnections
from pdserve.transfer.cuda_ipc import CudaIpcPuller, import_kv_caches
from pdserve.transfer.host import allocate_shared_kv_caches, unlink_shared_kv_caches
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.params import RemoteKV
from pdserve.transfer.source import KVSource
from pdserve.transfer.transports import KVPuller
from pdserve.transfer.wire import Connection

# both sides of the bench hold the same deployment secret (the source runs in a child)
SECRET = DeploymentSecret.from_text("bench-kv-transfer-deployment-secret")
TOKEN = "bench-lease-token"


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
    leases.hold("bench", list(range(num_blocks)), ttl_s=3600, token=TOKEN)
    shm_name = name if shared else None
    source = KVSource(caches, layout, leases, shm_name=shm_name, staging_bytes=staging,
                      secret=SECRET).start()
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


def median_seconds(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median wall time of `fn` over `reps` runs after `warmup`, every GPU synced around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceiling_gbps(device: torch.device, nbytes: int, reps: int) -> tuple[str, float]:
    """Peer copy cuda:0 -> D's GPU (like ceilings.py), or a host memcpy on CPU."""
    if device.type == "cuda":
        a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        b = torch.empty(nbytes, dtype=torch.uint8, device=device)
        kind = "peer_copy_GBps" if device.index != 0 else "same_gpu_copy_GBps"
    else:
        a = torch.ones(nbytes, dtype=torch.uint8)
        b = torch.empty_like(a)
        kind = "host_memcpy_GBps"
    return kind, nbytes / median_seconds(lambda: b.copy_(a), device, reps) / 1e9


@dataclass
class Checked:
    """D's caches and what P says the pulled blocks sum to: every row is checked on its own."""

    local: list[torch.Tensor]
    local_ids: list[int]
    want: float

    def reset(self) -> None:
        for c in self.local:
            c.zero_()

    def ok(self) -> bool:
        ids = torch.tensor(self.local_ids, device=self.local[0].device)
        got = sum(float(c.index_select(1, ids).double().sum()) for c in self.local)
        return abs(got - self.want) <= 1e-6 * max(1.0, abs(self.want))


def copy_rows(
    endpoint: dict,
    remote_ids: list[int],
    checked: Checked,
    device: torch.device,
    args: argparse.Namespace,
) -> list[dict]:
    """cuda_ipc's copy alone on P's mapped caches: the kernel, its tile variants, torch's path."""
    with Connection(endpoint, 60, secret=SECRET) as conn:
        layers = conn.call({"op": "open", "transport": "cuda_ipc"})["mapping"]["layers"]
    remote = import_kv_caches(layers, device)  # the bench's lease covers every block
    local, local_ids = checked.local, checked.local_ids
    scratch = Scratch()
    variants = {
        "cuda_ipc": lambda: copy_blocks(remote, remote_ids, local, local_ids, None),
        "cuda_ipc_torch": lambda: copy_blocks(
            remote, remote_ids, local, local_ids, None, scratch, kernel=False
        ),
    }
    plan = plan_block_copy(remote, remote_ids, local, local_ids, None)
    for tile in filter(None, (args.tiles or "").split(",")):
        kib, warps = (int(x) for x in tile.split(":"))
        variants[f"cuda_ipc_tile{kib}k_w{warps}"] = (
            lambda kib=kib, warps=warps: launch(plan, device, kib << 10, warps)
        )
    rows = []
    for name, fn in variants.items():
        checked.reset()
        median = median_seconds(fn, device, args.ipc_reps)
        rows.append({
            "transport": name,
            "scope": "copy",
            "bytes": plan.nbytes,
            "median_s": round(median, 6),
            "GBps": round(plan.nbytes / median / 1e9, 2),
            "checksum_ok": checked.ok(),
        })
    return rows


def pull_fn(name: str, layout: KVLayout, endpoint: dict, remote_ids: list[int], checked: Checked):
    """(puller, one pull) for transport `name`; cuda_ipc_torch is cuda_ipc without the kernel."""
    local, local_ids = checked.local, checked.local_ids
    if name == "cuda_ipc_torch":
        ipc = CudaIpcPuller(timeout_s=300, kernel=False, conns=SourceConnections(SECRET))
        return ipc, lambda: ipc.pull(endpoint, "bench", remote_ids, local_ids, local,
                                     lease_token=TOKEN)
    puller = KVPuller(layout, local, transport=name, timeout_s=300, secret=SECRET)
    remote = RemoteKV("bench-p", "bench", remote_ids, layout, [endpoint], TOKEN)
    return puller, lambda: puller.pull(remote, local_ids)


def bench_transport(
    name: str, layout: KVLayout, args: argparse.Namespace, device: torch.device
) -> list[dict]:
    """The pull row of transport `name`, and for cuda_ipc the copy rows after it."""
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
        conn.send(remote_ids)  # checksum of the blocks D pulls
        checked = Checked(local, local_ids, conn.recv())
        puller, pull = pull_fn(name, layout, endpoint, remote_ids, checked)
        seconds, nbytes = [], 0
        reps = args.ipc_reps if name.startswith("cuda_ipc") else args.reps
        for _ in range(reps + 1):  # the first pull maps / connects / compiles: a warm-up
            sync(device)
            stats = pull()
            sync(device)
            seconds.append(stats.seconds)
            nbytes = stats.bytes
        puller.close()
        median = statistics.median(seconds[1:])
        rows = [{
            "transport": name,
            "scope": "pull",
            "bytes": nbytes,
            "first_pull_s": round(seconds[0], 4),
            "median_s": round(median, 6),
            "GBps": round(nbytes / median / 1e9, 2),
            "checksum_ok": checked.ok(),
        }]
        if name == "cuda_ipc":
            rows += copy_rows(endpoint, remote_ids, checked, device, args)
        return rows
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
    parser.add_argument("--reps", type=int, default=5, help="pulls of host and tcp")
    parser.add_argument("--ipc-reps", type=int, default=50, help="cuda_ipc pulls and copies")
    parser.add_argument("--tiles", default=None, help="kernel copy rows: KiB:max_warps,...")
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
        names = ["cuda_ipc", "cuda_ipc_torch", "host", "tcp"]
    else:
        device, names = torch.device("cpu"), ["host", "tcp"]
    names = args.transports.split(",") if args.transports else names

    nbytes = args.blocks * layout.bytes_per_block
    ceiling_name, ceiling = ceiling_gbps(device, nbytes, args.ipc_reps)
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
        for r in bench_transport(name, layout, args, device):
            r["ratio_to_ceiling"] = round(r["GBps"] / ceiling, 3)
            result["results"].append(r)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    for r in result["results"]:
        print(
            f"{r['transport']:>22} {r['scope']:>4}: {r['GBps']:8.2f} GB/s  "
            f"{r['median_s'] * 1e3:8.2f} ms  "
            f"{r['ratio_to_ceiling']:.3f} x {ceiling_name} ({ceiling:.1f})  ok={r['checksum_ok']}"
        )


if __name__ == "__main__":
    main()
