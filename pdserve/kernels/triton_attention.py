"""The Triton path of `paged_attention`: store K/V, then decode and prefill kernels.

Decode sequences (query length 1) go through the split-KV decode kernel, whose grid depends
only on the batch size (CUDA-graph safe); every longer query chunk goes through the prefill
kernel. Each kernel reads the step's own K/V from k/v and stores them in the cache itself,
so a step is one or two launches and needs no separate KV-store launch. A step of long
fresh prompts only (no cached prefix, no decode rows) may go to torch's SDPA instead
(sdpa_prefill.py), after one KV-store launch.
"""

from __future__ import annotations

import torch

from pdserve.kernels.attention import AttentionMetadata
from pdserve.kernels.sdpa_prefill import sdpa_prefill, sdpa_prefill_applies
from pdserve.kernels.triton_decode import DecodeScratch, decode_attention
from pdserve.kernels.triton_kv_store import store_kv
from pdserve.kernels.triton_prefill import prefill_attention


def triton_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    scratch: DecodeScratch | None = None,
) -> torch.Tensor:
    """Paged attention of a mixed varlen batch; q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].

    `out` and `scratch` may be preallocated (e.g. for CUDA-graph capture of decode steps).
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if meta.max_query_len <= 1:  # decode only: the CUDA-graph case
        decode_attention(q, kv_cache, meta, scale, out, scratch, new_kv=(k, v))
        return out
    has_decode = 1 in meta.query_lens_cpu
    if not has_decode and sdpa_prefill_applies(meta.query_lens_cpu, meta.seq_lens_cpu):
        store_kv(k, v, kv_cache, meta.slot_mapping)
        return sdpa_prefill(q, k, v, meta.query_lens_cpu, scale, out)
    if has_decode:
        decode_attention(q, kv_cache, meta, scale, out, scratch, new_kv=(k, v))
    prefill_attention(q, k, v, kv_cache, meta, scale, out, skip_decode=has_decode)
    return out
