"""Computed image embeddings by content hash: the same image again is not encoded again."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class EmbeddingCache:
    """Least recently used rows, at most `max_bytes` of them (0: caches nothing)."""

    max_bytes: int
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    _rows: OrderedDict[bytes, torch.Tensor] = field(default_factory=OrderedDict)

    def get(self, content_hash: bytes) -> torch.Tensor | None:
        rows = self._rows.get(content_hash)
        if rows is None:
            self.misses += 1
            return None
        self._rows.move_to_end(content_hash)
        self.hits += 1
        return rows

    def put(self, content_hash: bytes, rows: torch.Tensor) -> None:
        """Keep `rows`, evicting the least recently used until they fit (rows larger than
        the whole cache are not kept)."""
        if rows.nbytes > self.max_bytes or content_hash in self._rows:
            return
        while self.bytes + rows.nbytes > self.max_bytes:
            _, old = self._rows.popitem(last=False)
            self.bytes -= old.nbytes
        self._rows[content_hash] = rows
        self.bytes += rows.nbytes

    def __len__(self) -> int:
        return len(self._rows)
