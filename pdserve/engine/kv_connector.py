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

from pdserve.engine.connector import ConnectorStats, PullResult
from pdserve.engine.handoff import HeldPrefill, HoldForDecode, KVHandoff, RemotePrefill
from pdserve.engine.kv_caches import KVCaches
from pdserve.engine.request import Request, RequestStatus
from pdserve.security import DeploymentSecret, new_capability
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.params import RemoteKV
from pdserve.transfer.protocol import PullStats
from pdserve.transfer.source import KVSource
from pdserve.transfer.transports import KVPuller

log = logging.getLogger(__name__)

STAGING_BYTES = 256 * 2**20  # one layer of a 64k-token Llama-8B prompt


class KVConnector:
    """One per P or D engine (engine/connector.py's `Connector`): serves this engine's
    leased blocks and pulls remote ones into it."""

    def __init__(self, caches: KVCaches, lease_ttl_s: float = 30.0,
                 transport: str | None = None, advertise_host: str | None = None,
                 pull_timeout_s: float = 10.0, secret: DeploymentSecret | None = None,
                 bind_host: str = "127.0.0.1"):
        self.engine_id = uuid.uuid4().hex[:12]
        self.ranks = ranks = caches.ranks
        self.layout = caches.layout
        self.leases = LeaseTable(lease_ttl_s)  # shared by every rank's source
        self.sources: list[KVSource] = []
        self.pullers: list[KVPuller] = []
        for rank in ranks:
            assert rank.kv_caches is not None, "every rank's caches are mapped by now"
            on_gpu = rank.kv_caches[0].device.type == "cuda"
            self.sources.append(KVSource(
                rank.kv_caches, rank.layout, self.leases, shm_name=rank.shm_name,
                bind_host=bind_host, advertise_host=advertise_host,
                ipc_layers=rank.ipc_layers, secret=secret,
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

    # ---- the scheduler's three questions -----------------------------------------------

    def matched_remote_tokens(self, request: Request) -> int:
        """D: the prompt less its own prefix-cache hit, until the pull started."""
        if not isinstance(request.handoff, RemotePrefill):
            return 0
        return max(request.num_prompt_tokens - request.num_computed_tokens, 0)

    def blocks_allocated(self, request: Request, block_ids: list[int],
                         num_local_hit_tokens: int) -> None:
        """D: pull P's blocks into those the prefix cache did not give (none at all: the
        empty pull still tells P to free)."""
        handoff = request.handoff
        if not isinstance(handoff, RemotePrefill):
            return
        request.handoff = None  # pulled once: a failed pull or a preemption prefills here
        bs = self.layout.block_size
        first = num_local_hit_tokens // bs
        end = (request.num_prompt_tokens + bs - 1) // bs
        self.start_pull(request.request_id, handoff.remote, list(block_ids[first:end]), first)

    def request_finished(self, request: Request) -> tuple[bool, HeldPrefill | None]:
        """P: a prefill that ran to its length for a decode instance keeps its blocks under
        a lease. D: an aborted request whose pull never started lets P free now."""
        handoff = request.handoff
        if isinstance(handoff, RemotePrefill):
            self.release_later(handoff.remote)
            return False, None
        if isinstance(handoff, HoldForDecode) and request.status == RequestStatus.FINISHED_LENGTH:
            return True, self.hold(request.request_id, request.block_ids,
                                   request.output_token_ids[0])
        return False, None

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

    def revoke_lease(self, request_id: str) -> None:
        """End our own lease of `request_id` (its client left): no token needed."""
        self.leases.revoke(request_id)

    def release_lease(self, request_id: str, lease_token: object) -> bool:
        """End a lease on its holder's word; its blocks come back at the next `poll`."""
        return self.leases.release_later(request_id, lease_token)

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

    def request_refused(self, handoff: KVHandoff | None) -> None:
        """D: a refused request's prefilled KV will never be pulled: P may free it now."""
        if isinstance(handoff, RemotePrefill):
            self.release_later(handoff.remote)

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
                    self.stats.pulls_by_transport[r.transport or "unknown"] += 1
            else:
                self.stats.pulls_failed += 1
        freed = self.leases.expire()
        return results, freed

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self._ranks is not None:
            self._ranks.shutdown(wait=False, cancel_futures=True)
        for source, puller in zip(self.sources, self.pullers):
            source.close()
            puller.close()
