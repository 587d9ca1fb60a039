"""Same host, GPU to GPU: D maps P's KV cache tensors once through CUDA IPC and gathers blocks.

P's KVSource exports each layer's cache with torch's CUDA IPC reduction (a cudaIpcMemHandle
plus offsets, JSON-encoded) when D sends `open`. D rebuilds them **on its own device**:
cudaIpcOpenMemHandle maps P's memory into D's context and lazily enables peer access, so
one Triton launch on D's GPU (block_kernel.py) reads every block of every layer over
NVLink/PCIe and writes it straight into D's cache: no CUDA context on P's GPU, no staging
copy. `kernel=False` keeps the torch path (per layer, a gather into scratch and a scatter).
Reads are admitted (and P's blocks pinned) with `begin`/`end` like the host transport;
`begin`'s round trip overlaps the queued copy, and `end` goes unanswered
(see connections.admitted_copy).

Assumptions, to be checked by tests/transfer/test_cuda_ipc.py on a GPU machine:
- the KV of a request is complete on P's GPU once P has answered (it synced to sample);
- P keeps its cache tensors alive for its whole life (IPC mappings point into them).
Importing this module needs no GPU.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

import torch

from pdserve.transfer.block_plan import NotPlannable, Side
from pdserve.transfer.blockcopy import Scratch, copy_blocks
from pdserve.transfer.connections import ConnectedPuller, admitted_copy
from pdserve.transfer.host import local_host_id
from pdserve.transfer.layout import HeadSlice
from pdserve.transfer.protocol import PullStats, TransferError, pull_timeout_s
from pdserve.transfer.wire import Connection

# positions in torch.multiprocessing.reductions.rebuild_cuda_tensor's argument tuple
_ARG_NAMES = (
    "tensor_cls",
    "size",
    "stride",
    "offset",
    "storage_cls",
    "dtype",
    "device",
    "handle",
    "storage_size_bytes",
    "storage_offset_bytes",
    "requires_grad",
    "ref_counter_handle",
    "ref_counter_offset",
    "event_handle",
    "event_sync_required",
)
_BYTES = ("handle", "ref_counter_handle", "event_handle")


def gpu_uuid(device: torch.device) -> str | None:
    """The GPU's UUID (the same in every process, whatever CUDA_VISIBLE_DEVICES says)."""
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def peer_reachable(uuid: str | None, local: torch.device) -> bool:
    """Whether `local` can read the GPU `uuid`: same GPU, or peer access (assumed if unseen)."""
    if uuid is None or local.type != "cuda":
        return False
    for i in range(torch.cuda.device_count()):
        if gpu_uuid(torch.device("cuda", i)) == uuid:
            return i == local.index or torch.cuda.can_device_access_peer(local.index, i)
    return True  # P's GPU is hidden from this process; cudaIpcOpenMemHandle will tell


def export_kv_caches(kv_caches: list[torch.Tensor]) -> list[dict]:
    """P side: a JSON-able IPC description of each layer's cache (fresh ref counters per call)."""
    from torch.multiprocessing.reductions import reduce_tensor

    out = []
    for t in kv_caches:
        _, args = reduce_tensor(t)
        d = dict(zip(_ARG_NAMES, args, strict=True))
        del d["tensor_cls"], d["storage_cls"]  # rebuilt as torch.Tensor / TypedStorage
        d["size"], d["stride"] = list(d["size"]), list(d["stride"])
        d["dtype"] = str(d["dtype"]).removeprefix("torch.")
        for k in _BYTES:
            d[k] = None if d[k] is None else base64.b64encode(d[k]).decode()
        out.append(d)
    return out


def import_kv_caches(layers: list[dict], device: torch.device) -> list[torch.Tensor]:
    """D side: map the exported caches into `device`'s address space (peer access if remote)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    tensors = []
    for d in layers:
        d = dict(d)
        for k in _BYTES:
            d[k] = None if d[k] is None else base64.b64decode(d[k])
        d["tensor_cls"], d["storage_cls"] = torch.Tensor, torch.storage.TypedStorage
        d["dtype"] = getattr(torch, d["dtype"])
        d["size"], d["stride"] = torch.Size(d["size"]), tuple(d["stride"])
        # P's device index means nothing here (CUDA_VISIBLE_DEVICES differ): open on ours
        d["device"] = device.index if device.index is not None else torch.cuda.current_device()
        tensors.append(rebuild_cuda_tensor(*(d[name] for name in _ARG_NAMES)))
    return tensors


@dataclass
class CudaIpcPuller(ConnectedPuller):
    """D side of the cuda_ipc transport: maps each source's caches once, gathers with peer reads.

    The mapping lives on the connection to the source (see connections.py), reused across pulls.
    """

    name: str = "cuda_ipc"
    kernel: bool = True  # False: torch's gather + scatter per layer (the path it replaced)
    _scratch: Scratch = field(default_factory=Scratch)  # one layer's gather, on D's GPU
    _local_side: tuple[list[torch.Tensor], Side | None] | None = None  # D's caches, planned

    def pull(
        self,
        endpoint: dict,
        remote_request_id: str,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        kv_caches: list[torch.Tensor],
        heads: HeadSlice | None = None,
        release: bool = False,
        *,
        lease_token: str,
    ) -> PullStats:
        """Copy remote blocks into `local_block_ids` of `kv_caches`; TransferError on failure."""
        if len(remote_block_ids) != len(local_block_ids):
            raise ValueError("remote and local block lists differ in length")
        device = kv_caches[0].device
        if device.type != "cuda" or "cuda_ipc" not in endpoint.get("transports", []):
            raise TransferError("cuda_ipc needs CUDA caches on both sides")
        if endpoint.get("host_id") != local_host_id():
            raise TransferError("cuda_ipc needs the source on this host")
        start = time.perf_counter()

        stream = self.own_stream(device)

        def exchange(conn: Connection) -> tuple[int, bool, bool]:
            remote, remote_side = self._mapping(conn, device)
            if len(remote) != len(kv_caches):
                raise TransferError(f"{len(remote)} remote layers, {len(kv_caches)} local")
            local_side = self._side_of(kv_caches)
            sides = None if remote_side is None or local_side is None else (remote_side,
                                                                            local_side)

            def copy() -> int:  # queued on the device: `begin`'s round trip runs meanwhile
                with torch.cuda.device(device), torch.cuda.stream(stream):
                    return copy_blocks(remote, remote_block_ids, kv_caches, local_block_ids,
                                       heads, self._scratch, self.kernel, sides)

            def finish() -> None:  # the copy is done before `end` unpins P's blocks
                stream.synchronize()

            return admitted_copy(conn, remote_request_id, remote_block_ids, copy, finish,
                                 release, lease_token=lease_token)

        budget = pull_timeout_s(self.timeout_s, kv_caches, len(local_block_ids))
        nbytes, released = self._run_pull(endpoint, remote_request_id, budget, exchange,
                                          (RuntimeError, IndexError, KeyError, TypeError, OSError))
        return PullStats(self.name, len(local_block_ids), nbytes, time.perf_counter() - start,
                         released)

    def _mapping(self, conn: Connection, device: torch.device
                 ) -> tuple[list[torch.Tensor], Side | None]:
        """P's caches mapped on `device`, and the copy kernel's view of them (None: the
        kernel cannot read them), both made once per connection."""
        key = f"cuda_ipc:{device}"
        if key not in conn.mappings:
            layers = conn.call({"op": "open", "transport": "cuda_ipc"})["mapping"]["layers"]
            caches = import_kv_caches(layers, device)
            conn.mappings[key] = caches, _side(caches)
        return conn.mappings[key]

    def _side_of(self, kv_caches: list[torch.Tensor]) -> Side | None:
        """The kernel's view of D's caches: the same list every pull, so planned once."""
        seen = self._local_side
        if seen is None or seen[0] is not kv_caches or (
                seen[1] is not None and seen[1].addresses[0] != kv_caches[0].data_ptr()):
            self._local_side = kv_caches, _side(kv_caches)  # holds the list: its id stays its
        return self._local_side[1]


def _side(caches: list[torch.Tensor]) -> Side | None:
    try:
        return Side.of(caches, 0)
    except NotPlannable:
        return None
