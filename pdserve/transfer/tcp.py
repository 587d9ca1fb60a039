"""Any two hosts: D asks P's KVSource to stream the blocks over a socket, layer by layer.

D sends `read {request_id, lease_token, block_ids, heads}`; P admits it against the lease
(pinning the blocks for the stream), gathers each layer's blocks (and head slice) into one
contiguous tensor and sends it as a framed message (JSON header with layer, shape, dtype,
nbytes; then the raw bytes); a last message says the lease stayed live (and whether it was
released). D scatters each layer into its own blocks.
The server side is `KVSource` (source.py), which serves every transport; its half of the
stream is `send_layers`.

Both ends overlap their stages, through two host buffers each used in turn (`HostSlot`).
P, on a GPU: layer i+1 is gathered and copied to pinned host memory while layer i is on the
wire (on CPU the socket's buffers already let the gather of i+1 run ahead of D's reads).
D: layer i+1 is received while layer i is scattered: copied up and scattered on a stream of
its own on a GPU, by one worker thread on CPU. The wire format is the same either way.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from pdserve.transfer.blockcopy import Scratch, as_index, gather_blocks, scatter_blocks
from pdserve.transfer.connections import ConnectedPuller
from pdserve.transfer.layout import HeadSlice
from pdserve.transfer.protocol import PullStats, TransferError, pull_timeout_s
from pdserve.transfer.wire import Connection, HostSlot, send_tensor

NUM_SLOTS = 2  # one layer on the wire, one copied to or from the device: more buys nothing


def host_slots(pinned: bool) -> tuple[HostSlot, ...]:
    return tuple(HostSlot(pinned) for _ in range(NUM_SLOTS))


def send_layers(
    sock: socket.socket,
    caches: list[torch.Tensor],
    ids: torch.Tensor,
    heads: tuple[int, int],
    scratch: Scratch,
    slots: tuple[HostSlot, ...],
    stream: torch.cuda.Stream | None,
) -> None:
    """P: send blocks `ids` (heads `heads`) of every layer, one tensor message each, in order.

    With a `stream` (GPU caches), each layer is gathered into `scratch` and copied into a
    pinned slot on it asynchronously, while the layer before goes out of the other slot.
    """
    # CPU: the socket's send buffer already lets the next gather run while D reads this layer
    # (a sender thread measured no faster)
    if stream is None:
        for i, cache in enumerate(caches):
            send_tensor(sock, {"layer": i}, gather_blocks(cache, ids, heads, scratch))
        return
    queued: deque[tuple[int, torch.Tensor, HostSlot]] = deque()
    try:
        for i, cache in enumerate(caches):
            slot = slots[i % len(slots)]
            with torch.cuda.stream(stream):
                # stream order: this gather overwrites `scratch` only after the last copy read it
                data = gather_blocks(cache, ids, heads, scratch)
                host = slot.get(tuple(data.shape), data.dtype)  # its last layer is already sent
                host.copy_(data, non_blocking=True)
                slot.record(stream)
            queued.append((i, host, slot))
            if len(queued) == len(slots):  # every slot busy: send the oldest, freeing its slot
                _send_copied(sock, *queued.popleft())
        while queued:
            _send_copied(sock, *queued.popleft())
    except BaseException:
        stream.synchronize()  # no copy may still write a slot (or read `ids`) once we return
        raise


def _send_copied(sock: socket.socket, layer: int, host: torch.Tensor, slot: HostSlot) -> None:
    slot.wait()  # the device-to-host copy into `host` has landed
    send_tensor(sock, {"layer": layer}, host)


@dataclass
class _Landing:
    """D's receive side for one device, kept across pulls: layers land in host slots used in
    turn and are scattered in order, off the receiving thread. GPU: copied up from pinned
    slots and scattered on a stream of D's own. CPU: scattered by one worker thread, which
    plays the stream's part (in order; each slot's last scatter awaited before its reuse)."""

    device: torch.device
    slots: tuple[HostSlot, ...]
    stream: torch.cuda.Stream | None = None
    worker: ThreadPoolExecutor | None = None
    on_device: Scratch = field(default_factory=Scratch)  # GPU: a layer copied up, then scattered
    _scattering: dict[int, Future] = field(default_factory=dict)  # CPU: slot -> its last scatter

    @classmethod
    def for_device(cls, device: torch.device, stream: torch.cuda.Stream | None) -> _Landing:
        """`stream`: the puller's own on `device` (GPU only)."""
        if device.type == "cuda":
            return cls(device, host_slots(pinned=True), stream=stream)
        return cls(device, host_slots(pinned=False), worker=ThreadPoolExecutor(1, "tcp-scatter"))

    def slot(self, layer: int) -> HostSlot:
        """Where `layer` lands: a slot whose last layer is scattered, or (GPU) whose `get`
        waits for the copy out of it. A failed scatter fails the pull here."""
        k = layer % len(self.slots)
        if (scattered := self._scattering.pop(k, None)) is not None:
            scattered.result()
        return self.slots[k]

    def scatter(
        self, cache: torch.Tensor, ids: torch.Tensor, data: torch.Tensor, layer: int,
        head_start: int,
    ) -> None:
        """Queue `data` (in the slot of `layer`) to be written into blocks `ids` of `cache`."""
        k = layer % len(self.slots)
        if self.stream is None:
            self._scattering[k] = self.worker.submit(scatter_blocks, cache, ids, data, head_start)
            return
        with torch.cuda.stream(self.stream):
            # stream order: this copy overwrites `on_device` only after the last scatter read it
            staged = self.on_device.get(tuple(data.shape), data.dtype, self.device)
            staged.copy_(data, non_blocking=True)
            self.slots[k].record(self.stream)  # the slot is free again once this copy is done
            scatter_blocks(cache, ids, staged, head_start)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """One pull's scatters: after what the caller queued on the device, and all done on exit,
        failed or not (the caller hands the blocks to the engine next, or prefills them)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            try:
                yield
            finally:
                self.stream.synchronize()
            return
        try:
            yield
        finally:
            pending = list(self._scattering.values())
            self._scattering.clear()
            wait(pending)
        for scattered in pending:
            scattered.result()  # a failed scatter fails the pull

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()


@dataclass
class TcpPuller(ConnectedPuller):
    """D side of the tcp transport. `timeout_s` bounds a whole pull, connect included;
    the connection to each source is kept for the next pull (see connections.py)."""

    name: str = "tcp"
    _landing: _Landing | None = None  # receive buffers (and stream), reused across pulls

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
        start = time.perf_counter()
        device = kv_caches[0].device
        local = as_index(local_block_ids, device)
        head_start = 0 if heads is None else heads.local_start
        if self._landing is None or self._landing.device != device:
            if self._landing is not None:
                self._landing.close()
            stream = self.own_stream(device) if device.type == "cuda" else None
            self._landing = _Landing.for_device(device, stream)
        landing = self._landing

        def exchange(conn: Connection) -> tuple[int, bool, bool]:
            """Send the read, receive and scatter each layer; P's last word: lease live (and
            released, if asked)?"""
            nbytes = 0
            reply = conn.call(
                {
                    "op": "read",
                    "request_id": remote_request_id,
                    "lease_token": lease_token,
                    "block_ids": remote_block_ids,
                    "heads": None if heads is None else [heads.remote_start, heads.remote_stop],
                    "release": release,
                }
            )
            if reply["num_layers"] != len(kv_caches):
                raise TransferError(f"{reply['num_layers']} remote layers, {len(kv_caches)} local")
            with landing.session():
                for i, cache in enumerate(kv_caches):
                    header = conn.recv()
                    if header.get("layer") != i:
                        raise TransferError(f"expected layer {i}, got {header}")
                    self._check(header, cache, len(local), heads)
                    data = conn.recv_tensor(header, landing.slot(i))
                    landing.scatter(cache, local, data, i, head_start)
                    nbytes += data.nbytes
            last = conn.recv()
            return nbytes, bool(last["live"]), bool(last.get("released"))

        budget = pull_timeout_s(self.timeout_s, kv_caches, len(local))
        # a malformed stream surfaces as one of these
        nbytes, released = self._run_pull(endpoint, remote_request_id, budget, exchange,
                                          (KeyError, TypeError, IndexError, RuntimeError))
        return PullStats(self.name, len(local_block_ids), nbytes, time.perf_counter() - start,
                         released)

    def close(self) -> None:
        super().close()
        if self._landing is not None:
            self._landing.close()
            self._landing = None

    @staticmethod
    def _check(header: dict, cache: torch.Tensor, n: int, heads: HeadSlice | None) -> None:
        """The layer announced is the one expected: checked before a byte of it is received."""
        num_heads = cache.shape[3] if heads is None else heads.num_heads
        want = [2, n, cache.shape[2], num_heads, cache.shape[4]]
        dtype = str(cache.dtype).removeprefix("torch.")
        if header.get("shape") != want or header.get("dtype") != dtype:
            raise TransferError(
                f"got {header.get('shape')} {header.get('dtype')}, want {want} {dtype}"
            )
