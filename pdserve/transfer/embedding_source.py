"""E side: image embedding rows held under leases, and the socket server P pulls them from.

The second payload kind of the transfer layer, beside KV blocks (source.py): the same
LeaseTable (a lease's one "block" is a slot of `EmbeddingStore`), the same mutual
challenge on every connection (handshake.py), the same framed wire (wire.py). A lease is
read or released only with its `lease_token`.

Messages, each answered by one reply or {"error": ...}:
  ping                                        -> {"ok": true}
  read    {lease_id, lease_token, release}    -> the rows (a tensor message), then
                                                 {live, released}
  release {lease_id, lease_token}             -> {released}
A read pins its lease (a release or expiry meanwhile waits for it); `release: true` ends
the lease with the read, so P's one pull needs no second round trip.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import socketserver
import threading
from dataclasses import dataclass, field

import torch

from pdserve.security import DeploymentSecret, SecretError
from pdserve.transfer import host
from pdserve.transfer.handshake import HANDSHAKE_TIMEOUT_S, prove_source
from pdserve.transfer.lease import LeaseTable
from pdserve.transfer.wire import recv_msg, send_msg, send_tensor

MAX_MESSAGE_BYTES = 4096  # P's requests are ~300 bytes: nothing bigger is read


@dataclass
class EmbeddingStore:
    """Rows kept alive for P: each `hold` pins one tensor under a lease until P reads it
    with `release`, releases it, or `ttl_s` passes; at most `max_bytes` held at once."""

    ttl_s: float = 30.0
    max_bytes: int = 1 << 30
    held_bytes: int = 0
    _rows: dict[int, torch.Tensor] = field(default_factory=dict)  # slot -> rows
    _slot_of: dict[str, int] = field(default_factory=dict)  # lease id -> slot
    _slots: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.leases = LeaseTable(self.ttl_s)

    def hold(self, rows: torch.Tensor) -> tuple[str, str] | None:
        """(lease id, lease token) for P to read `rows` with; None if the store is full."""
        self.expire()
        with self._lock:
            if self.held_bytes + rows.nbytes > self.max_bytes:
                return None
            slot = next(self._slots)
            lease_id = f"emb-{slot}"
            self._rows[slot] = rows
            self._slot_of[lease_id] = slot
            self.held_bytes += rows.nbytes
        return lease_id, self.leases.hold(lease_id, [slot]).token

    def begin_read(self, lease_id: object, token: object) -> tuple[int, torch.Tensor] | None:
        """(read id, rows) of a live lease whose token matches, pinned until `end_read`."""
        with self._lock:
            slot = self._slot_of.get(lease_id) if isinstance(lease_id, str) else None
        if slot is None:
            return None
        read = self.leases.begin_read(lease_id, [slot], token)
        return None if read is None else (read, self._rows[slot])

    def end_read(self, read: int) -> bool:
        return self.leases.end_read(read)

    def expire(self) -> None:
        """Drop the rows of leases that ended (released, read with release, or past TTL)."""
        slots = self.leases.expire()
        with self._lock:
            for slot in slots:
                rows = self._rows.pop(slot, None)
                if rows is not None:
                    self.held_bytes -= rows.nbytes
                    self._slot_of.pop(f"emb-{slot}", None)

    def __len__(self) -> int:
        return len(self.leases)


@dataclass
class EmbeddingSource:
    """Serves leased rows of `store` to P over tcp, to holders of the deployment `secret`."""

    store: EmbeddingStore
    secret: DeploymentSecret | None
    bind_host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    read_timeout_s: float = 30.0  # an idle or stuck P does not hold a thread forever

    def __post_init__(self) -> None:
        if self.secret is None:
            raise SecretError("an embedding source needs the deployment secret: set "
                              "$PDSERVE_DEPLOYMENT_SECRET or pass --secret-file")
        self.refused_handshakes = 0
        self.reads = 0
        self._server: socketserver.ThreadingTCPServer | None = None
        self._counts = threading.Lock()

    def start(self) -> EmbeddingSource:
        """Bind and serve in a daemon thread; returns self."""
        source = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                source._serve_connection(self.request)

        server = socketserver.ThreadingTCPServer((self.bind_host, self.port), Handler, False)
        server.daemon_threads = True
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, name="embedding-source",
                         daemon=True).start()
        return self

    def endpoint(self) -> dict:
        """How P reaches this source: goes into every handle."""
        if self._server is None:
            raise RuntimeError("EmbeddingSource.start() first")
        return {"host": self.advertise_host or self.bind_host, "port": self.port,
                "host_id": host.local_host_id(), "transports": ["tcp"]}

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _serve_connection(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # OSError: P went away or stalled (the lease runs out); ValueError: garbage
        with contextlib.suppress(OSError, ValueError):
            sock.settimeout(min(HANDSHAKE_TIMEOUT_S, self.read_timeout_s))
            if not prove_source(sock, self.secret):
                with self._counts:
                    self.refused_handshakes += 1
                return
            sock.settimeout(self.read_timeout_s)
            while (msg := recv_msg(sock, MAX_MESSAGE_BYTES)) is not None:
                self.store.expire()
                try:
                    self._dispatch(sock, msg)
                except (KeyError, TypeError, ValueError) as e:
                    send_msg(sock, {"error": f"bad request {msg.get('op')!r}: {e!r}"})

    def _dispatch(self, sock: socket.socket, msg: dict) -> None:
        op = msg.get("op")
        if op == "ping":
            send_msg(sock, {"ok": True})
        elif op == "read":
            self._read(sock, msg)
        elif op == "release":
            released = self.store.leases.release_later(msg["lease_id"], msg["lease_token"])
            send_msg(sock, {"released": released})
        else:
            send_msg(sock, {"error": f"unknown op {op!r}"})

    def _read(self, sock: socket.socket, msg: dict) -> None:
        lease_id, token = msg["lease_id"], msg["lease_token"]
        begun = self.store.begin_read(lease_id, token)
        if begun is None:
            send_msg(sock, {"error": f"no live lease {str(lease_id)[:64]!r} with this "
                                     "lease_token"})
            return
        read, rows = begun
        released = False
        try:
            send_tensor(sock, {"rows": True}, rows)
            if msg.get("release") is True:
                released = self.store.leases.release_later(lease_id, token, read)
        finally:
            live = self.store.end_read(read)
        with self._counts:
            self.reads += 1
        send_msg(sock, {"live": live, "released": released})
