"""Seeded sampling's Exp(1) noise on the GPU in one launch: the bits of
engine/seeded_noise.py's torch path, in registers.

The torch path runs some 25 elementwise int64 kernels over [rows, vocab] (about 0.6 ms at
batch 1 and 1 ms at batch 32 x 128k on an H100); here each element is hashed in uint32
arithmetic, whose wrapping multiply is what the torch path's `& 0xFFFFFFFF` computes, so
the integers are identical and only the final log may differ in its last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # vocabulary entries a program writes


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def _noise_kernel(keys_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    k0 = tl.load(keys_ptr + 2 * row).to(tl.uint32)
    k1 = tl.load(keys_ptr + 2 * row + 1).to(tl.uint32)
    bits = _mix32(_mix32(cols.to(tl.uint32) ^ k0) ^ k1)
    bits = _mix32(bits ^ k0)
    uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    tl.store(out_ptr + row.to(tl.int64) * vocab + cols, -tl.log(uniform), mask=cols < vocab)


def noise_rows(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 Exp(1) noise [rows, vocab] from `keys` [rows, 2] int64 (32-bit words)."""
    out = torch.empty(keys.shape[0], vocab, dtype=torch.float32, device=keys.device)
    _noise_kernel[(keys.shape[0], triton.cdiv(vocab, BLOCK))](keys, out, vocab, BLOCK=BLOCK)
    return out
