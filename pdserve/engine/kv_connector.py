"""The engine's side of P/D disaggregation: leases and a KV source on P, pulls on D.

The engine loop owns the block pool, so nothing here frees a block: released or expired
leases and finished pulls are handed back through `poll()`, which the loop calls each step.
Pulls run on one worker thread (KVPuller is not thread-safe) so the loop keeps decoding.
"""

from __future__ import annotations

import logging
import queue
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from pdserve.transfer import (
    KVLayout,
    KVPuller,
    KVSource,
    LeaseTable,
    RemoteKV,
    allocate_shared_kv_caches,
    unlink_shared_kv_caches,
)

log = logging.getLogger(__name__)

STAGING_BYTES = 256 * 2**20  # one layer of a 64k-token Llama-8B prompt


@dataclass
class PullResult:
    request_id: str
    ok: bool
    error: str | None = None
    num_bytes: int = 0
    seconds: float = 0.0
    transport: str | None = None


@dataclass
class ConnectorStats:
    pulls_ok: int = 0
    pulls_failed: int = 0
    bytes_pulled: int = 0
    leases_held: int = 0


class KVConnector:
    """One per engine: serves this engine's leased blocks and pulls remote ones into it."""

    def __init__(self, layout: KVLayout, kv_caches: list[torch.Tensor], shm_name: str | None,
                 lease_ttl_s: float = 30.0, transport: str | None = None,
                 advertise_host: str = "127.0.0.1", pull_timeout_s: float = 10.0):
        self.engine_id = uuid.uuid4().hex[:12]
        self.layout = layout
        self.kv_caches = kv_caches
        self.shm_name = shm_name
        self.leases = LeaseTable(lease_ttl_s)
        on_gpu = kv_caches[0].device.type == "cuda"
        self.source = KVSource(kv_caches, layout, self.leases, shm_name=shm_name,
                               advertise_host=advertise_host,
                               # GPU caches: also serve "host" through a pinned staging buffer
                               staging_bytes=STAGING_BYTES if on_gpu else 0).start()
        self.puller = KVPuller(layout, kv_caches, transport=transport, timeout_s=pull_timeout_s)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-pull")
        self._done: queue.Queue[PullResult] = queue.Queue()
        self.stats = ConnectorStats()

    @staticmethod
    def allocate_caches(layout: KVLayout, num_blocks: int, device: torch.device
                        ) -> tuple[list[torch.Tensor], str | None]:
        """KV caches D can read directly: in shared memory on CPU (host transport)."""
        if device.type == "cpu":
            name = f"kv-{uuid.uuid4().hex[:8]}"
            return allocate_shared_kv_caches(layout, num_blocks, name), name
        caches = [torch.zeros(layout.cache_shape(num_blocks), dtype=layout.torch_dtype,
                              device=device) for _ in range(layout.num_layers)]
        return caches, None

    # ---- P side ------------------------------------------------------------------------

    def hold(self, request_id: str, block_ids: list[int], first_token_id: int) -> dict:
        """Keep a finished prefill's blocks under a lease; returns its kv_transfer_params."""
        self.leases.hold(request_id, block_ids)
        self.stats.leases_held += 1
        remote = RemoteKV(self.engine_id, request_id, list(block_ids), self.layout,
                          [self.source.endpoint()])
        return remote.to_kv_transfer_params() | {"first_token_id": first_token_id}

    def num_leases(self) -> int:
        return len(self.leases)

    # ---- D side ------------------------------------------------------------------------

    def start_pull(self, request_id: str, remote: RemoteKV, local_block_ids: list[int],
                   first_block: int) -> None:
        """Pull remote blocks [first_block:] into `local_block_ids` on the worker thread."""
        self._worker.submit(self._pull, request_id, remote, local_block_ids, first_block)

    def _pull(self, request_id: str, remote: RemoteKV, local_block_ids: list[int],
              first_block: int) -> None:
        try:
            if local_block_ids:
                stats = self.puller.pull(remote, local_block_ids, first_block)
                result = PullResult(request_id, True, None, stats.bytes, stats.seconds,
                                    stats.transport)
            else:  # every block came from D's own prefix cache
                result = PullResult(request_id, True)
        except Exception as e:  # any failure means: prefill locally instead
            log.warning("KV pull for %s failed: %s", request_id, e)
            result = PullResult(request_id, False, f"{type(e).__name__}: {e}")
        self.puller.release(remote)  # P may free now, whatever happened
        self._done.put(result)

    # ---- the engine loop's hand-back ---------------------------------------------------

    def wait(self, timeout_s: float) -> None:
        """Block until a pull finishes or `timeout_s` passes (keeps an idle loop off the CPU)."""
        try:
            self._done.put(self._done.get(timeout=timeout_s))
        except queue.Empty:
            pass

    def poll(self) -> tuple[list[PullResult], list[int]]:
        """Finished pulls, and block ids of leases that ended (released or expired) to free."""
        results = []
        while True:
            try:
                results.append(self._done.get_nowait())
            except queue.Empty:
                break
        for r in results:
            if r.ok:
                self.stats.pulls_ok += 1
                self.stats.bytes_pulled += r.num_bytes
            else:
                self.stats.pulls_failed += 1
        freed = self.leases.expire()
        return results, freed

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.source.close()
        self.puller.close()
        if self.shm_name:
            unlink_shared_kv_caches(self.shm_name)
