"""P side: one KVSource per engine rank serves leased blocks of its KV caches to decode engines.

One small threaded socket server answers every transport: it streams blocks itself (tcp),
or hands out a mapping of its caches (host shared memory, CUDA IPC handles) and admits
direct reads with `begin`/`end`, always against the LeaseTable the engine fills.

A connection starts with a mutual challenge (handshake.py): D proves it holds the
deployment secret before P answers anything, and P proves it too. A wrong answer closes it.

Messages (see wire.py), each answered by one reply or {"error": ...}, but a quiet `end`;
every op on a lease carries its `lease_token` (the request id alone grants nothing):
  ping                                  -> {layout}
  open    {transport}                   -> {mapping}           host / cuda_ipc
  begin   {request_id, lease_token, block_ids} -> {lease_id, pinned_s} before a direct read
  stage   {request_id, lease_token, block_ids, heads, layers} -> {layers}   host via staging
  end     {request_id, lease_token, lease_id, release, reply} -> {live, released}, or
                                                     nothing with reply: false    after it
  read    {request_id, lease_token, block_ids, heads, release} -> {num_layers}, a tensor
                                                     per layer, {live, released}        tcp
  release {request_id, lease_token}     -> {released}
An admitted read (`begin` .. `end`, or a whole `read`) pins the lease in the table: a
release or expiry meanwhile is carried out only when the read ends, so `live` is true for
every read this connection began, and D may send `end` with `reply: false` and not wait.
A read also ends when its connection closes; P closes a connection that sat silent for
`read_timeout_s`, so a pin lasts at least `pinned_s` (that) after `begin`'s reply: a copy
that took longer must ask (`reply: true`). `stage` reads only within this connection's
begun reads. `release: true` on a pull's last `end` or `read` ends the lease with the read,
as `release` would. A connection carries any number of them in turn: D keeps one open per
source across pulls (connections.py) until it sits idle for `read_timeout_s` or the source
closes.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import uuid
from dataclasses import dataclass, field

import torch

from pdserve.security import DeploymentSecret, SecretError, capability_matches
from pdserve.transfer import cuda_ipc, host
from pdserve.transfer.blockcopy import Scratch, as_index
from pdserve.transfer.handshake import HANDSHAKE_TIMEOUT_S, prove_source
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.staging import StagingBuffer
from pdserve.transfer.tcp import host_slots, send_layers
from pdserve.transfer.wire import HostSlot, recv_msg, send_msg, widen_socket_buffers


class Refused(Exception):
    """A request the source will not serve; its message goes back to D."""


@dataclass(frozen=True)
class _Read:
    """A read this connection began: its lease stays pinned until `end` or the close."""

    request_id: str
    lease_id: int
    token: str  # the capability `begin` was given: every later op on the read must offer it

    def matches(self, request_id: object, lease_id: object, token: object) -> bool:
        return (request_id == self.request_id and lease_id == self.lease_id
                and capability_matches(self.token, token))


@dataclass
class _Peer:
    """What one D connection holds on the source."""

    scratch: Scratch = field(default_factory=Scratch)  # connections are served concurrently
    holds_staging: bool = False
    reads: list[_Read] = field(default_factory=list)  # begun, not yet ended
    tcp_slots: tuple[HostSlot, ...] | None = None  # the tcp stream's host buffers, kept

    def slots(self, pinned: bool) -> tuple[HostSlot, ...]:
        """Host buffers for tcp reads: made on the first, kept for the next ones (pinned
        where the caches are on a GPU)."""
        if self.tcp_slots is None or self.tcp_slots[0].pinned != pinned:
            self.tcp_slots = host_slots(pinned)
        return self.tcp_slots


@dataclass
class KVSource:
    """Serves reads of leased blocks of one rank's `kv_caches` (started once per engine rank).

    `secret` is the deployment's: only a peer that answers its challenge is served.
    `shm_name` is the name given to `allocate_shared_kv_caches` when the caches live in
    shared memory (enables the host transport). CUDA caches enable cuda_ipc. tcp always works.
    `staging_bytes` > 0 serves the host transport from caches not in shared memory (GPU)
    through a staging buffer of that size. `advertise_host` is the address D should dial
    (default: the bound address; bind "0.0.0.0" and advertise an IP for other hosts).
    """

    kv_caches: list[torch.Tensor]
    layout: KVLayout
    leases: LeaseTable
    bind_host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    shm_name: str | None = None
    read_timeout_s: float = 30.0  # idle connections close; a read's lease lives this + its bytes
    staging_bytes: int = 0
    # the owner's own CUDA IPC export, for caches this process only mapped (a TP worker's):
    # an imported allocation cannot be exported again
    ipc_layers: list[dict] | None = None
    secret: DeploymentSecret | None = None  # required: set by the engine from EngineArgs

    def __post_init__(self) -> None:
        if self.secret is None:
            raise SecretError("a KV source needs the deployment secret: set "
                              "$PDSERVE_DEPLOYMENT_SECRET or pass --secret-file")
        self.refused_handshakes = 0  # connections closed for a wrong answer to the challenge
        self._server: socketserver.ThreadingTCPServer | None = None
        self._peers_lock = threading.Lock()
        self._live: set[socket.socket] = set()  # D connections being served, closed by close()
        self._accepted = 0
        self._stopped = False
        self._device = self.kv_caches[0].device
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        self._staging: StagingBuffer | None = None
        if self.staging_bytes and not self.shm_name:
            name = f"staging-{uuid.uuid4().hex[:8]}"
            self._staging = StagingBuffer(name, self.staging_bytes, self._device)

    @property
    def transports(self) -> list[str]:
        """Transports this source serves, best first."""
        host = ["host"] if self.shm_name or self._staging else []
        return (["cuda_ipc"] if self._device.type == "cuda" else []) + host + ["tcp"]

    def start(self) -> KVSource:
        """Bind and serve in a daemon thread; returns self."""
        source = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                source._serve_connection(self.request)

        server = socketserver.ThreadingTCPServer((self.bind_host, self.port), Handler, False)
        server.daemon_threads = True  # a stuck D connection must not keep P alive
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        self.port = server.server_address[1]
        self._server = server
        self._stopped = False
        threading.Thread(target=server.serve_forever, name="kv-source", daemon=True).start()
        return self

    def endpoint(self) -> dict:
        """How D reaches this source: goes into kv_transfer_params (one per P rank)."""
        if self._server is None:
            raise RuntimeError("KVSource.start() first")
        return {
            "host": self.advertise_host or self.bind_host,
            "port": self.port,
            "host_id": host.local_host_id(),
            "transports": self.transports,
            "device": self._device.type,
            "tp_rank": self.layout.tp_rank,
            "gpu_uuid": cuda_ipc.gpu_uuid(self._device),
        }

    @property
    def connections_accepted(self) -> int:
        """D connections accepted since start (D keeps one per puller open across pulls)."""
        return self._accepted

    def close(self) -> None:
        """Stop serving, and end D's open connections (the caches and their shared memory stay
        the engine's to free)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._peers_lock:
            self._stopped = True
            live = list(self._live)
        for sock in live:  # D's persistent connections must not outlive the caches they read
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    def _serve_connection(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.read_timeout_s)  # an idle or stuck D does not hold a thread forever
        with self._peers_lock:
            if self._stopped:  # accepted while close() ran
                return
            self._accepted += 1
            self._live.add(sock)
        # OSError: D went away or stalled (its lease simply runs out); ValueError: garbage
        with contextlib.suppress(OSError, ValueError):
            peer = _Peer()
            try:
                if self._authenticated(sock):
                    self._serve_messages(sock, peer)
            finally:
                self._unstage(peer)
                self._end_reads(peer)  # D went away mid-read: its pins go, deferred frees run
                with self._peers_lock:
                    self._live.discard(sock)

    def _authenticated(self, sock: socket.socket) -> bool:
        """The mutual challenge, before anything is served; False (and counted): close."""
        sock.settimeout(min(HANDSHAKE_TIMEOUT_S, self.read_timeout_s))
        ok = False
        try:
            ok = prove_source(sock, self.secret)
        finally:
            if not ok:
                with self._peers_lock:
                    self.refused_handshakes += 1
        sock.settimeout(self.read_timeout_s)
        return ok

    def _serve_messages(self, sock: socket.socket, peer: _Peer) -> None:
        while (msg := recv_msg(sock)) is not None:
            try:
                self._dispatch(sock, msg, peer)
            except Refused as e:
                self._answer(sock, msg, {"error": str(e)})
            except (KeyError, TypeError, IndexError, ValueError, RuntimeError) as e:
                # a malformed request (or bad block ids) must not kill the server thread
                self._answer(sock, msg, {"error": f"bad request {msg.get('op')!r}: {e!r}"})

    @staticmethod
    def _answer(sock: socket.socket, msg: dict, reply: dict) -> None:
        """Reply, unless D said it reads no reply (a stray one would put the stream out of step)."""
        if not (msg.get("op") == "end" and msg.get("reply") is False):
            send_msg(sock, reply)

    def _dispatch(self, sock: socket.socket, msg: dict, peer: _Peer) -> None:
        op = msg.get("op")
        if op == "ping":
            send_msg(sock, {"layout": self.layout.to_dict()})
        elif op == "open":
            send_msg(sock, {"mapping": self._mapping(msg.get("transport"))})
        elif op == "begin":
            read = self._admit(msg, peer)
            send_msg(sock, {"lease_id": read.lease_id, "pinned_s": self.read_timeout_s})
        elif op == "stage":
            send_msg(sock, {"layers": self._stage(msg, peer)})
        elif op == "end":
            self._unstage(peer)
            rid, lease_id, token = msg["request_id"], msg["lease_id"], msg["lease_token"]
            released = self._release_if(msg, lease_id)  # carried out as the read ends
            read = next((r for r in peer.reads if r.matches(rid, lease_id, token)), None)
            if read is not None:
                live = self._end_read(peer, read)
            else:  # no read of this connection's (a stray end): only the table can tell
                live = self.leases.is_live(rid, lease_id, token)
            self._answer(sock, msg, {"live": live, "released": released})
        elif op == "read":
            self._stream_blocks(sock, msg, peer)
        elif op == "release":
            released = self.leases.release_later(msg["request_id"], msg["lease_token"])
            send_msg(sock, {"released": released})
        else:
            raise Refused(f"unknown op {op!r}")

    def _admit(self, msg: dict, peer: _Peer) -> _Read:
        """Begin a read for this connection: the lease is pinned until `_end_read`."""
        rid, blocks, token = msg["request_id"], msg["block_ids"], msg["lease_token"]
        lease_id = self.leases.begin_read(rid, blocks, token)
        if lease_id is None:
            raise Refused(f"no live lease of request {rid!r} with this lease_token covers "
                          f"blocks {blocks}")
        read = _Read(rid, lease_id, token)
        peer.reads.append(read)  # before anything can fail: the close then unpins it
        return read

    def _end_read(self, peer: _Peer, read: _Read) -> bool:
        peer.reads.remove(read)
        return self.leases.end_read(read.lease_id)

    def _end_reads(self, peer: _Peer) -> None:
        while peer.reads:
            self._end_read(peer, peer.reads[-1])

    def _mapping(self, transport: str | None) -> dict:
        if transport not in self.transports or transport == "tcp":
            raise Refused(f"transport {transport!r} not served here (serving {self.transports})")
        if transport == "host" and self.shm_name:
            return host.describe_shared_kv_caches(self.kv_caches, self.shm_name)
        if transport == "host" and self._staging is not None:
            return self._staging.describe()
        return {"layers": self.ipc_layers or cuda_ipc.export_kv_caches(self.kv_caches)}

    def _heads(self, msg: dict) -> tuple[int, int]:
        start, stop = msg.get("heads") or (0, self.layout.rank_kv_heads)
        if not 0 <= start < stop <= self.layout.rank_kv_heads:
            raise Refused(
                f"heads [{start}, {stop}) outside this rank's {self.layout.rank_kv_heads}"
            )
        return start, stop

    def _stage(self, msg: dict, peer: _Peer) -> list[dict]:
        if self._staging is None:
            raise Refused("no staging buffer here")
        heads = self._heads(msg)
        first, last = msg["layers"]
        rid, blocks, token = msg["request_id"], msg["block_ids"], msg["lease_token"]
        # only under a pin this connection holds: nothing may reuse the blocks mid-stage
        if not any(r.matches(rid, r.lease_id, token) and self.leases.covers(r.lease_id, blocks)
                   for r in peer.reads):
            raise Refused(f"no read of request {rid!r} covering blocks {blocks} was begun")
        if not peer.holds_staging:
            if not self._staging.acquire(self.read_timeout_s):
                raise Refused("the staging buffer stayed busy; retry or use tcp")
            peer.holds_staging = True
        ids = as_index(msg["block_ids"], self._device)
        with torch.cuda.stream(self._stream) if self._stream else contextlib.nullcontext():
            return self._staging.stage(self.kv_caches, range(first, last), ids, heads, peer.scratch)

    def _unstage(self, peer: _Peer) -> None:
        if peer.holds_staging and self._staging is not None:
            self._staging.release()
        peer.holds_staging = False

    def _stream_blocks(self, sock: socket.socket, msg: dict, peer: _Peer) -> None:
        heads = self._heads(msg)
        read = self._admit(msg, peer)
        try:
            ids = as_index(msg["block_ids"], self._device)
            widen_socket_buffers(sock)
            send_msg(sock, {"num_layers": len(self.kv_caches)})
            slots = peer.slots(pinned=self._stream is not None)
            send_layers(sock, self.kv_caches, ids, heads, peer.scratch, slots, self._stream)
            released = self._release_if(msg, read.lease_id)
        finally:  # a refused or failed stream must not leave the lease pinned
            live = self._end_read(peer, read)
        send_msg(sock, {"live": live, "released": released})

    def _release_if(self, msg: dict, lease_id: int) -> bool:
        """D's last read asked to end the lease with it (saves D a `release` round trip)."""
        return bool(msg.get("release")) and self.leases.release_later(
            msg["request_id"], msg["lease_token"], lease_id)

