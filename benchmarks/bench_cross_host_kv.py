"""Cross-host KV: the TCP transport's pull rate as a ratio to the link it runs on.

A prefill-side process holds random KV caches (CPU) and a KVSource; this process pulls one
prompt's blocks (scattered ids on both sides) with KVPuller(transport="tcp"), as a decode
instance on another host does. The ceiling is measured on the same path in the same run: a
plain TCP sender process writing the same number of bytes from memory (one `sendall`) to a
receiver here reading them into memory (`recv_into`), one stream, as the transport uses.
The ratio is pull GB/s over that ceiling: what framing, the lease round trip, P's gather
and D's scatter cost on top of the wire.

Paths:
  loopback  P on 127.0.0.1, D in this process.
  veth      P in one network namespace, D in another, joined by a veth pair with
            10.250.N.1/.2 inside them only (tests/launch/netns.py; needs root and `ip`);
            skipped with the reason where namespaces are not permitted.

  PYTHONPATH=$PWD python benchmarks/bench_cross_host_kv.py --out benchmarks/results/X.json

Default shape: Llama-3.1-8B's KV (32 layers, 8 KV heads, head dim 128, bf16, block 16) for
a 2k-token prompt = 256 MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import time

import torch

from pdserve.security import DeploymentSecret
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.params import RemoteKV
from pdserve.transfer.source import KVSource
from pdserve.transfer.transports import KVPuller
from tests.launch.netns import NetnsPair, NetnsUnavailable

SECRET = DeploymentSecret.from_text("bench-cross-host-kv-deployment-secret")
TOKEN = "bench-lease-token"
CHUNK = 4 << 20  # the ceiling's receiver reads at most this much per recv_into


def source_main(conn, layout: KVLayout, num_blocks: int, host: str) -> None:
    """P: random caches, one lease over every block, a KVSource on `host`."""
    torch.manual_seed(0)
    caches = [torch.randn(layout.cache_shape(num_blocks)).to(layout.torch_dtype)
              for _ in range(layout.num_layers)]
    leases = LeaseTable()
    leases.hold("bench", list(range(num_blocks)), ttl_s=3600, token=TOKEN)
    source = KVSource(caches, layout, leases, bind_host=host, secret=SECRET).start()
    conn.send(source.endpoint())
    while (msg := conn.recv()) != "stop":
        ids = torch.tensor(msg)  # the checksum of the blocks D pulls
        conn.send(sum(float(c.index_select(1, ids).double().sum()) for c in caches))
    source.close()


def sender_main(conn, host: str, nbytes: int) -> None:
    """The ceiling's sender: on each request byte, `sendall` nbytes from memory."""
    data = bytearray(os.urandom(1 << 20)) * (nbytes >> 20) + bytearray(nbytes % (1 << 20))
    with socket.create_server((host, 0)) as server:
        conn.send(server.getsockname()[1])
        peer, _ = server.accept()
        with peer:
            while peer.recv(1):
                peer.sendall(data)


def spawn(target, *args) -> tuple[mp.Process, object, object]:
    """A spawned child (in this thread's network namespace) and its first message."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    return proc, parent, parent.recv()


def ceiling_gbps(host: str, nbytes: int, reps: int, enter, inside) -> float:
    """Median GB/s of one TCP stream moving `nbytes` from a sender process to this one."""
    with enter():
        proc, conn, port = spawn(sender_main, host, nbytes)
    buf = bytearray(nbytes)
    view = memoryview(buf)
    times = []
    try:
        with inside(), socket.create_connection((host, port), timeout=60) as sock:
            for _ in range(reps + 1):  # the first: slow start and page faults
                start = time.perf_counter()
                sock.sendall(b"g")
                got = 0
                while got < nbytes:
                    n = sock.recv_into(view[got:], min(CHUNK, nbytes - got))
                    if n == 0:
                        raise ConnectionError("sender closed")
                    got += n
                times.append(time.perf_counter() - start)
    finally:
        proc.kill()
        proc.join(10)
    return nbytes / statistics.median(times[1:]) / 1e9


def pull_gbps(layout: KVLayout, blocks: int, host: str, reps: int, enter, inside) -> dict:
    """Median GB/s of KVPuller(transport="tcp") pulls of `blocks` scattered blocks."""
    pool = blocks * 2  # both sides hold other requests' blocks too: ids are scattered
    with enter():
        proc, conn, endpoint = spawn(source_main, layout, pool, host)
    try:
        g = torch.Generator().manual_seed(0)
        remote_ids = torch.randperm(pool, generator=g)[:blocks].tolist()
        local_ids = torch.randperm(pool, generator=g)[:blocks].tolist()
        local = [torch.zeros(layout.cache_shape(pool), dtype=layout.torch_dtype)
                 for _ in range(layout.num_layers)]
        conn.send(remote_ids)
        want = conn.recv()
        remote = RemoteKV("bench-p", "bench", remote_ids, layout, [endpoint], TOKEN)
        seconds, nbytes = [], 0
        with inside():
            puller = KVPuller(layout, local, transport="tcp", timeout_s=300, secret=SECRET)
            for _ in range(reps + 1):  # the first connects and warms the buffers
                stats = puller.pull(remote, local_ids)
                seconds.append(stats.seconds)
                nbytes = stats.bytes
            puller.close()
        ids = torch.tensor(local_ids)
        got = sum(float(c.index_select(1, ids).double().sum()) for c in local)
        median = statistics.median(seconds[1:])
        return {"bytes": nbytes, "first_pull_s": round(seconds[0], 4),
                "median_s": round(median, 5), "GBps": round(nbytes / median / 1e9, 3),
                "checksum_ok": abs(got - want) <= 1e-6 * max(1.0, abs(want)),
                "transport": stats.transport}
    finally:
        conn.send("stop")
        proc.join(30)


def bench_path(name: str, host: str, enter, inside, layout: KVLayout,
               args: argparse.Namespace) -> dict:
    nbytes = args.blocks * layout.bytes_per_block
    ceiling = ceiling_gbps(host, nbytes, args.reps, enter, inside)
    pull = pull_gbps(layout, args.blocks, host, args.reps, enter, inside)
    return {"path": name, "host": host, "socket_ceiling_GBps": round(ceiling, 3), **pull,
            "ratio_to_ceiling": round(pull["GBps"] / ceiling, 3)}


def machine_state() -> dict:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg_1m": round(load[0], 2),
            "torch_threads": torch.get_num_threads(), "kernel": platform.release(),
            "note": "smoke: machine shared with other sessions' tests; not an idle machine"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the JSON result here too")
    args = parser.parse_args()
    args.blocks = -(-args.tokens // args.block_size)
    layout = KVLayout(args.dtype, args.block_size, args.layers, args.kv_heads, args.head_dim)

    here = contextlib.nullcontext
    result = {"bench": "cross_host_kv",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine_state(), "layout": layout.to_dict(), "tokens": args.tokens,
              "ceiling": "one TCP stream, sendall from memory -> recv_into memory, same path",
              "results": []}
    result["results"].append(bench_path("loopback", "127.0.0.1", here, here, layout, args))
    net = NetnsPair()
    try:
        net.create()
        row = bench_path("veth", net.address("p"), lambda: net.inside("p"),
                         lambda: net.inside("d"), layout, args)
        result["results"].append(row)
    except NetnsUnavailable as exc:
        result["veth_skipped"] = str(exc)
    finally:
        net.delete()
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    for r in result["results"]:
        print(f"{r['path']:>8}: tcp pull {r['GBps']:7.3f} GB/s, socket ceiling "
              f"{r['socket_ceiling_GBps']:7.3f} GB/s, ratio {r['ratio_to_ceiling']:.3f}, "
              f"ok={r['checksum_ok']}")


if __name__ == "__main__":
    main()
