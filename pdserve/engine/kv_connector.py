"""The engine's side of P/D disaggregation: leases and a KV source on P, pulls on D.

The engine loop owns the block pool, so nothing here frees a block: released or expired
leases and finished pulls are handed back through `poll()`, which the loop calls each step.
Pulls run on one worker thread (KVPuller is not thread-safe) so the loop keeps decoding;
with several ranks, each rank's puller runs on a thread of its own.

With tensor parallelism everything lives in rank 0's process, which maps every rank's
caches (shared memory on CPU, CUDA IPC on GPU): one KVSource per rank, all behind one lease
table (rank 0 decides when blocks are free), and one KVPuller per rank that fills that
rank's caches with its slice of the heads. Workers never see the connector.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from pdserve.engine.handoff import HeldPrefill
from pdserve.engine.histogram import KV_TRANSFER_BUCKETS, StepHistogram
from pdserve.security import DeploymentSecret, new_capability
from pdserve.transfer.cuda_ipc import import_kv_caches
from pdserve.transfer.host import (
    allocate_shared_kv_caches,
    describe_shared_kv_caches,
    unlink_shared_kv_caches,
)
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.params import RemoteKV
from pdserve.transfer.protocol import PullStats
from pdserve.transfer.source import KVSource
from pdserve.transfer.transports import KVPuller

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
    # durations of the pulls that moved blocks (all-prefix-hit pulls move none)
    pull_seconds: StepHistogram = field(default_factory=lambda: StepHistogram(KV_TRANSFER_BUCKETS))


@dataclass
class RankCaches:
    """One tensor-parallel rank's KV caches as rank 0's process sees them."""

    layout: KVLayout  # with this rank's tp_rank
    kv_caches: list[torch.Tensor] | None  # None until a GPU worker's export is imported
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


def allocate_rank_caches(layout: KVLayout, num_blocks: int, device: torch.device
                         ) -> list[RankCaches]:
    """Caches of every rank that other engines can read: on CPU all ranks' in shared memory
    (allocated here, mapped by the workers); on GPU rank 0's, the workers export theirs."""
    ranks = []
    for rank in range(layout.tp_size):
        rank_layout = layout.for_rank(rank)
        if device.type == "cpu":
            name = f"kv-{uuid.uuid4().hex[:8]}"
            caches = allocate_shared_kv_caches(rank_layout, num_blocks, name)
            ranks.append(RankCaches(rank_layout, caches, name))
        elif rank == 0:
            ranks.append(RankCaches(rank_layout, rank_layout.zeros(num_blocks, device)))
        else:
            ranks.append(RankCaches(rank_layout, None))
    return ranks


class KVConnector:
    """One per engine: serves this engine's leased blocks and pulls remote ones into it."""

    def __init__(self, ranks: list[RankCaches], lease_ttl_s: float = 30.0,
                 transport: str | None = None, advertise_host: str = "127.0.0.1",
                 pull_timeout_s: float = 10.0, secret: DeploymentSecret | None = None):
        self.engine_id = uuid.uuid4().hex[:12]
        self.ranks = ranks
        self.layout = ranks[0].layout
        self.leases = LeaseTable(lease_ttl_s)  # shared by every rank's source
        self.sources: list[KVSource] = []
        self.pullers: list[KVPuller] = []
        for rank in ranks:
            assert rank.kv_caches is not None, "every rank's caches are mapped by now"
            on_gpu = rank.kv_caches[0].device.type == "cuda"
            self.sources.append(KVSource(
                rank.kv_caches, rank.layout, self.leases, shm_name=rank.shm_name,
                advertise_host=advertise_host, ipc_layers=rank.ipc_layers, secret=secret,
                # GPU caches: also serve "host" through a pinned staging buffer
                staging_bytes=STAGING_BYTES if on_gpu else 0).start())
            self.pullers.append(KVPuller(rank.layout, rank.kv_caches, transport=transport,
                                         timeout_s=pull_timeout_s, secret=secret))
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-pull")
        # TP: every rank pulls its heads at once (its own puller, GPU and link), one thread each
        self._ranks = (ThreadPoolExecutor(max_workers=len(ranks), thread_name_prefix="kv-rank")
                       if len(ranks) > 1 else None)
        self._done: queue.Queue[PullResult] = queue.Queue()
        self.stats = ConnectorStats()

    # ---- P side ------------------------------------------------------------------------

    def hold(self, request_id: str, block_ids: list[int], first_token_id: int) -> HeldPrefill:
        """Keep a finished prefill's blocks under a lease, with its capability
        (`lease_token`) and end; the server turns it into the kv_transfer_params it answers
        with, bound to the prompt and signed (security.sign_handoff)."""
        lease = self.leases.hold(request_id, block_ids, token=new_capability())
        self.stats.leases_held += 1
        remote = RemoteKV(self.engine_id, request_id, list(block_ids), self.layout,
                          [source.endpoint() for source in self.sources], lease.token)
        # wall clock, for D (another host's monotonic clock means nothing here); whole
        # seconds, rounded down: an int signs and travels through any JSON unchanged
        expires_at = int(time.time() + lease.expires_at - time.monotonic())
        return HeldPrefill(remote, first_token_id, expires_at)

    def num_leases(self) -> int:
        return len(self.leases)

    # ---- D side ------------------------------------------------------------------------

    def start_pull(self, request_id: str, remote: RemoteKV, local_block_ids: list[int],
                   first_block: int) -> None:
        """Pull remote blocks [first_block:] into `local_block_ids` on the worker thread."""
        self._worker.submit(self._pull, request_id, remote, local_block_ids, first_block)

    def _pull(self, request_id: str, remote: RemoteKV, local_block_ids: list[int],
              first_block: int) -> None:
        released = False
        try:
            result = PullResult(request_id, True)  # no blocks: all from D's own prefix cache
            if local_block_ids:
                start = time.perf_counter()
                for stats in self._pull_ranks(remote, local_block_ids, first_block):
                    result.num_bytes += stats.bytes
                    result.transport = stats.transport
                    released = stats.released
                result.seconds = time.perf_counter() - start
        except Exception as e:  # any failure means: prefill locally instead
            log.warning("KV pull for %s failed: %s", request_id, e)
            result = PullResult(request_id, False, f"{type(e).__name__}: {e}")
        self._done.put(result)  # the request goes on before P hears back
        if not released:  # P was not told with the last read (failed, TP, or lost `end`)
            self.pullers[0].release(remote)  # P may free now, whatever happened

    def _pull_ranks(self, remote: RemoteKV, local_block_ids: list[int], first_block: int
                    ) -> list[PullStats]:
        """Every rank's slice of the heads. One rank: its last read also ends P's lease.
        Several: all at once, each waited for even when one fails (a local prefill would
        write the blocks a rank still copies into); D then releases the lease itself."""
        if self._ranks is None:
            return [self.pullers[0].pull(remote, local_block_ids, first_block, release=True)]
        futures = [self._ranks.submit(puller.pull, remote, local_block_ids, first_block)
                   for puller in self.pullers]
        wait(futures)
        return [f.result() for f in futures]  # the first failure, once every rank stopped

    def release_later(self, remote: RemoteKV) -> None:
        """Tell P to free a prefill D will not pull (on the pull thread: P may be slow)."""
        self._worker.submit(self.pullers[0].release, remote)

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
                if r.num_bytes:
                    self.stats.pull_seconds.observe(r.seconds)
            else:
                self.stats.pulls_failed += 1
        freed = self.leases.expire()
        return results, freed

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self._ranks is not None:
            self._ranks.shutdown(wait=False, cancel_futures=True)
        for source, puller, rank in zip(self.sources, self.pullers, self.ranks):
            source.close()
            puller.close()
            if rank.shm_name:
                unlink_shared_kv_caches(rank.shm_name)
