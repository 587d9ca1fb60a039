"""Counter-based sampling noise: a seeded request's Exp(1) noise at output position i is a
pure function of (seed, prompt, i, vocabulary index), so every layout draws the same token.

A per-request torch.Generator made the text depend on where a request's tokens were drawn:
P samples the first token, D continued with a fresh generator, a resumed request restarted
one. Here nothing is carried between steps. Each row's 64-bit key is a BLAKE2b of (seed,
the prompt's digest, position) on the host (a few microseconds per row); the vocabulary-
wide part is integer hashing in torch, batched over all seeded rows at once. Every integer
stays below 2**63 (32-bit words times constants below 2**31), so int64 never overflows and
CPU and CUDA compute the same bits; only the final float log may differ by an ulp. On a
GPU one Triton kernel (kernels/triton_seeded_noise.py) computes the same bits in uint32.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np
import torch

from pdserve.engine.host_to_device import to_device

_MASK32 = 0xFFFFFFFF
# odd multipliers below 2**31: a 32-bit word times one stays below 2**63
_MUL_A, _MUL_B = 0x7FEB352D, 0x2C1B3C6D


def prompt_digest(prompt_token_ids: Sequence[int]) -> bytes:
    """16 bytes naming the prompt; the same on every instance that tokenized it alike."""
    ids = np.asarray(prompt_token_ids, dtype=np.int64)
    return hashlib.blake2b(ids.tobytes(), digest_size=16).digest()


def row_key(seed: int, digest: bytes, position: int) -> tuple[int, int]:
    """Two 32-bit words keying one (request, position)'s noise."""
    head = struct.pack("<QQ", seed & (2**64 - 1), position)
    key = hashlib.blake2b(head + digest, digest_size=8).digest()
    lo, hi = struct.unpack("<II", key)
    return lo, hi


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche of 32-bit words held in int64 (xorshift-multiply rounds)."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 16)


def exponential_noise(keys: Sequence[tuple[int, int]], vocab: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """Exp(1) noise [len(keys), vocab], each row a function of its key alone."""
    k = to_device([w for key in keys for w in key], torch.long, device).view(-1, 2)
    if device.type == "cuda":  # the same bits in one Triton launch instead of ~25 kernels
        from pdserve.kernels.triton_seeded_noise import noise_rows

        return noise_rows(k, vocab).to(dtype)
    v = torch.arange(vocab, dtype=torch.long, device=device)[None, :]
    bits = _mix32(_mix32(v ^ k[:, :1]) ^ k[:, 1:])
    bits = _mix32(bits ^ k[:, :1])  # a third round: both key words reach every output bit
    # 24 bits, centred in their interval: uniform in (0, 1), exact in float32
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)
    return (-torch.log(uniform)).to(dtype)


def warm_up(vocab: int, device: torch.device) -> None:
    """Compile the GPU kernel at start, not at the first seeded request (a ~1 s stall)."""
    if device.type == "cuda":
        exponential_noise([(0, 0)], vocab, torch.float32, device)
