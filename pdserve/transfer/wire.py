"""The framed binary format on the source's socket, and D's client end of it.

A message is a 4-byte big-endian length and that many bytes of JSON. A message whose
JSON has "nbytes" is followed by that many raw bytes (a tensor's contents, C order, with
its "shape" and "dtype" in the JSON). Every transport's control traffic and the tcp
transport's data use it; the tcp transport's tensors go through reusable `HostSlot`s.
A request gets one reply (or a stream, for tcp's `read`), except an `end` sent with
`"reply": false`, which D only `send`s: nothing comes back for it (source.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pdserve.security import DeploymentSecret
from pdserve.transfer.protocol import TransferError

_LENGTH = struct.Struct("!I")
MAX_HEADER_BYTES = 16 << 20  # a header this big is a corrupt stream, not a message
_CHUNK = 4 << 20
SOCKET_BUFFER_BYTES = 4 << 20  # Linux books twice that: 8 MiB, a good part of a layer, queued


@functools.cache
def _buffer_limits(kind: str) -> tuple[int, int]:
    """Linux's limits on send ("w") or receive ("r") buffers: (the most a program may set,
    net.core.<kind>mem_max; the most autotuning grows one to, net.ipv4.tcp_<kind>mem);
    (0, 0) where unknown."""
    try:
        cap = int(Path(f"/proc/sys/net/core/{kind}mem_max").read_text())
        auto = int(Path(f"/proc/sys/net/ipv4/tcp_{kind}mem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return cap, auto


def widen_socket_buffers(sock: socket.socket, nbytes: int = SOCKET_BUFFER_BYTES) -> None:
    """Ask for `nbytes` send and receive buffers where that beats the kernel's own sizing, best
    effort: a layer in flight then sits in its queues instead of pacing the sender."""
    for option, kind in ((socket.SO_SNDBUF, "w"), (socket.SO_RCVBUF, "r")):
        cap, auto = _buffer_limits(kind)
        # a set size is clipped to `cap` and stops autotuning: worth it only past autotuning's top
        if nbytes <= cap and 2 * nbytes > auto:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, nbytes)


@dataclass
class HostSlot:
    """A reusable host buffer for one layer in flight to or from the socket.

    `pinned` where a GPU copies into or out of it asynchronously; `record` after queueing
    such a copy, and `get` (the only way to the buffer) waits for it before handing the
    buffer out again, so nothing overwrites bytes a copy still reads or writes.
    """

    pinned: bool = False
    _buf: torch.Tensor | None = None
    _event: torch.cuda.Event | None = None

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The buffer as a tensor of `shape`, once the device is done with it (grown if needed)."""
        self.wait()
        nbytes = math.prod(shape) * dtype.itemsize
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None  # the old one goes before the new one comes
            self._buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        return self._buf[:nbytes].view(dtype).view(shape)

    def record(self, stream: torch.cuda.Stream) -> None:
        """The copies queued on `stream` so far use the buffer: `get` and `wait` wait for them."""
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record(stream)

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


def send_msg(sock: socket.socket, msg: dict) -> None:
    body = json.dumps(msg).encode()
    sock.sendall(_LENGTH.pack(len(body)) + body)


def recv_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill `view` from the socket; ConnectionError if the peer closes first.

    With a `deadline` (time.monotonic), a source that trickles bytes still times out.
    """
    got = 0
    while got < len(view):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed mid-message")
            sock.settimeout(left)
        n = sock.recv_into(view[got : got + _CHUNK])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def recv_msg(sock: socket.socket, max_bytes: int = MAX_HEADER_BYTES) -> dict | None:
    """The next message, or None on a clean close between messages; ConnectionError if it
    announces more than `max_bytes`."""
    head = bytearray(_LENGTH.size)
    n = sock.recv_into(head)
    if n == 0:
        return None
    if n < len(head):
        recv_exact(sock, memoryview(head)[n:])
    (length,) = _LENGTH.unpack(head)
    if length > max_bytes:
        raise ConnectionError(f"header of {length} bytes: corrupt stream")
    body = bytearray(length)
    recv_exact(sock, memoryview(body))
    msg = json.loads(body)
    if not isinstance(msg, dict):
        raise ValueError(f"a message must be a JSON object, got {type(msg).__name__}")
    return msg


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def send_tensor(sock: socket.socket, header: dict, t: torch.Tensor) -> None:
    """Send `header` with the tensor's shape, dtype and size, then its bytes."""
    t = t.contiguous().cpu()
    dtype = str(t.dtype).removeprefix("torch.")
    send_msg(sock, {**header, "shape": list(t.shape), "dtype": dtype, "nbytes": t.nbytes})
    sock.sendall(tensor_bytes(t))


def recv_tensor(
    sock: socket.socket, header: dict, deadline: float | None = None, into: HostSlot | None = None
) -> torch.Tensor:
    """The tensor announced by `header` (already received), read from the socket (into the
    buffer of `into`, if given)."""
    dtype = getattr(torch, str(header["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {header['dtype']!r}")
    shape = tuple(header["shape"])
    if math.prod(shape) * dtype.itemsize != header["nbytes"]:
        raise ValueError(f"header says {header['nbytes']} bytes for {shape} {dtype}")
    out = torch.empty(shape, dtype=dtype) if into is None else into.get(shape, dtype)
    recv_exact(sock, tensor_bytes(out), deadline)
    return out


class PeerClosed(TransferError):
    """The source closed the connection (or reset it) instead of answering."""


_CLOSED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class Connection:
    """D's connection to a source: request/reply calls, every failure a TransferError.

    `deadline` (time.monotonic) bounds every call, so a source that stalls mid-stream cannot
    hang D: `timeout_s` from now at first, moved by whoever reuses the connection for a new
    exchange (see connections.py); `connect_timeout_s` (default: the same) the connect.
    A new connection first answers the source's challenge and checks its answer to D's
    (handshake.py): a source without the deployment `secret` is a TransferError.
    """

    def __init__(
        self, endpoint: dict, timeout_s: float, connect_timeout_s: float | None = None,
        secret: DeploymentSecret | None = None,
    ) -> None:
        self.deadline = time.monotonic() + timeout_s
        where = f"{endpoint.get('host')}:{endpoint.get('port')}"
        self.where = where
        self.replies = 0  # whole messages received: tells a closed idle link from a cut reply
        # what the source handed this connection (mappings of its caches): valid only while
        # it is open, since a new connection to the same port may reach a restarted source
        self.mappings: dict[str, Any] = {}
        connect = min(timeout_s, connect_timeout_s or timeout_s)
        try:
            self.sock = socket.create_connection((endpoint["host"], endpoint["port"]), connect)
        except (OSError, KeyError) as e:
            raise TransferError(f"cannot reach KV source {where}: {e}") from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._handshake(secret)
        except BaseException:
            self.sock.close()
            raise
        widen_socket_buffers(self.sock)  # tcp pulls stream whole layers over it

    def _handshake(self, secret: DeploymentSecret | None) -> None:
        from pdserve.transfer.handshake import prove_puller  # it imports this module

        if secret is None:
            raise TransferError("pulling KV needs the deployment secret: set "
                                "$PDSERVE_DEPLOYMENT_SECRET or pass --secret-file")
        self._arm()
        prove_puller(self.sock, secret, self.where)

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TransferError(f"KV source {self.where}: timed out")
        self.sock.settimeout(left)

    def send(self, msg: dict) -> None:
        try:
            self._arm()
            send_msg(self.sock, msg)
        except _CLOSED as e:
            raise PeerClosed(f"KV source {self.where} closed the connection: {e}") from e
        except OSError as e:
            raise TransferError(f"KV source {self.where}: send failed: {e}") from e

    def recv(self) -> dict:
        """The next message; TransferError on close, timeout, or an error reply."""
        try:
            self._arm()
            msg = recv_msg(self.sock)
        except _CLOSED as e:
            raise PeerClosed(f"KV source {self.where} closed the connection: {e}") from e
        except (OSError, ValueError) as e:  # socket.timeout is an OSError
            raise TransferError(f"KV source {self.where}: {type(e).__name__}: {e}") from e
        if msg is None:
            raise PeerClosed(f"KV source {self.where} closed the connection")
        self.replies += 1
        if "error" in msg:
            raise TransferError(f"KV source {self.where} refused: {msg['error']}")
        return msg

    def recv_tensor(self, header: dict, into: HostSlot | None = None) -> torch.Tensor:
        try:
            return recv_tensor(self.sock, header, self.deadline, into)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TransferError(f"KV source {self.where}: {type(e).__name__}: {e}") from e

    def call(self, msg: dict) -> dict:
        self.send(msg)
        return self.recv()

    def is_open(self) -> bool:
        """Whether the connection can carry a new request: not closed by the source, and
        nothing unread on it (a stray message means the stream is out of step)."""
        try:
            self.sock.settimeout(0)  # a peek that must not wait
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing to read: open and idle
        except OSError:
            return False
        return False  # b"": the source closed it; bytes: a reply nobody asked for

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
