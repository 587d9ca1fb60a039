"""Batched block gathers and scatters on layer caches [2, num_blocks, block_size, heads, dim]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdserve.transfer.block_plan import NotPlannable, Side, plan_block_copy
from pdserve.transfer.layout import HeadSlice


@dataclass
class Scratch:
    """One reusable buffer: a fresh 32 MiB tensor per layer page-faults on every pull."""

    _buf: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self._buf is None or self._buf.device != device or self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return self._buf[:nbytes].view(dtype).view(shape)


def gather_blocks(
    cache: torch.Tensor,
    block_ids: torch.Tensor,
    heads: tuple[int, int] | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """The given blocks (and heads) of one layer as one contiguous [2, n, block_size, h, dim]."""
    src = cache if heads is None else cache[:, :, :, heads[0] : heads[1]]
    block_ids = block_ids.to(src.device)
    if scratch is None:
        return src.index_select(1, block_ids)
    shape = (2, len(block_ids), *src.shape[2:])
    # one index_select over a (possibly strided) view copies exactly the bytes needed
    return torch.index_select(src, 1, block_ids, out=scratch.get(shape, src.dtype, src.device))


def scatter_blocks(
    cache: torch.Tensor, block_ids: torch.Tensor, data: torch.Tensor, head_start: int = 0
) -> None:
    """Write `data` [2, n, block_size, h, dim] into blocks `block_ids`, heads from `head_start`."""
    num_heads = data.shape[3]
    dst = (
        cache
        if num_heads == cache.shape[3]
        else cache[:, :, :, head_start : head_start + num_heads]
    )
    dst.index_copy_(1, block_ids.to(dst.device), data.to(dst.device, non_blocking=True))


def as_index(block_ids: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(block_ids, dtype=torch.long, device=device)


def runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) of stretches consecutive on both sides."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if out and s == out[-1][0] + out[-1][2] and d == out[-1][1] + out[-1][2]:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


def copy_blocks(
    src: list[torch.Tensor],
    src_ids: list[int],
    dst: list[torch.Tensor],
    dst_ids: list[int],
    heads: HeadSlice | None,
    scratch: Scratch | None = None,
    kernel: bool = True,
    sides: tuple[Side, Side] | None = None,
) -> int:
    """Copy blocks between two sets of layer caches (any devices); returns bytes moved.

    Both sides addressable from one GPU (the same GPU, or a peer's caches mapped there
    through CUDA IPC): one Triton launch for every layer (block_kernel.py), unless `kernel`
    is False (`sides`: the kernel's precomputed view of both caches, see plan_block_copy).
    Otherwise blocks allocated in order make long runs: one direct slice copy each.
    Scattered blocks: one batched gather and one scatter per layer.
    """
    if kernel and (nbytes := _copy_on_gpu(src, src_ids, dst, dst_ids, heads, sides)) is not None:
        return nbytes
    span = (0, src[0].shape[3]) if heads is None else (heads.remote_start, heads.remote_stop)
    local_start = 0 if heads is None else heads.local_start
    stretches = runs(src_ids, dst_ids)
    nbytes = 0
    if len(stretches) * 4 <= len(src_ids):
        for s, d in zip(src, dst):
            width = span[1] - span[0]
            for a, b, n in stretches:
                out = d[:, b : b + n, :, local_start : local_start + width]
                out.copy_(s[:, a : a + n, :, span[0] : span[1]], non_blocking=True)
                nbytes += out.nbytes
        return nbytes
    src_index, dst_index = as_index(src_ids, src[0].device), as_index(dst_ids, dst[0].device)
    for s, d in zip(src, dst):
        data = gather_blocks(s, src_index, span, scratch)
        scatter_blocks(d, dst_index, data, local_start)
        nbytes += data.nbytes
    return nbytes


def _copy_on_gpu(
    src: list[torch.Tensor],
    src_ids: list[int],
    dst: list[torch.Tensor],
    dst_ids: list[int],
    heads: HeadSlice | None,
    sides: tuple[Side, Side] | None,
) -> int | None:
    """The one-launch kernel copy, or None where it does not apply (the torch path does)."""
    if not (src and dst and src[0].is_cuda and src[0].device == dst[0].device):
        return None
    from pdserve.transfer import block_kernel  # imports triton: only where a GPU copies

    if not block_kernel.kernel_available(dst[0].device):
        return None
    try:
        plan = plan_block_copy(src, src_ids, dst, dst_ids, heads, sides)
    except NotPlannable:
        return None
    return block_kernel.launch(plan, dst[0].device)
