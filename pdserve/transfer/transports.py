"""Picking a transport per (P rank, D rank) pair, and the D-side puller the engine owns.

Same host, CUDA on both sides and peer access (or the same GPU) -> cuda_ipc; same host
with P's caches in shared memory -> host; anything else -> tcp.
`KVPuller(transport=...)` overrides the choice.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from pdserve.security import DeploymentSecret
from pdserve.transfer.connections import SourceConnections
from pdserve.transfer.cuda_ipc import CudaIpcPuller, peer_reachable
from pdserve.transfer.host import HostPuller, local_host_id
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.params import RemoteKV
from pdserve.transfer.protocol import BlockPuller, PullStats, TransferError
from pdserve.transfer.tcp import TcpPuller

log = logging.getLogger(__name__)

TRANSPORTS: dict[str, type] = {"cuda_ipc": CudaIpcPuller, "host": HostPuller, "tcp": TcpPuller}


def choose_transport(endpoint: dict, local_device: torch.device, prefer: str | None = None) -> str:
    """The transport D should use to pull from `endpoint` into caches on `local_device`."""
    offered = endpoint.get("transports", ["tcp"])
    if prefer is not None:
        if prefer not in offered:
            raise TransferError(f"source offers {offered}, not {prefer!r}")
        return prefer
    if endpoint.get("host_id") != local_host_id():
        return "tcp"
    if "cuda_ipc" in offered and peer_reachable(endpoint.get("gpu_uuid"), local_device):
        return "cuda_ipc"
    if "host" in offered:
        return "host"
    return "tcp"


def release_remote_kv(
    remote: RemoteKV, timeout_s: float = 5.0, conns: SourceConnections | None = None,
    secret: DeploymentSecret | None = None,
) -> bool:
    """Tell every P rank its lease on the request can end (after all D ranks pulled).

    Over `conns` (a puller's open connections) when given, else over new ones made with
    `secret`. Best effort: False if some rank could not be told; its lease then simply
    expires.
    """
    own = conns is None
    conns = SourceConnections(secret) if conns is None else conns
    ok = True
    try:
        for endpoint in remote.endpoints:
            try:
                ok = conns.release(endpoint, remote.request_id, remote.lease_token,
                                   timeout_s) and ok
            except TransferError:
                ok = False
    finally:
        if own:
            conns.close()
    return ok


@dataclass
class KVPuller:
    """D side, one per engine rank: pulls a prefilled request's blocks into its own caches.

    Checks the layouts, splits the pull over the P ranks holding this rank's heads
    (heterogeneous TP), and picks a transport per P rank. Not thread-safe: call it from
    one thread (the engine's), or one KVPuller per thread. Every transport and `release`
    share one connection per P endpoint, kept open across pulls, each opened with the
    deployment `secret` (a source that cannot prove it holds it is refused).
    """

    layout: KVLayout
    kv_caches: list[torch.Tensor]
    transport: str | None = None  # force "cuda_ipc", "host" or "tcp"
    timeout_s: float = 10.0
    secret: DeploymentSecret | None = None  # required to connect anywhere
    _pullers: dict[str, BlockPuller] = field(default_factory=dict)
    _conns: SourceConnections = field(init=False)
    # (P endpoint, transport) pairs that failed once: the next pull goes down the list
    _broken: set[tuple[str, int, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._conns = SourceConnections(self.secret)

    def pull(self, remote: RemoteKV, local_block_ids: list[int], first_block: int = 0,
             release: bool = False) -> PullStats:
        """Copy remote blocks first_block .. first_block+len(local_block_ids) into local_block_ids.

        `first_block` skips blocks D already holds (its prefix cache). `release`: P ends the
        lease with the last part's read (the caller's last pull; see `PullStats.released`).
        Raises IncompatibleLayout or TransferError; either way D prefills locally instead.
        """
        remote_ids = remote.block_ids[first_block : first_block + len(local_block_ids)]
        if len(remote_ids) != len(local_block_ids):
            raise ValueError(f"{len(local_block_ids)} local blocks, {len(remote_ids)} remote")
        total: PullStats | None = None
        parts = self.layout.head_slices_from(remote.layout)
        for i, part in enumerate(parts):
            endpoint = remote.endpoints[part.remote_rank]
            whole = part.num_heads == self.layout.rank_kv_heads == remote.layout.rank_kv_heads
            args = (endpoint, remote.request_id, remote_ids, local_block_ids, self.kv_caches,
                    None if whole else part, release and i == len(parts) - 1)
            stats = self._pull_with_fallback(endpoint, args, remote.lease_token)
            total = stats if total is None else total + stats
        assert total is not None  # head_slices_from covers at least one head
        return total

    def _pull_with_fallback(self, endpoint: dict, args: tuple, token: str) -> PullStats:
        """The best transport; if it fails (e.g. CUDA IPC where P's GPU is not visible), the
        next one offered, down to tcp, and the failed one is not tried again for this P."""
        if self.transport is not None:
            return self._puller(self.transport).pull(*args, lease_token=token)
        device = self.kv_caches[0].device
        while True:
            name = choose_transport(endpoint, device, None)
            key = (str(endpoint.get("host")), int(endpoint.get("port", 0)), name)
            if key in self._broken:
                offered = [t for t in endpoint.get("transports", ["tcp"])
                           if (key[0], key[1], t) not in self._broken]
                if not offered:
                    raise TransferError(f"every transport to {key[0]}:{key[1]} failed")
                endpoint = endpoint | {"transports": offered}
                continue
            try:
                return self._puller(name).pull(*args, lease_token=token)
            except TransferError:
                if name == "tcp":
                    raise
                self._broken.add(key)
                log.warning("KV transport %s to %s:%s failed; trying the next", name, *key[:2])

    def release(self, remote: RemoteKV) -> bool:
        """Tell P the request's blocks may be freed (see release_remote_kv)."""
        return release_remote_kv(remote, self.timeout_s, self._conns)

    def close(self) -> None:
        """Close the connections to every source, dropping every mapping of remote caches."""
        for puller in self._pullers.values():
            with contextlib.suppress(Exception):
                puller.close()
        self._pullers.clear()
        self._conns.close()

    def _puller(self, name: str) -> BlockPuller:
        if name not in self._pullers:
            self._pullers[name] = TRANSPORTS[name](timeout_s=self.timeout_s, conns=self._conns)
        return self._pullers[name]
