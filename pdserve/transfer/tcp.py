"""Any two hosts: D asks P's KVSource to stream the blocks over a socket, layer by layer.

D sends `read {request_id, block_ids, heads}`; P checks the lease, gathers each layer's
blocks (and head slice) into one contiguous tensor and sends it as a framed message (JSON
header with layer, shape, dtype, nbytes; then the raw bytes); a last message says whether
the lease was still live when the stream ended. D scatters each layer into its own blocks.
The server side is `KVSource` (source.py), which serves every transport.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pdserve.transfer.blockcopy import Scratch, as_index, scatter_blocks
from pdserve.transfer.connections import ConnectedPuller
from pdserve.transfer.layout import HeadSlice
from pdserve.transfer.protocol import PullStats, TransferError, pull_timeout_s
from pdserve.transfer.wire import Connection


@dataclass
class TcpPuller(ConnectedPuller):
    """D side of the tcp transport. `timeout_s` bounds a whole pull, connect included;
    the connection to each source is kept for the next pull (see connections.py)."""

    name: str = "tcp"
    _scratch: Scratch = field(default_factory=Scratch)  # receive buffer, reused across pulls

    def pull(
        self,
        endpoint: dict,
        remote_request_id: str,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        kv_caches: list[torch.Tensor],
        heads: HeadSlice | None = None,
        release: bool = False,
    ) -> PullStats:
        """Copy remote blocks into `local_block_ids` of `kv_caches`; TransferError on failure."""
        if len(remote_block_ids) != len(local_block_ids):
            raise ValueError("remote and local block lists differ in length")
        start = time.perf_counter()
        local = as_index(local_block_ids, kv_caches[0].device)
        head_start = 0 if heads is None else heads.local_start

        def exchange(conn: Connection) -> tuple[int, bool, bool]:
            """Send the read, receive and scatter each layer; P's last word: lease live (and
            released, if asked)?"""
            nbytes = 0
            reply = conn.call(
                {
                    "op": "read",
                    "request_id": remote_request_id,
                    "block_ids": remote_block_ids,
                    "heads": None if heads is None else [heads.remote_start, heads.remote_stop],
                    "release": release,
                }
            )
            if reply["num_layers"] != len(kv_caches):
                raise TransferError(f"{reply['num_layers']} remote layers, {len(kv_caches)} local")
            for i, cache in enumerate(kv_caches):
                header = conn.recv()
                if header.get("layer") != i:
                    raise TransferError(f"expected layer {i}, got {header}")
                data = conn.recv_tensor(header, self._scratch)
                self._check(data, cache, len(local), heads)
                scatter_blocks(cache, local, data, head_start)
                nbytes += data.nbytes
            last = conn.recv()
            return nbytes, bool(last["live"]), bool(last.get("released"))

        budget = pull_timeout_s(self.timeout_s, kv_caches, len(local))
        # a malformed stream surfaces as one of these
        nbytes, released = self._run_pull(endpoint, remote_request_id, budget, exchange,
                                          (KeyError, TypeError, IndexError, RuntimeError))
        return PullStats(self.name, len(local_block_ids), nbytes, time.perf_counter() - start,
                         released)

    @staticmethod
    def _check(data: torch.Tensor, cache: torch.Tensor, n: int, heads: HeadSlice | None) -> None:
        num_heads = cache.shape[3] if heads is None else heads.num_heads
        want = (2, n, cache.shape[2], num_heads, cache.shape[4])
        if tuple(data.shape) != want or data.dtype != cache.dtype:
            raise TransferError(f"got {tuple(data.shape)} {data.dtype}, want {want} {cache.dtype}")
