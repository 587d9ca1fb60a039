"""Same host, CPU caches: P's KV caches live in a /dev/shm file that D maps once and copies from.

P allocates its caches with `allocate_shared_kv_caches` (one file, all layers back to back)
and unlinks it at shutdown. D asks P's KVSource once for the file and the layer offsets,
maps it read-only, and for each pull asks P to admit the read (`begin`: the lease covers the
blocks, and P pins them), copies with one index_select + index_copy_ per layer, then tells
P the read is over (`end`, unanswered): P frees or reuses no pinned block mid-copy.

Caches not in shared memory (GPU caches; KVSource(staging_bytes=...)): P gathers the
blocks into a pinned staging buffer in /dev/shm as many layers at a time as it holds
(`stage`, staging.py) and D copies each chunk out. On one host cuda_ipc is the better
path for GPUs; this one serves GPUs without peer access, and GPU P -> CPU D.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import math
import mmap
import os
import socket
import stat
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from pdserve import switches
from pdserve.shm import (  # noqa: F401  (the files' names and cleanup, re-exported)
    SHM_DIR,
    SHM_PREFIX,
    remove_stale_shared_kv_caches,
    shared_kv_path,
    unlink_shared_kv_caches,
    unlink_shared_kv_files_of,
)
from pdserve.transfer.blockcopy import Scratch, as_index, copy_blocks, scatter_blocks
from pdserve.transfer.connections import ConnectedPuller, admitted_copy
from pdserve.transfer.layout import DTYPES, HeadSlice, KVLayout
from pdserve.transfer.protocol import PullStats, TransferError, pull_timeout_s
from pdserve.transfer.wire import Connection

log = logging.getLogger(__name__)

CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: D maps P's buffer read-only


def local_host_id() -> str:
    """Identifies this host, so two engines can tell they share /dev/shm (and GPUs):
    $PDSERVE_HOST_ID where set (a Ray node, a network namespace), else machine and boot."""
    return switches.SWITCHES.host_id or machine_id()


@functools.cache
def machine_id() -> str:
    """This machine's name and boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown"
    return f"{socket.gethostname()}/{boot}"


def allocate_shared_bytes(nbytes: int, name: str) -> torch.Tensor:
    """A uint8 tensor backed by a new /dev/shm file (unlinked at exit at the latest)."""
    path = shared_kv_path(name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)  # never adopt a stale file
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    atexit.register(unlink_shared_kv_caches, name)
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def allocate_shared_kv_caches(layout: KVLayout, num_blocks: int, name: str) -> list[torch.Tensor]:
    """KV caches (one tensor per layer, `layout.cache_shape(num_blocks)`) in shared memory.

    The file is unlinked by `unlink_shared_kv_caches(name)` or, failing that, at exit.
    """
    shape = layout.cache_shape(num_blocks)
    per_layer = math.prod(shape) * torch.empty((), dtype=layout.torch_dtype).element_size()
    flat = allocate_shared_bytes(per_layer * layout.num_layers, name)
    return [
        flat[i * per_layer : (i + 1) * per_layer].view(layout.torch_dtype).view(shape)
        for i in range(layout.num_layers)
    ]


def describe_shared_kv_caches(kv_caches: list[torch.Tensor], name: str) -> dict:
    """What D needs to map the caches: file, size, dtype and each layer's offset and shape."""
    path = shared_kv_path(name)
    storage = kv_caches[0].untyped_storage()
    return {
        "path": path,
        "size": storage.nbytes(),
        "dtype": str(kv_caches[0].dtype).removeprefix("torch."),
        "layers": [
            {"offset": t.data_ptr() - storage.data_ptr(), "shape": list(t.shape)} for t in kv_caches
        ],
    }


def map_shared_kv_caches(desc: dict) -> list[torch.Tensor]:
    """Writable views of caches another process allocated (a tensor-parallel worker's own
    caches, allocated by rank 0 so that rank 0 can serve and fill them)."""
    flat = torch.from_file(desc["path"], shared=True, size=desc["size"], dtype=torch.uint8)
    dtype = getattr(torch, desc["dtype"])
    return [_view(flat, layer["offset"], layer["shape"], dtype) for layer in desc["layers"]]


@dataclass
class _Mapping:
    """D's read-only view of a P file: its cache layers, or (staged) the raw buffer."""

    flat: torch.Tensor  # uint8 over the whole file
    layers: list[torch.Tensor] | None  # None: a staging buffer, filled per `stage`
    mm: mmap.mmap  # keeps the mapping alive as long as the views
    pinned: bool = False  # page-locked in D's process too: copies to D's GPU are DMA


def pin_for_device_copies(mapping: _Mapping) -> None:
    """Page-lock D's view of P's staging buffer: P pinned the pages in its own process,
    but a copy from D's (unregistered) view of them is staged through a driver buffer at a
    fraction of PCIe speed. Best effort; unpinned when the mapping is dropped."""
    ptr, size = mapping.flat.data_ptr(), mapping.flat.numel()
    try:
        err = torch.cuda.cudart().cudaHostRegister(ptr, size, CUDA_HOST_REGISTER_READ_ONLY)
    except Exception as e:  # pageable copies still work, only slower
        log.warning("could not pin the mapped KV staging buffer: %s", e)
        return
    if int(err) != 0:
        log.warning("could not pin the mapped KV staging buffer: CUDA error %s", int(err))
        return
    mapping.pinned = True
    # before the mmap goes: the finalizer runs while the dying mapping still holds it
    weakref.finalize(mapping, _unpin, ptr)


def _unpin(ptr: int) -> None:
    with contextlib.suppress(Exception):
        torch.cuda.cudart().cudaHostUnregister(ptr)


def check_shared_path(path: object) -> str:
    """`path` if it names a KV file of pdserve's in /dev/shm (caches or staging buffer, both
    `shared_kv_path`s), else ValueError: D maps nothing else, whatever a source says."""
    if not isinstance(path, str) or os.path.normpath(path) != path:
        raise ValueError(f"not a pdserve KV file: {path!r:.200}")
    folder, name = os.path.split(path)
    if folder != SHM_DIR or not name.startswith(SHM_PREFIX):
        raise ValueError(f"not a pdserve KV file: {path!r:.200}")
    return path


def map_shared(desc: dict) -> _Mapping:
    """Map P's cache file or staging buffer read-only (never creates it: P may be gone).
    Only a regular /dev/shm/pdserve-kv-* file, and no symbolic link, is mapped."""
    if "staging" in desc:
        desc = desc["staging"]
    path = check_shared_path(desc["path"])
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        mm = mmap.mmap(fd, desc["size"], access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns on read-only buffers; D never writes
        flat = torch.frombuffer(mm, dtype=torch.uint8)
    if "layers" not in desc:
        return _Mapping(flat, None, mm)
    if desc["dtype"] not in DTYPES:
        raise ValueError(f"unknown KV dtype {desc['dtype']!r:.40}")
    dtype = getattr(torch, desc["dtype"])
    layers = [_view(flat, layer["offset"], layer["shape"], dtype) for layer in desc["layers"]]
    return _Mapping(flat, layers, mm)


def _view(flat: torch.Tensor, offset: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offset < 0 or offset + nbytes > flat.numel():
        raise ValueError(f"{shape} {dtype} at {offset} is outside the {flat.numel()}-byte file")
    return flat[offset : offset + nbytes].view(dtype).view(shape)


@dataclass
class HostPuller(ConnectedPuller):
    """D side of the host transport: maps each source's caches once, copies blocks directly.

    The mapping lives on the connection to the source (see connections.py), reused across pulls.
    """

    name: str = "host"
    _scratch: Scratch = field(default_factory=Scratch)  # gather buffer, reused across pulls

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
        if endpoint.get("host_id") != local_host_id() or "host" not in endpoint.get(
            "transports", []
        ):
            raise TransferError("host transport needs a source on this host serving it")
        start = time.perf_counter()

        device = kv_caches[0].device

        def exchange(conn: Connection) -> tuple[int, bool, bool]:
            remote = self._mapping(conn, device)
            if remote.layers is not None and len(remote.layers) != len(kv_caches):
                raise TransferError(f"{len(remote.layers)} remote layers, {len(kv_caches)} local")

            def copy() -> int:
                with self._on_own_stream(device):
                    if remote.layers is None:  # P's caches are on a GPU: via its staging buffer
                        return _pull_staged(conn, remote.flat, remote_request_id, lease_token,
                                            remote_block_ids, local_block_ids, kv_caches, heads)
                    nbytes = copy_blocks(remote.layers, remote_block_ids, kv_caches,
                                         local_block_ids, heads, self._scratch)
                    _wait_for_copies(device)
                    return nbytes

            return admitted_copy(conn, remote_request_id, remote_block_ids, copy,
                                 release=release, lease_token=lease_token)

        budget = pull_timeout_s(self.timeout_s, kv_caches, len(local_block_ids))
        nbytes, released = self._run_pull(endpoint, remote_request_id, budget, exchange,
                                          (RuntimeError, IndexError, KeyError, TypeError,
                                           ValueError, OSError))
        return PullStats(self.name, len(local_block_ids), nbytes, time.perf_counter() - start,
                         released)

    @staticmethod
    def _mapping(conn: Connection, device: torch.device) -> _Mapping:
        if "host" not in conn.mappings:
            desc = conn.call({"op": "open", "transport": "host"})["mapping"]
            try:
                mapping = map_shared(desc)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise TransferError(f"cannot map {desc.get('path')}: {e}") from e
            if mapping.layers is None and device.type == "cuda":
                pin_for_device_copies(mapping)
            conn.mappings["host"] = mapping
        return conn.mappings["host"]

    def _on_own_stream(self, device: torch.device) -> contextlib.AbstractContextManager:
        if device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(self.own_stream(device))


def _pull_staged(
    conn: Connection,
    staging: torch.Tensor,
    request_id: str,
    lease_token: str,
    remote_ids: list[int],
    local_ids: list[int],
    kv_caches: list[torch.Tensor],
    heads: HeadSlice | None,
) -> int:
    """Have P stage as many layers as its buffer holds, copy them out, repeat; bytes moved."""
    cache = kv_caches[0]
    num_heads = cache.shape[3] if heads is None else heads.num_heads
    layer_bytes = 2 * len(remote_ids) * cache.shape[2] * num_heads * cache.shape[4]
    layer_bytes *= cache.element_size()
    per_chunk = staging.numel() // max(1, layer_bytes)
    if per_chunk == 0:
        raise TransferError(
            f"P's staging buffer ({staging.numel()} bytes) is smaller than one layer of "
            f"{len(remote_ids)} blocks ({layer_bytes} bytes)"
        )
    local = as_index(local_ids, cache.device)
    span = None if heads is None else [heads.remote_start, heads.remote_stop]
    want = [2, len(local_ids), cache.shape[2], num_heads, cache.shape[4]]
    nbytes = 0
    for first in range(0, len(kv_caches), per_chunk):
        last = min(len(kv_caches), first + per_chunk)
        reply = conn.call(
            {
                "op": "stage",
                "request_id": request_id,
                "lease_token": lease_token,
                "block_ids": remote_ids,
                "heads": span,
                "layers": [first, last],
            }
        )
        for entry in reply["layers"]:
            if entry["shape"] != want:
                raise TransferError(f"staged {entry['shape']}, want {want}")
            data = _view(staging, entry["offset"], want, cache.dtype)
            scatter_blocks(
                kv_caches[entry["layer"]], local, data, 0 if heads is None else heads.local_start
            )
            nbytes += data.nbytes
        _wait_for_copies(cache.device)  # P stages the next chunk over these bytes
    return nbytes


def _wait_for_copies(device: torch.device) -> None:
    """Copies from a pinned buffer run asynchronously: wait before P may overwrite it, and
    before the blocks go back to the engine."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
