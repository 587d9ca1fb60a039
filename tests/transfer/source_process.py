"""A prefill-side KVSource in its own process, driven from a test through a pipe."""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass

import torch

from pdserve.security import DeploymentSecret
from pdserve.transfer.host import allocate_shared_kv_caches, unlink_shared_kv_caches
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.source import KVSource

TOKEN = "test-lease-token"  # every lease of a source process: the pull tests' capability


def deployment_secret() -> DeploymentSecret:
    """The deployment secret tests/conftest.py puts in the environment (spawned children too)."""
    secret = DeploymentSecret.from_env()
    assert secret is not None, "tests/conftest.py sets $PDSERVE_DEPLOYMENT_SECRET"
    return secret


def random_caches(layout: KVLayout, num_blocks: int, seed: int, device: str = "cpu") -> list:
    """Deterministic random caches: the test rebuilds them to check bytes (bit-exact)."""
    caches = []
    for layer in range(layout.num_layers):
        g = torch.Generator().manual_seed(seed * 1000 + layer)
        t = torch.randn(layout.cache_shape(num_blocks), generator=g)
        caches.append(t.to(device=device, dtype=layout.torch_dtype))
    return caches


def _rank_source(
    layout: KVLayout,
    num_blocks: int,
    seed: int,
    shared: bool,
    device: str,
    leases: LeaseTable,
    staging_bytes: int,
) -> KVSource:
    caches = random_caches(layout, num_blocks, seed, device)
    shm_name = None
    if shared:
        shm_name = f"test-{seed}"
        shared_caches = allocate_shared_kv_caches(layout, num_blocks, shm_name)
        for dst, src in zip(shared_caches, caches):
            dst.copy_(src)
        caches = shared_caches
    return KVSource(caches, layout, leases, shm_name=shm_name, staging_bytes=staging_bytes,
                    secret=deployment_secret()).start()


def _serve(
    conn, layout: KVLayout, num_blocks: int, seed: int, shared: bool, device: str, staging: int
) -> None:
    # one source per TP rank (rank r's caches from seed + r), sharing one lease table
    leases = LeaseTable()
    sources = [
        _rank_source(layout.for_rank(r), num_blocks, seed + r, shared, device, leases, staging)
        for r in range(layout.tp_size)
    ]
    conn.send([s.endpoint() for s in sources])
    while True:
        op, *args = conn.recv()
        if op == "hold":  # answers the lease's token
            conn.send(leases.hold(*args, token=TOKEN).token)
        elif op == "release":
            conn.send(leases.release(*args, TOKEN))
        elif op == "expire":
            conn.send(leases.expire())
        elif op == "stop":
            for source in sources:
                source.close()
                if source.shm_name:
                    unlink_shared_kv_caches(source.shm_name)  # what the engine does on shutdown
            conn.send(True)
            return


@dataclass
class SourceProcess:
    """Handle on a running source process."""

    process: mp.Process
    conn: object
    endpoints: list[dict]  # one per TP rank

    @property
    def endpoint(self) -> dict:
        return self.endpoints[0]

    def call(self, *msg):
        self.conn.send(msg)
        return self.conn.recv()

    def stop(self) -> None:
        if self.process.is_alive():
            self.call("stop")
        self.process.join(10)


def start_source(
    layout: KVLayout,
    num_blocks: int,
    seed: int,
    shared: bool = False,
    device: str = "cpu",
    staging_bytes: int = 0,
) -> SourceProcess:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(
        target=_serve,
        args=(child, layout, num_blocks, seed, shared, device, staging_bytes),
        daemon=True,
    )
    process.start()
    if not parent.poll(60):
        process.kill()
        raise RuntimeError("source process did not start")
    return SourceProcess(process, parent, parent.recv())
