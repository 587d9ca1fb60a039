"""D's persistent connections to KV sources: one per P endpoint, reused across pulls.

Dialing P for every pull (and again for its `release`) costs a handshake and, for the
mapped transports, an `open` round trip: on one host that is a large part of a pull whose
copy takes a few milliseconds. `SourceConnections.run` hands an exchange the cached
connection to P and dials only when there is none, or P closed it (idle past its
`read_timeout_s`, or restarted). A connection on which anything failed is closed, never
reused: its stream may have stopped mid-message. What P handed a connection (mappings of
its caches, `Connection.mappings`) lives and dies with it, since a new connection to the
same port may reach a new P process. A new connection first proves the deployment secret
both ways (handshake.py). Not thread-safe: one per puller, like KVPuller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from pdserve.security import DeploymentSecret
from pdserve.transfer.protocol import TransferError
from pdserve.transfer.wire import Connection, PeerClosed

T = TypeVar("T")


def endpoint_key(endpoint: dict) -> tuple[str, int]:
    return str(endpoint.get("host")), int(endpoint.get("port") or 0)


@dataclass
class SourceConnections:
    """Open connections to KV sources by (host, port), made with the deployment `secret`."""

    secret: DeploymentSecret | None = None  # None: every connection fails (TransferError)
    max_idle_s: float = 60.0  # close what sat unused this long (a P that went away for good)
    _open: dict[tuple[str, int], Connection] = field(default_factory=dict)
    _last_used: dict[tuple[str, int], float] = field(default_factory=dict)

    def run(
        self,
        endpoint: dict,
        timeout_s: float,
        exchange: Callable[[Connection], T],
        connect_timeout_s: float | None = None,
    ) -> T:
        """`exchange(conn)` over the connection to `endpoint`, connect included within
        `timeout_s`. A reused connection that P closed before answering (its idle timeout
        raced our request) is dialed again once; any other failure closes it and propagates."""
        deadline = time.monotonic() + timeout_s
        conn, reused = self._connection(endpoint, deadline, connect_timeout_s)
        replies = conn.replies
        try:
            return self._exchange(endpoint, conn, exchange)
        except PeerClosed:
            if not reused or conn.replies != replies:
                raise
        conn, _ = self._connection(endpoint, deadline, connect_timeout_s)
        return self._exchange(endpoint, conn, exchange)

    def release(self, endpoint: dict, request_id: str, lease_token: str, timeout_s: float
                ) -> bool:
        """Ask the source to end the lease of `request_id`; TransferError if unreachable."""
        msg = {"op": "release", "request_id": request_id, "lease_token": lease_token}
        reply = self.run(endpoint, timeout_s, lambda conn: conn.call(msg))
        return bool(reply["released"])

    def close(self) -> None:
        """Close every connection (and so drop every mapping of a source's caches)."""
        for key in list(self._open):
            self._drop(key)

    def __len__(self) -> int:
        return len(self._open)

    def _exchange(self, endpoint: dict, conn: Connection, exchange: Callable[[Connection], T]) -> T:
        key = endpoint_key(endpoint)
        try:
            result = exchange(conn)
        except BaseException:
            self._drop(key)  # the stream may be mid-message, or P's mapping bad: start afresh
            raise
        self._last_used[key] = time.monotonic()
        return result

    def _connection(
        self, endpoint: dict, deadline: float, connect_timeout_s: float | None
    ) -> tuple[Connection, bool]:
        """The open connection to `endpoint` (and True), or a new one (and False)."""
        self._close_idle()
        key = endpoint_key(endpoint)
        conn = self._open.get(key)
        if conn is not None and conn.is_open():
            conn.deadline = deadline
            return conn, True
        self._drop(key)  # closed by P: idle too long, or P restarted
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferError(f"KV source {key[0]}:{key[1]}: timed out")
        conn = self._open[key] = Connection(endpoint, left, connect_timeout_s, self.secret)
        conn.deadline = deadline
        return conn, False

    def _close_idle(self) -> None:
        now = time.monotonic()
        for key, used in list(self._last_used.items()):
            if now - used > self.max_idle_s:
                self._drop(key)

    def _drop(self, key: tuple[str, int]) -> None:
        conn = self._open.pop(key, None)
        self._last_used.pop(key, None)
        if conn is not None:
            conn.close()


PIN_MARGIN = 0.5  # of P's `pinned_s`: a copy finished within it needs no answer to `end`


def admitted_copy(conn: Connection, request_id: str, block_ids: list[int],
                  copy: Callable[[], int], finish: Callable[[], None] | None = None,
                  release: bool = False, *, lease_token: str) -> tuple[int, bool, bool]:
    """`copy()` between P's `begin` (admits the read and pins the lease) and `end` (unpins it
    and, with `release`, ends the lease): returns the bytes copied, whether the lease was live
    all along, and whether P was asked to end it (`release` reached P).

    With `finish`, `copy()` only queues the copy on the device (it must not use the
    connection) and `finish()` waits for it: `begin`'s round trip then overlaps the copy.
    That is safe because a lease never comes back once ended: if it is live when P admits
    the read, it was live since P answered, so the blocks held P's data all along; P
    refusing `begin` fails the pull, whatever the copy read. From admission on, P keeps the
    blocks until `end` or the connection's close (source.py), so `end` goes unanswered and
    the pull returns once the copy is done: P's answer could only say "live"."""
    begin = {"op": "begin", "request_id": request_id, "lease_token": lease_token,
             "block_ids": block_ids}
    sent = time.monotonic()
    if finish is None:
        lease = conn.call(begin)
        nbytes = copy()
    else:
        conn.send(begin)
        try:
            nbytes = copy()
            lease = conn.recv()
        finally:
            finish()  # D's blocks must not be handed back while the copy still writes them
    end = {"op": "end", "request_id": request_id, "lease_token": lease_token,
           "lease_id": lease["lease_id"], "release": release}
    pinned_s = lease.get("pinned_s")
    if pinned_s is None or time.monotonic() - sent >= PIN_MARGIN * float(pinned_s):
        # an older P, or a copy so slow that P may have dropped a silent connection: ask
        ended = conn.call(end)
        return nbytes, bool(ended["live"]), bool(ended.get("released"))
    try:
        conn.send(end | {"reply": False})
    except TransferError:  # the copy was pinned, but P may not have heard `end`:
        conn.close()  # its read ends with the connection, and D releases explicitly
        return nbytes, True, False
    return nbytes, True, release


@dataclass
class ConnectedPuller:
    """What every transport's puller shares: one connection per source, reused for pulls
    and releases, and how a pull over it succeeds or fails."""

    timeout_s: float = 10.0
    conns: SourceConnections = field(default_factory=SourceConnections)
    name: str = "?"  # each transport's own name
    # copies run on streams of their own: on the engine's they would queue behind its steps
    _streams: dict[torch.device, torch.cuda.Stream] = field(default_factory=dict)

    def release(self, endpoint: dict, remote_request_id: str, lease_token: str) -> bool:
        """Tell the source the blocks of `remote_request_id` may be freed."""
        return self.conns.release(endpoint, remote_request_id, lease_token, self.timeout_s)

    def close(self) -> None:
        """Close the connections, and with them every mapping of a source's caches."""
        self.conns.close()

    def own_stream(self, device: torch.device) -> torch.cuda.Stream:
        """This puller's CUDA stream on `device`, made once."""
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _run_pull(self, endpoint: dict, remote_request_id: str, budget_s: float,
                  exchange: Callable[[Connection], tuple[int, bool, bool]],
                  errors: tuple[type[BaseException], ...]) -> tuple[int, bool]:
        """`exchange(conn)` -> (bytes, lease live at its end, release sent to P) over the
        connection to P: `errors` it raises on bad data become a TransferError naming P, and a
        lease that ended meanwhile fails the pull (its blocks may have been reused). Returns
        (bytes, released)."""
        try:
            nbytes, live, released = self.conns.run(endpoint, budget_s, exchange, self.timeout_s)
        except TransferError:
            raise
        except errors as e:
            where = f"{endpoint.get('host')}:{endpoint.get('port')}"
            raise TransferError(f"{self.name} pull from {where} failed: {e!r}") from e
        if not live:
            raise TransferError(f"lease of {remote_request_id!r} ended during the copy")
        return nbytes, released
