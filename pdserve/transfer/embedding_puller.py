"""P side: pull one image's embedding rows from an encoder's EmbeddingSource.

The shape is checked three times: the handle must promise what P expects (its own
preprocessing of the same image gives `num_tokens`; its model gives `hidden_size`), and
E's header must announce exactly that shape and the handle's dtype before a byte of the
rows is read. Anything else is a TransferError, and P encodes the image itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from pdserve.security import DeploymentSecret
from pdserve.transfer.connections import SourceConnections
from pdserve.transfer.embedding_params import RemoteEmbedding
from pdserve.transfer.protocol import TransferError
from pdserve.transfer.transports import choose_transport
from pdserve.transfer.wire import Connection


@dataclass
class EmbeddingPuller:
    """Pulls rows over connections kept open across pulls (one per source). Thread-safe:
    each thread gets its own connections, as a SourceConnections serves one thread."""

    secret: DeploymentSecret | None
    timeout_s: float = 10.0
    _local: threading.local = field(default_factory=threading.local)
    _all: list[SourceConnections] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pull(self, handle: RemoteEmbedding, num_tokens: int, hidden_size: int) -> torch.Tensor:
        """The rows [num_tokens, hidden_size] of `handle`, the lease ended with the read;
        TransferError if E is unreachable, refuses, or sends another shape."""
        if (handle.num_tokens, handle.hidden_size) != (num_tokens, hidden_size):
            raise TransferError(f"the encoder's rows are [{handle.num_tokens}, "
                                f"{handle.hidden_size}], this image needs [{num_tokens}, "
                                f"{hidden_size}]")
        # embeddings are served over tcp only: a few hundred KB a tile, one copy each
        choose_transport(handle.endpoint, torch.device("cpu"), "tcp")
        want = [num_tokens, hidden_size]

        def exchange(conn: Connection) -> torch.Tensor:
            conn.send({"op": "read", "lease_id": handle.lease_id,
                       "lease_token": handle.lease_token, "release": True})
            header = conn.recv()
            if header.get("shape") != want or header.get("dtype") != handle.dtype:
                raise TransferError(f"the encoder sent {header.get('shape')} "
                                    f"{header.get('dtype')}, not {want} {handle.dtype}")
            rows = conn.recv_tensor(header)
            last = conn.recv()
            if not last.get("live"):
                raise TransferError(f"lease {handle.lease_id!r} ended during the read")
            return rows

        start = time.monotonic()
        try:
            return self._conns().run(handle.endpoint, self.timeout_s, exchange)
        except (KeyError, TypeError, ValueError) as e:
            raise TransferError(f"embedding pull failed after "
                                f"{time.monotonic() - start:.3f} s: {e!r}") from e

    def release(self, handle: RemoteEmbedding) -> bool:
        """End a lease P will not read (best effort: it expires anyway)."""
        msg = {"op": "release", "lease_id": handle.lease_id, "lease_token": handle.lease_token}
        try:
            reply = self._conns().run(handle.endpoint, self.timeout_s,
                                      lambda conn: conn.call(msg))
        except TransferError:
            return False
        return bool(reply.get("released"))

    def close(self) -> None:
        with self._lock:
            for conns in self._all:
                conns.close()
            self._all.clear()

    def _conns(self) -> SourceConnections:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = SourceConnections(self.secret)
            with self._lock:
                self._all.append(conns)
        return conns
