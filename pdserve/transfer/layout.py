"""The shape of one engine rank's KV cache, as it travels in kv_transfer_params.

Each layer's cache is a tensor [2, num_blocks, block_size, rank_kv_heads, head_dim]
(see pdserve/kernels/attention.py). With tensor parallelism each rank holds a slice of
the KV heads, so a decode rank may need heads from one or several prefill ranks; that
plan is `KVLayout.head_slices_from`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where tensors are made: a server parses layouts without it
    import torch


class IncompatibleLayout(ValueError):
    """Two engines' KV caches cannot exchange blocks (the message says what differs)."""


# what a layout may say: it comes off the network, so every field has bounds (an engine
# divides by head counts and multiplies sizes: a 0 or a huge value must never reach it)
DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
INT_BOUNDS = {  # field -> (min, max), both included
    "block_size": (1, 4096),
    "num_layers": (1, 1024),
    "num_kv_heads": (1, 4096),
    "head_dim": (1, 4096),
    "tp_size": (1, 1024),
    "tp_rank": (0, 1023),
}


def bounded_int(value: object, name: str, low: int, high: int) -> int:
    """`value` if it is an int (not a bool, not a float) in [low, high], else ValueError."""
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r:.40}")
    return value


def kv_heads_of_rank(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """Global [start, stop) of the KV heads tensor-parallel rank `tp_rank` holds."""
    if tp_size <= num_kv_heads:
        per_rank = num_kv_heads // tp_size
        return tp_rank * per_rank, (tp_rank + 1) * per_rank
    # more ranks than KV heads: each head is replicated on tp_size // num_kv_heads ranks
    head = tp_rank // (tp_size // num_kv_heads)
    return head, head + 1


@dataclass(frozen=True)
class HeadSlice:
    """Remote heads [remote_start, remote_stop) of `remote_rank` go to local heads from local_start.

    Both ranges are positions in the rank's own cache tensor (not global head numbers).
    """

    remote_rank: int
    remote_start: int
    remote_stop: int
    local_start: int

    @property
    def num_heads(self) -> int:
        return self.remote_stop - self.remote_start

    @property
    def local_stop(self) -> int:
        return self.local_start + self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HeadSlice:
        return cls(**d)


@dataclass(frozen=True)
class KVLayout:
    """What a KV block of one rank looks like: enough to check two engines can swap blocks."""

    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    block_size: int
    num_layers: int
    num_kv_heads: int  # total over all TP ranks
    head_dim: int
    tp_size: int = 1
    tp_rank: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"kv_layout.dtype must be one of {DTYPES}, got {self.dtype!r:.40}")
        for name, (low, high) in INT_BOUNDS.items():
            bounded_int(getattr(self, name), f"kv_layout.{name}", low, high)
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} is outside tp_size {self.tp_size}")
        big, small = max(self.tp_size, self.num_kv_heads), min(self.tp_size, self.num_kv_heads)
        if big % small:
            raise ValueError(
                f"num_kv_heads {self.num_kv_heads} and tp_size {self.tp_size}: "
                "one must divide the other"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def heads(self) -> tuple[int, int]:
        """Global [start, stop) of the KV heads this rank holds."""
        return kv_heads_of_rank(self.num_kv_heads, self.tp_size, self.tp_rank)

    @property
    def rank_kv_heads(self) -> int:
        start, stop = self.heads
        return stop - start

    def cache_shape(self, num_blocks: int) -> tuple[int, int, int, int, int]:
        """Shape of one layer's cache tensor on this rank."""
        return (2, num_blocks, self.block_size, self.rank_kv_heads, self.head_dim)

    def zeros(self, num_blocks: int, device: torch.device | str) -> list[torch.Tensor]:
        """This rank's KV caches, one zeroed tensor per layer, on `device`."""
        import torch

        return [torch.zeros(self.cache_shape(num_blocks), dtype=self.torch_dtype, device=device)
                for _ in range(self.num_layers)]

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block over all layers, on this rank."""
        elem = self.torch_dtype.itemsize
        return self.num_layers * 2 * self.block_size * self.rank_kv_heads * self.head_dim * elem

    def for_rank(self, tp_rank: int) -> KVLayout:
        """The same layout seen from another rank of the same engine."""
        return KVLayout(**{**asdict(self), "tp_rank": tp_rank})

    def check_compatible(self, remote: KVLayout) -> None:
        """Raise IncompatibleLayout unless blocks of `remote` can be copied into this layout."""
        fields = ("dtype", "block_size", "num_layers", "num_kv_heads", "head_dim")
        diffs = [
            f"{name}: local={getattr(self, name)} remote={getattr(remote, name)}"
            for name in fields
            if getattr(self, name) != getattr(remote, name)
        ]
        if diffs:
            raise IncompatibleLayout(
                "KV layouts of the prefill and decode engines differ ("
                + "; ".join(diffs)
                + "). Serve the same model with the same --dtype and --block-size on both "
                "sides; until then this request must be prefilled locally."
            )

    def head_slices_from(self, remote: KVLayout) -> list[HeadSlice]:
        """Which heads of which remote TP rank fill this rank's cache (heterogeneous TP).

        `remote` is any rank of the remote engine (its tp_rank is ignored). Where the
        remote replicates a head on several ranks, ranks are picked round-robin by
        this rank's number, so decode ranks spread their reads.
        """
        self.check_compatible(remote)
        start, stop = self.heads
        slices: list[HeadSlice] = []
        head = start
        while head < stop:
            ranks = [
                r
                for r in range(remote.tp_size)
                if remote.for_rank(r).heads[0] <= head < remote.for_rank(r).heads[1]
            ]
            rank = ranks[self.tp_rank % len(ranks)]
            r_start, r_stop = remote.for_rank(rank).heads
            end = min(stop, r_stop)
            slices.append(HeadSlice(rank, head - r_start, end - r_start, head - start))
            head = end
        return slices

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> KVLayout:
        """Parse a layout that came off the network; ValueError for anything malformed."""
        if not isinstance(d, dict):
            raise ValueError("kv_layout must be a JSON object")
        known = {"dtype", *INT_BOUNDS}
        if not {"dtype", "block_size", "num_layers", "num_kv_heads", "head_dim"} <= set(d):
            raise ValueError(f"kv_layout needs dtype, block_size, num_layers, num_kv_heads "
                             f"and head_dim; got {sorted(map(str, d))[:10]}")
        if extra := set(d) - known:
            raise ValueError(f"kv_layout has unknown fields {sorted(map(str, extra))[:5]}")
        return cls(**d)
