"""The one owner of an engine's KV caches: every rank's, allocated here by role and device.

    colocated   plain tensors: rank 0's here, each tensor-parallel worker's in its own process
    P and D     caches other processes can map, for the connector to serve and fill:
                on CPU every rank's in shared memory, allocated here (workers map theirs);
                on GPU rank 0's here, each worker's in its own process, exported over CUDA
                IPC (`allocate_worker_caches`) and mapped here (`KVCaches.adopt_exports`)

The runner, the tensor-parallel workers and the KV connector receive these caches; none of
them allocates its own.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from pdserve.transfer.cuda_ipc import export_kv_caches, import_kv_caches
from pdserve.transfer.host import (
    allocate_shared_kv_caches,
    describe_shared_kv_caches,
    map_shared_kv_caches,
    unlink_shared_kv_caches,
)
from pdserve.transfer.layout import KVLayout


@dataclass
class RankCaches:
    """One tensor-parallel rank's KV caches as rank 0's process sees them."""

    layout: KVLayout  # with this rank's tp_rank
    kv_caches: list[torch.Tensor] | None  # None: a worker's own (colocated, or GPU not mapped yet)
    shm_name: str | None = None  # CPU: the shared-memory file rank 0 allocated for the rank
    ipc_layers: list[dict] | None = None  # GPU worker: its own CUDA IPC export of the caches

    def shared_description(self) -> dict | None:
        """What a CPU worker needs to map its caches (None: a GPU worker allocates its own)."""
        if self.shm_name is None or self.kv_caches is None:
            return None
        return describe_shared_kv_caches(self.kv_caches, self.shm_name)

    def adopt_export(self, layers: list[dict], device: torch.device) -> None:
        """Map a GPU worker's caches from its CUDA IPC export (onto its GPU, `device`)."""
        self.ipc_layers = layers
        self.kv_caches = import_kv_caches(layers, device)


@dataclass
class KVCaches:
    """Every rank's KV caches of one engine; `local` is rank 0's, which its runner uses."""

    layout: KVLayout  # rank 0's
    num_blocks: int
    ranks: list[RankCaches]
    shared: bool  # P and D: other processes map them (a KV connector serves and fills them)

    @classmethod
    def allocate(cls, layout: KVLayout, num_blocks: int, device: torch.device,
                 role: str) -> KVCaches:
        """The caches of an engine of `role` ("colocated", "prefill" or "decode")."""
        shared = role != "colocated"
        ranks = [_allocate_rank(layout.for_rank(rank), num_blocks, device, shared)
                 for rank in range(layout.tp_size)]
        return cls(layout, num_blocks, ranks, shared)

    @property
    def local(self) -> list[torch.Tensor]:
        caches = self.ranks[0].kv_caches
        assert caches is not None
        return caches

    def worker_plan(self) -> list[dict | None] | None:
        """What each worker (rank r at r - 1) does: None for all, allocate plain caches;
        per worker, a shared-memory description to map (CPU) or None to allocate and export
        (GPU). See `allocate_worker_caches`."""
        if not self.shared:
            return None
        return [rank.shared_description() for rank in self.ranks[1:]]

    def adopt_exports(self, exports: list[list[dict] | None],
                      devices: list[torch.device]) -> None:
        """Map the GPU workers' exported caches (rank r's export and device at r - 1)."""
        for rank, export, device in zip(self.ranks[1:], exports, devices):
            if export is not None:
                rank.adopt_export(export, device)

    def close(self) -> None:
        """Unlink the shared-memory files (mappings stay valid until dropped)."""
        for rank in self.ranks:
            if rank.shm_name:
                unlink_shared_kv_caches(rank.shm_name)


def _allocate_rank(layout: KVLayout, num_blocks: int, device: torch.device,
                   shared: bool) -> RankCaches:
    if shared and device.type == "cpu":
        name = f"kv-{uuid.uuid4().hex[:8]}"
        return RankCaches(layout, allocate_shared_kv_caches(layout, num_blocks, name), name)
    if layout.tp_rank == 0:
        return RankCaches(layout, layout.zeros(num_blocks, device))
    return RankCaches(layout, None)  # allocated by the worker, in its own process


def allocate_worker_caches(plan: list[dict | None] | None, rank: int, shape: tuple[int, ...],
                           num_layers: int, dtype: torch.dtype, device: torch.device
                           ) -> tuple[list[torch.Tensor], list[dict] | None]:
    """A tensor-parallel worker's side of `KVCaches.worker_plan` (in the worker's process):
    its caches, and their CUDA IPC export when rank 0 must map them."""
    mine = None if plan is None else plan[rank - 1]
    if mine is not None:
        return map_shared_kv_caches(mine), None
    caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    return caches, export_kv_caches(caches) if plan is not None else None
