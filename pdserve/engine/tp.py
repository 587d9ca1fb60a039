"""Tensor parallelism's plumbing: the process group and the wire format of one step's inputs.

Rank 0 builds a step's inputs once (`InputBuilder`) and sends them to the other ranks as one
flat int32 array over a pipe; each worker rebuilds the same `StepInputs` on its own device.
The pipe, not a collective, carries the step because a worker waits on it while the engine
is idle: a collective would hit the process group's timeout (NCCL's watchdog aborts the
process) after a few idle minutes, and a pipe also tells a worker at once that rank 0 died.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from pdserve import switches
from pdserve.engine.batch_inputs import InputBuilder, StepInputs
from pdserve.kernels.attention import AttentionMetadata

# NVLink SHARP / multicast off on every rank: not all lent machines support it (KINDS.md)
NCCL_SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
HEADER = 5  # tokens, sequences, block-table width, sampling rows, ids follow (0/1)
SHARE_GPUS_ENV = switches.env_name("tp_share_gpus")


@dataclass
class TPSpec:
    """What every rank needs to load its shard and join the group (pickled to the workers)."""

    model: str | None
    dtype: torch.dtype
    device_type: str  # "cuda" or "cpu"; rank r runs on cuda:r (CUDA_VISIBLE_DEVICES-relative)
    tp_size: int
    seed: int = 0
    cpu_threads: int = 1
    timeout_s: float = 120.0  # a collective that waits longer raises (a hung or dead rank)
    max_model_len: int | None = None  # GPU RoPE tables' length; None = the model's maximum
    num_gpus: int = 0  # visible GPUs; fewer than tp_size only with PDSERVE_TP_SHARE_GPUS=1

    @property
    def shares_gpus(self) -> bool:
        """Ranks share GPUs (a test mode): gloo instead of NCCL, which refuses two ranks on
        one GPU, and no CUDA graphs, which cannot capture gloo's collectives."""
        return self.device_type == "cuda" and self.num_gpus < self.tp_size

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" and not self.shares_gpus else "gloo"

    def device(self, rank: int) -> torch.device:
        if self.device_type != "cuda":
            return torch.device("cpu")
        return torch.device("cuda", rank % self.num_gpus if self.shares_gpus else rank)


def visible_gpus_for(tp_size: int) -> int:
    """The number of visible GPUs, checked against the TP size: fewer GPUs than ranks is an
    error unless $PDSERVE_TP_SHARE_GPUS=1 asks for the test mode in which ranks share them."""
    count = torch.cuda.device_count()
    if count < tp_size and not switches.SWITCHES.tp_share_gpus:
        raise ValueError(
            f"--tensor-parallel-size {tp_size} needs {tp_size} GPUs but {count} are visible "
            f"(check CUDA_VISIBLE_DEVICES); {SHARE_GPUS_ENV}=1 runs the ranks on shared GPUs "
            "over gloo, for testing only")
    return count


def make_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store on a port the OS picks (no free-port race)."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def join_group(spec: TPSpec, rank: int, port: int, store: dist.TCPStore | None = None) -> None:
    """Join the default process group as `rank`; the model's all-reduces use it."""
    os.environ.update(NCCL_SAFE_ENV)
    timeout = timedelta(seconds=spec.timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, spec.tp_size, is_master=False, timeout=timeout)
    if spec.device_type == "cuda":
        torch.cuda.set_device(spec.device(rank))
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.tp_size,
                            timeout=timeout)


def pack_step(builder: InputBuilder, x: StepInputs, ids_follow: bool = False) -> np.ndarray:
    """One step's inputs as a flat int32 array, read from the builder's host buffers.

    The host buffers, not `x`, so that rank 0 never waits on a device-to-host copy; int32
    halves the bytes (the block table dominates) and holds every id, position and slot.
    `ids_follow`: some input ids are not known on the host yet (async scheduling); rank 0
    broadcasts the step's ids once it has them on the device (`broadcast_ids`).
    """
    host = builder.last
    t, n = x.input_ids.shape[0], x.sample_rows.shape[0]
    b, width = x.meta.block_tables.shape
    return np.concatenate([
        np.array([t, b, width, n, int(ids_follow)], dtype=np.int32),
        host.ids, host.pos, host.slots, host.starts, host.seq_lens, host.tables.ravel(), host.rows,
    ], dtype=np.int32, casting="same_kind")


def ids_follow(payload: np.ndarray) -> bool:
    """Rank 0 broadcasts this step's input ids after the packed step (`pack_step`)."""
    return bool(payload[4])


def broadcast_ids(x: StepInputs) -> None:
    """Every rank: rank 0's input ids of the step (some known only on its device)."""
    dist.broadcast(x.input_ids, src=0)


def unpack_step(payload: np.ndarray, device: torch.device) -> StepInputs:
    """The `StepInputs` rank 0 built, on this rank's device."""
    t, b, width, n = (int(v) for v in payload[:4])
    sizes = [t, t, t, b + 1, b, b * width, n]
    ids, pos, slots, starts, seq_lens, tables, rows = np.split(
        payload[HEADER:], np.cumsum(sizes)[:-1])
    query_lens, lens = np.diff(starts).tolist(), seq_lens.tolist()

    def ship(a: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    meta = AttentionMetadata(
        query_start_loc=ship(starts, torch.int32), seq_lens=ship(seq_lens, torch.int32),
        block_tables=ship(tables.reshape(b, width), torch.int32), slot_mapping=ship(slots),
        max_query_len=max(query_lens), max_seq_len=max(lens),
        query_lens_cpu=query_lens, seq_lens_cpu=lens,
    )
    return StepInputs(ship(ids), ship(pos), meta, ship(rows), b, max(query_lens) == 1)
