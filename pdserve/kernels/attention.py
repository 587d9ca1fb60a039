"""Paged attention: the one seam between the model and the KV cache.

A step's batch is "varlen": the new tokens of every sequence are concatenated into one
[T, heads, head_dim] tensor (decode sequences contribute 1 token, prefill chunks several).
Each layer's cache is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = K, 1 = V). A sequence's earlier tokens are already in its blocks; this step's
K/V are written at `slot_mapping` first, then every query attends causally over
cache[0 .. seq_len).

This file holds the metadata, the portable PyTorch implementation (the CPU path and
the reference for the Triton kernels) and the dispatcher between the two.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pdserve import switches
from pdserve.kernels.cpu_native import native_kernels, paged_decode, paged_prefill, store_kv


@dataclass
class AttentionMetadata:
    """Where each sequence of a step lives in the paged cache (same for every layer)."""

    query_start_loc: torch.Tensor  # int32 [B+1]: cumulative count of new tokens per sequence
    seq_lens: torch.Tensor  # int32 [B]: tokens of the sequence after this step (cached + new)
    block_tables: torch.Tensor  # int32 [B, max_blocks]: physical block ids, padded with 0
    slot_mapping: torch.Tensor  # int64 [T]: cache slot (block * block_size + offset); -1 = skip
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]  # host copies, so the CPU path never syncs
    seq_lens_cpu: list[int]
    # the CPU path's batched-decode indices, built by the first layer, read by the others
    # (rebuilt where the metadata has changed since)
    decode_plan: DecodePlan | None = field(default=None, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass
class DecodePlan:
    """What `_batched_decode` indexes with, the same in every layer of a step: building it
    once instead of per layer saves 29 of 30 rounds of small tensor ops on a CPU step."""

    key: tuple  # what it was built from: a metadata rewritten in place (a replay) rebuilds it
    decodes: list[int]  # the sequences with one query
    longest: int  # the longest of their key ranges
    blocks: torch.Tensor  # int64 [B * n]: their block ids, n blocks each (padded)
    rows: torch.Tensor  # int64 [B]: their query rows in the step's batch
    visible: torch.Tensor  # bool [B, 1, 1, longest]: each sequence's own keys
    tables: torch.Tensor  # int32 [B, n]: their block tables (the native kernel's view)
    lens: torch.Tensor  # int32 [B]: their key counts

    @staticmethod
    def key_of(meta: AttentionMetadata) -> tuple:
        tables = meta.block_tables  # its bytes: a few hundred ints, read where they live (CPU)
        data = tables.numpy().tobytes() if tables.device.type == "cpu" else tables.data_ptr()
        return tuple(meta.query_lens_cpu), tuple(meta.seq_lens_cpu), data

    @staticmethod
    def build(meta: AttentionMetadata, block_size: int, starts: list[int],
              device: torch.device) -> DecodePlan:
        decodes = [i for i, q_len in enumerate(meta.query_lens_cpu) if q_len == 1]
        lens = [meta.seq_lens_cpu[i] for i in decodes]
        longest = max(lens, default=0)
        index = torch.tensor(decodes, device=device, dtype=torch.long)
        tables = meta.block_tables.index_select(0, index)[:, : -(-longest // block_size)]
        visible = torch.arange(longest, device=device)[None, :] < torch.tensor(
            lens, device=device)[:, None]
        return DecodePlan(DecodePlan.key_of(meta), decodes, longest, tables.flatten().long(),
                          torch.tensor([starts[i] for i in decodes], device=device),
                          visible[:, None, None], tables.contiguous(),
                          torch.tensor(lens, device=device, dtype=torch.int32))


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Store this step's K/V ([T, Hkv, D]) into the cache at `slots` (-1 entries are padding)."""
    if store_kv(k, v, kv_cache, slots):  # float32 on the CPU: one pass, no padding mask
        return
    _, num_blocks, block_size, heads, dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, heads, dim)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    flat[0].index_copy_(0, slots, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, v.to(kv_cache.dtype))


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `seq_len` cached K and V of one sequence, each [seq_len, Hkv, D]."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = kv_cache[0].index_select(0, blocks).flatten(0, 1)[:seq_len]
    v = kv_cache[1].index_select(0, blocks).flatten(0, 1)[:seq_len]
    return k, v


def torch_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Reference paged attention in PyTorch: write K/V, then attend: the one-token (decode)
    sequences in one batched call, each prefill chunk on its own; in the native kernels
    (cpu_native.py) where they serve, else in SDPA."""
    write_kv(k, v, kv_cache, meta.slot_mapping)
    q = q.contiguous()
    out = torch.empty_like(q)
    starts = [0, *itertools.accumulate(meta.query_lens_cpu)]
    native = _native_kernel(q, kv_cache)
    decodes = meta.query_lens_cpu.count(1)
    batched = decodes > 1 or (decodes == 1 and native is not None)  # one: SDPA as it is
    if batched:
        if meta.decode_plan is None or meta.decode_plan.key != DecodePlan.key_of(meta):
            meta.decode_plan = DecodePlan.build(meta, kv_cache.shape[2], starts, q.device)
        plan = meta.decode_plan
        if native is not None:
            paged_decode(native, q, out, plan.rows, kv_cache, plan.tables, plan.lens, scale)
        else:
            _batched_decode(q, kv_cache, plan, scale, out)
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if q_len == 0 or (batched and q_len == 1):
            continue
        start = starts[i]
        if native is not None and paged_prefill(
                native, q[start : start + q_len], out[start : start + q_len], seq_len - q_len,
                kv_cache, meta.block_tables[i], scale):
            continue
        if seq_len == q_len:  # a fresh prompt: its keys are this step's, no need to gather
            keys, values = k[start : start + q_len], v[start : start + q_len]
        else:
            keys, values = gather_kv(kv_cache, meta.block_tables[i], seq_len)
        # 4-D [1, H, L, D]: with 3-D inputs torch's CPU SDPA takes its "math" path (a 1024-token
        # prompt of SmolLM2: 88 ms a layer, against 25 ms in the flash kernel; 16 ms causal)
        qi = q[start : start + q_len].transpose(0, 1)[None]  # [1, Hq, q_len, D]
        ki = keys.to(q.dtype).transpose(0, 1)[None]  # [1, Hkv, seq_len, D]
        vi = values.to(q.dtype).transpose(0, 1)[None]
        context = seq_len - q_len
        gqa = qi.shape[1] != ki.shape[1]
        if context == 0:  # a fresh prompt: plain causal, no mask to build or read
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                               enable_gqa=gqa)
        else:  # query j sits at position context + j and sees keys 0 .. context + j
            key_pos = torch.arange(seq_len, device=q.device)
            query_pos = torch.arange(context, seq_len, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale,
                                               enable_gqa=gqa)
        out[start : start + q_len] = o[0].transpose(0, 1)
    return out


def _native_kernel(q: torch.Tensor, kv_cache: torch.Tensor) -> ctypes.CDLL | None:
    """The C attention kernels (cpu_native.py) where they apply: float32 on the CPU."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or kv_cache.dtype != torch.float32:
        return None
    return native_kernels() if kv_cache.is_contiguous() else None


def _batched_decode(q: torch.Tensor, kv_cache: torch.Tensor, plan: DecodePlan, scale: float,
                    out: torch.Tensor) -> None:
    """One query each for the plan's sequences, in one attention call over their keys padded
    to the longest (a CPU step of 8 decodes made 8 x layers small calls: a third of its time)."""

    def gather(cache: torch.Tensor) -> torch.Tensor:  # [B, Hkv, longest, D]
        # index_select: several times faster than cache[tables]
        blocks = cache.index_select(0, plan.blocks).view(len(plan.decodes), -1, *cache.shape[2:])
        return blocks[:, :plan.longest].to(q.dtype).transpose(1, 2)

    keys, values = gather(kv_cache[0]), gather(kv_cache[1])
    queries = q.index_select(0, plan.rows).unsqueeze(2)  # [B, Hq, 1, D]
    o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=plan.visible,
                                       scale=scale, enable_gqa=queries.shape[1] != keys.shape[1])
    out.index_copy_(0, plan.rows, o.squeeze(2))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of this step's queries ([T, Hq, D]) over the paged cache; returns [T, Hq, D].

    Writes this step's K/V first. Triton kernels on CUDA tensors, PyTorch elsewhere;
    `PDSERVE_ATTENTION_BACKEND=torch|triton` forces one (tests force Triton's interpreter).
    """
    if attention_backend(q) == "triton":
        # imported here so that CPU-only installs need no triton
        from pdserve.kernels.triton_attention import triton_paged_attention

        return triton_paged_attention(q, k, v, kv_cache, meta, scale)
    return torch_paged_attention(q, k, v, kv_cache, meta, scale)


def attention_backend(q: torch.Tensor) -> str:
    """The backend to use: the env override if set, else "triton" exactly when q is on CUDA."""
    forced = switches.SWITCHES.attention_backend
    if forced:
        return forced
    return "triton" if q.is_cuda else "torch"


def build_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for a batch: sequence i has `seq_lens[i]` tokens, the last `query_lens[i]` new."""
    slots: list[int] = []
    for q_len, seq_len, table in zip(query_lens, seq_lens, block_tables):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max((len(t) for t in block_tables), default=0) or 1
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
    )
