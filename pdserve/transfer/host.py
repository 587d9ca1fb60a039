"""Same host, CPU caches: P's KV caches live in a /dev/shm file that D maps once and copies from.

P allocates its caches with `allocate_shared_kv_caches` (one file, all layers back to back)
and unlinks it at shutdown. D asks P's KVSource once for the file and the layer offsets,
maps it read-only, and for each pull asks P to admit the read (`begin`: the lease covers the
blocks), copies with one index_select + index_copy_ per layer, then asks whether the lease
was still live at the end (`end`), so blocks freed and reused mid-copy are never accepted.

GPU caches (design, not built): P would keep a pinned staging buffer in /dev/shm
(cudaHostRegister on the mapping), gather the requested blocks into it on `begin`
(device-to-host on a side stream), and D would copy staging -> its GPU. On one host,
cuda_ipc is the better path; this one is for GPUs without peer access.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from functools import cache

import torch

from pdserve.transfer.blockcopy import Scratch, copy_blocks
from pdserve.transfer.layout import HeadSlice, KVLayout
from pdserve.transfer.protocol import PullStats, TransferError, pull_timeout_s
from pdserve.transfer.wire import Connection, release_remote

SHM_DIR = "/dev/shm"
SHM_PREFIX = "pdserve-kv-"


@cache
def local_host_id() -> str:
    """Identifies this machine (and boot), so two engines can tell they share /dev/shm."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown"
    return f"{socket.gethostname()}/{boot}"


def shared_kv_path(name: str, pid: int | None = None) -> str:
    """The /dev/shm file of the caches `name` of process `pid` (pid lets stale files be found)."""
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}{os.getpid() if pid is None else pid}-{name}")


def allocate_shared_kv_caches(layout: KVLayout, num_blocks: int, name: str) -> list[torch.Tensor]:
    """KV caches (one tensor per layer, `layout.cache_shape(num_blocks)`) in shared memory.

    The file is unlinked by `unlink_shared_kv_caches(name)` or, failing that, at exit.
    """
    shape = layout.cache_shape(num_blocks)
    elem = torch.empty((), dtype=layout.torch_dtype).element_size()
    per_layer = elem * shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
    path = shared_kv_path(name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)  # never adopt a stale file
    try:
        os.ftruncate(fd, per_layer * layout.num_layers)
    finally:
        os.close(fd)
    atexit.register(unlink_shared_kv_caches, name)
    flat = torch.from_file(path, shared=True, size=per_layer * layout.num_layers, dtype=torch.uint8)
    return [
        flat[i * per_layer : (i + 1) * per_layer].view(layout.torch_dtype).view(shape)
        for i in range(layout.num_layers)
    ]


def unlink_shared_kv_caches(name: str) -> bool:
    """Remove the /dev/shm file (mappings stay valid until dropped); False if already gone."""
    try:
        os.unlink(shared_kv_path(name))
        return True
    except FileNotFoundError:
        return False


def remove_stale_shared_kv_caches() -> list[str]:
    """Unlink cache files of processes that no longer exist (crashed engines); returns paths."""
    removed = []
    for entry in os.listdir(SHM_DIR):
        if not entry.startswith(SHM_PREFIX):
            continue
        pid = entry[len(SHM_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, entry))
                removed.append(os.path.join(SHM_DIR, entry))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


@dataclass
class _Mapping:
    path: str
    layers: list[torch.Tensor]
    mm: mmap.mmap  # keeps the mapping alive as long as the layer views


def map_shared_kv_caches(desc: dict) -> _Mapping:
    """Map P's cache file read-only (never creates it: P may be gone)."""
    fd = os.open(desc["path"], os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, desc["size"], access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns on read-only buffers; D never writes
        flat = torch.frombuffer(mm, dtype=torch.uint8)
    dtype = getattr(torch, desc["dtype"])
    layers = []
    for layer in desc["layers"]:
        numel = 1
        for s in layer["shape"]:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        raw = flat[layer["offset"] : layer["offset"] + nbytes]
        layers.append(raw.view(dtype).view(layer["shape"]))
    return _Mapping(desc["path"], layers, mm)


@dataclass
class HostPuller:
    """D side of the host transport: maps each source's caches once, copies blocks directly."""

    timeout_s: float = 10.0
    name: str = "host"
    _maps: dict[tuple[str, int], _Mapping] = field(default_factory=dict)
    _scratch: Scratch = field(default_factory=Scratch)  # gather buffer, reused across pulls

    def pull(
        self,
        endpoint: dict,
        remote_request_id: str,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        kv_caches: list[torch.Tensor],
        heads: HeadSlice | None = None,
    ) -> PullStats:
        """Copy remote blocks into `local_block_ids` of `kv_caches`; TransferError on failure."""
        if len(remote_block_ids) != len(local_block_ids):
            raise ValueError("remote and local block lists differ in length")
        if endpoint.get("host_id") != local_host_id() or "host" not in endpoint.get(
            "transports", []
        ):
            raise TransferError("host transport needs a source on this host with shared caches")
        start = time.perf_counter()
        key = (endpoint["host"], endpoint["port"])
        try:
            budget = pull_timeout_s(self.timeout_s, kv_caches, len(local_block_ids))
            with Connection(endpoint, budget, self.timeout_s) as conn:
                remote = self._mapping(conn, key)
                if len(remote.layers) != len(kv_caches):
                    raise TransferError(
                        f"{len(remote.layers)} remote layers, {len(kv_caches)} local"
                    )
                lease = conn.call(
                    {"op": "begin", "request_id": remote_request_id, "block_ids": remote_block_ids}
                )
                nbytes = copy_blocks(
                    remote.layers,
                    remote_block_ids,
                    kv_caches,
                    local_block_ids,
                    heads,
                    self._scratch,
                )
                ended = conn.call(
                    {"op": "end", "request_id": remote_request_id, "lease_id": lease["lease_id"]}
                )
        except TransferError:
            self._forget(key)  # P may have restarted with a new file: map afresh next time
            raise
        except (RuntimeError, IndexError, KeyError, TypeError, OSError) as e:
            self._forget(key)
            raise TransferError(f"host copy from {key} failed: {e}") from e
        if not ended["live"]:
            raise TransferError(f"lease of {remote_request_id!r} ended during the copy")
        return PullStats(self.name, len(local_block_ids), nbytes, time.perf_counter() - start)

    def release(self, endpoint: dict, remote_request_id: str) -> bool:
        """Tell the source the blocks of `remote_request_id` may be freed."""
        return release_remote(endpoint, remote_request_id, self.timeout_s)

    def close(self) -> None:
        """Drop every mapping (the memory of a gone P is freed once nobody maps it)."""
        self._maps.clear()

    def _mapping(self, conn: Connection, key: tuple[str, int]) -> _Mapping:
        if key not in self._maps:
            desc = conn.call({"op": "open", "transport": "host"})["mapping"]
            try:
                self._maps[key] = map_shared_kv_caches(desc)
            except (OSError, ValueError) as e:
                raise TransferError(f"cannot map {desc.get('path')}: {e}") from e
        return self._maps[key]

    def _forget(self, key: tuple[str, int]) -> None:
        self._maps.pop(key, None)
