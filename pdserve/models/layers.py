"""Building blocks of a Llama-family model: RMSNorm, RoPE, SwiGLU and the tensor-parallel seams.

Every parameter is created with `torch.empty` so that the caller's `torch.device(...)` context
and default dtype decide where and how it lives (random presets are built straight on the GPU).
Each tensor-parallel layer holds only its shard and has a method
`weight_loader(param, full_tensor, shard=None)` that copies this rank's slice of a full
(Hugging Face shaped) weight into its parameter `param`. It is a method of the module, not an
attribute of the parameter: a bound method on the parameter would make a reference cycle
that keeps GPU memory alive after `del model` until the garbage collector runs.
With `tp_size == 1` they are plain linears / embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pdserve import switches
from pdserve.kernels import cpu_native
from pdserve.kernels.rope_table import rope_cos_sin_cache


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard: object = None) -> None:
    """Copy a full weight into a replicated parameter."""
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs {tuple(loaded.shape)}")
    param.data.copy_(loaded)


GEMV_MAX_ROWS = 1  # measured on an H100: a clear win at 1 row, within noise at 2-8
# switches.SWITCHES.gemv / fused_gemv (PDSERVE_GEMV, PDSERVE_FUSED_GEMV) are read once per
# process: a captured decode graph keeps whichever kernel it was captured with


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, tp_size: int) -> bool:
    """Whether `linear` runs x through the Triton GEMV rather than `F.linear`."""
    # tp_size 1 only: the kernel is measured and checked against transformers there, not yet
    # in tensor-parallel workers
    return (switches.SWITCHES.gemv and tp_size == 1 and x.is_cuda and x.dim() == 2
            and x.shape[0] <= GEMV_MAX_ROWS and x.dtype == weight.dtype)


def fused_gemv_applies(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp_size: int
) -> bool:
    """Whether the norm before (or SwiGLU after) a linear of x can run inside its GEMV.

    x is the tensor the fused kernel reads (the hidden state before the norm, or gate_up):
    it has the rows, dtype and device of the linear's own input, so this agrees with
    `gemv_applies`. One row only (the fused kernels' shape); no bias (Qwen2's qkv).
    """
    return (switches.SWITCHES.fused_gemv and bias is None and gemv_applies(x, weight, tp_size)
            and x.shape[0] == 1)


ONEDNN_MAX_ROWS = 64  # oneDNN caches a primitive (~0.6-3.5 MB) per row count it has seen,
# and a server sees every prompt length: a step of more rows reaches it as multiples of
# ONEDNN_STRIDE_ROWS only (onednn_linear), about 0.2 GB more, once, up to 2048 rows
ONEDNN_STRIDE_ROWS = 64
# rows past a multiple of 64 are padded up to the next one only where that adds at most 2%
# (a 2,047-row step); otherwise they go apart (the 30 layers' linears, one thread: 1,027 rows
# padded to 1,088 took 2,173-2,211 ms, as 1,024 + 3 2,048-2,092; 1,500 rows the same either
# way; 100 rows padded to 128 were slower than MKL; AVX-512 EPYC, 2026-12-07)
ONEDNN_PAD_AT_MOST = 1.02
# 2 rows are padded to 3: on AVX2 oneDNN's kernel for 2 rows is slower than for 3 (the 30
# layers' linears, one thread: 36.7 ms against 26.6; the engine's decode step of 2 sequences
# 72.6 -> 60.0 ms; 2-core EPYC, 2026-12-07). One row on one thread stays on MKL, where padding
# gained nothing (49.8 / 50.2 ms); on two threads padding changed nothing measurable.
ONEDNN_MIN_ROWS = 3


def onednn_applies(x: torch.Tensor, onednn_weight: torch.Tensor | None) -> bool:
    """Whether `linear` runs x through oneDNN on the weight's packed copy (CPU, float32).

    Every step of two or more rows, and one row on two or more threads, where the packed
    copy is faster (pdserve/models/cpu_layout.py). One row on one thread stays on MKL (~10%
    faster there). A server sees every prompt length and oneDNN keeps a primitive for every
    row count (200 row counts of one shape grew a process by 0.7 GB), so `onednn_linear`
    brings prompt-sized steps to a few row counts."""
    if onednn_weight is None or x.dtype != onednn_weight.dtype:
        return False
    rows = x.numel() // x.shape[-1]
    return rows >= 2 or (rows == 1 and torch.get_num_threads() > 1)


def onednn_linear(x: torch.Tensor, onednn_weight: torch.Tensor, bias: torch.Tensor | None,
                  panel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ bias) through oneDNN. Fewer than ONEDNN_MIN_ROWS rows are padded up to it.
    Past ONEDNN_MAX_ROWS: padded to a multiple of 64 where that adds at most 2% rows, else the
    largest multiple of 64 rows and the rest apart, joined (two large calls joined cost more
    than one: 1,024 rows as two halves took 2,384 ms against 1,950 in one call, so the rest
    is always the small piece). The rest goes to the C kernel where `panel_weight` is given
    (a step's decode rows beside a prompt's: 8 rows, 34 ms on oneDNN against 21)."""
    rows = x.numel() // x.shape[-1]
    if ONEDNN_MIN_ROWS <= rows <= ONEDNN_MAX_ROWS:
        return _onednn_matmul(x, onednn_weight, bias)
    flat, outs, start = x.reshape(rows, x.shape[-1]), [], 0
    for taken, padded_to in _onednn_pieces(rows):
        piece = flat[start:start + taken]
        y = None if panel_weight is None else cpu_native.linear_rows(piece, panel_weight, bias)
        outs.append(_padded(piece, onednn_weight, bias, padded_to) if y is None else y)
        start += taken
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _onednn_pieces(rows: int) -> list[tuple[int, int]]:
    """(rows taken, rows handed to oneDNN) of each call `onednn_linear` makes for a step."""
    stride = ONEDNN_STRIDE_ROWS
    if rows <= ONEDNN_MAX_ROWS:
        return [(rows, max(rows, ONEDNN_MIN_ROWS))]
    padded = -(-rows // stride) * stride
    if padded <= rows * ONEDNN_PAD_AT_MOST:
        return [(rows, padded)]
    rest = rows % stride
    return [(rows - rest, rows - rest)] + ([(rest, max(rest, ONEDNN_MIN_ROWS))] if rest else [])


def onednn_row_counts(rows: int) -> list[int]:
    """The row counts `onednn_linear` hands oneDNN for a step of `rows` rows."""
    return [padded_to for _, padded_to in _onednn_pieces(rows)]


def _padded(x: torch.Tensor, onednn_weight: torch.Tensor, bias: torch.Tensor | None,
            rows: int) -> torch.Tensor:
    """2-D x zero-padded to `rows` rows through oneDNN, the padding's output dropped."""
    if x.shape[0] == rows:
        return _onednn_matmul(x, onednn_weight, bias)
    padded = x.new_zeros(rows, x.shape[-1])
    padded[:x.shape[0]] = x
    return _onednn_matmul(padded, onednn_weight, bias)[:x.shape[0]]


def _onednn_matmul(x: torch.Tensor, onednn_weight: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    """The one call into oneDNN: every row count it sees passes here."""
    return torch.ops.mkldnn._linear_pointwise(x, onednn_weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tp_size: int = 1, onednn_weight: torch.Tensor | None = None,
           panel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`; on the GPU for a single row the Triton GEMV (batch-1 decode: 5.79 vs
    6.13 ms a Llama-3.1-8B step on an H100, see docs/PERF.md); on the CPU, steps of up to 64
    rows on `panel_weight` (the weight packed for cpu_linear.c), larger ones through oneDNN on
    `onednn_weight`, the weight packed for it, where that is faster."""
    if gemv_applies(x, weight, tp_size):
        from pdserve.kernels.triton_gemv import gemv

        y = gemv(x, weight)
        return y if bias is None else y + bias
    if panel_weight is not None:
        y = cpu_native.linear_rows(x, panel_weight, bias)
        if y is not None:
            return y
    if onednn_applies(x, onednn_weight):
        return onednn_linear(x, onednn_weight, bias, panel_weight)
    return F.linear(x, weight, bias)


def _new_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _all_reduce(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    if tp_size > 1:
        dist.all_reduce(x)
    return x


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like Hugging Face Llama."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _new_param(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from pdserve.kernels.triton_rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)
        if native := cpu_native.elementwise_applies(x, self.weight):
            return cpu_native.add_rms_norm(native, x, None, self.weight, self.eps)[0]
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream of a pre-norm block."""
        if x.is_cuda:  # one fused kernel instead of ~6 launches
            from pdserve.kernels.triton_rmsnorm import fused_add_rmsnorm

            return fused_add_rmsnorm(x, residual, self.weight, self.eps)
        if native := cpu_native.elementwise_applies(x, residual, self.weight):
            return cpu_native.add_rms_norm(native, x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        return self(x), x

    def add_norm_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, proj: ColumnParallelLinear
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(proj(norm(x + residual)), x + residual); one fused GEMV for one row on the GPU."""
        if fused_gemv_applies(x, proj.weight, proj.bias, proj.tp_size):
            from pdserve.kernels.triton_fused_gemv import add_rmsnorm_gemv

            return add_rmsnorm_gemv(x, residual, self.weight, self.eps, proj.weight)
        normed, residual = self.add_norm(x, residual)
        return proj(normed), residual


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (float32), with Llama-3 or linear scaling as HF does it."""
    # on the CPU, so the frequencies do not depend on the device the model is built on
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Same arithmetic as transformers' _compute_llama3_parameters, so logits match bit for bit.
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE as HF Llama applies it; cos/sin computed from positions."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        # float32 whatever the model dtype: angles lose precision in bf16
        device = torch.empty(0).device  # the caller's torch.device context
        inv_freq = rope_inv_freq(head_dim, theta, scaling).to(device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cos_sin: torch.Tensor | None = None  # [max_positions, D] cos | sin table
        self.max_positions = 0

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] by their token positions [T]."""
        if q.is_cuda and self._cos_sin is not None:
            from pdserve.kernels.triton_rope import apply_rope_

            apply_rope_(q, k, positions, self._cos_sin)  # in place, one launch for q and k
            return q, k
        if self._cos_sin is not None and cpu_native.rope(q, k, positions, self._cos_sin):
            return q, k  # in place, one pass, PyTorch's rounding
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def build_rope_tables(model: nn.Module, max_positions: int, dtype: torch.dtype) -> None:
    """Precompute the RoPE table once, shared by every layer (on the GPU before graph
    capture; on the CPU the C kernel reads it, where PyTorch's path recomputes the angles in
    every layer)."""
    table = None
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            if table is None:
                table = rope_cos_sin_cache(module.inv_freq, max_positions, dtype=dtype)
            module._cos_sin, module.max_positions = table, max_positions


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W split by output rows; packs several sub-matrices (qkv, gate_up).

    `output_sizes` are the full sizes of the packed sub-matrices; each rank keeps
    `local_sizes[i]` rows of sub-matrix i starting at row `local_starts[i]` of the full one.
    """

    onednn_weight: torch.Tensor | None = None  # on CPU, set by cpu_layout.pack_linears_onednn
    panel_weight: torch.Tensor | None = None  # on CPU, set by cpu_layout.pack_linears_panels

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.local_sizes, self.local_starts = self._partition(output_sizes)
        self.output_size = sum(self.local_sizes)  # this rank's output features
        self.weight = _new_param(self.output_size, input_size)
        self.bias = _new_param(self.output_size) if bias else None

    def _partition(self, output_sizes: list[int]) -> tuple[list[int], list[int]]:
        for size in output_sizes:
            if size % self.tp_size:
                raise ValueError(f"output size {size} is not divisible by tp_size {self.tp_size}")
        sizes = [size // self.tp_size for size in output_sizes]
        return sizes, [size * self.tp_rank for size in sizes]

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard: int | None = None
    ) -> None:
        """Copy this rank's rows of packed sub-matrix `shard` (None = the only one)."""
        index = shard or 0
        size, start = self.local_sizes[index], self.local_starts[index]
        offset = sum(self.local_sizes[:index])
        param.data[offset : offset + size].copy_(loaded[start : start + size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.tp_size, self.onednn_weight,
                      self.panel_weight)


class QKVParallelLinear(ColumnParallelLinear):
    """Packed q, k, v projection; KV heads are replicated when there are fewer than ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        if num_heads % tp_size:
            raise ValueError(f"{num_heads} heads are not divisible by tp_size {tp_size}")
        if num_kv_heads % tp_size and tp_size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} KV heads do not split over tp_size {tp_size}")
        self.head_dim, self.num_kv_heads_total = head_dim, num_kv_heads
        self.num_heads = num_heads // tp_size  # per rank
        self.num_kv_heads = max(1, num_kv_heads // tp_size)  # per rank
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias, tp_rank, tp_size)

    def _partition(self, output_sizes: list[int]) -> tuple[list[int], list[int]]:
        d = self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        # with fewer KV heads than ranks, consecutive ranks share one KV head
        kv_index = self.tp_rank // max(1, self.tp_size // self.num_kv_heads_total)
        q_start, kv_start = self.tp_rank * q_size, kv_index * kv_size
        return [q_size, kv_size, kv_size], [q_start, kv_start, kv_start]

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard: int | None = None
    ) -> None:
        """`shard` is 0, 1 or 2 for q, k, v."""
        super().weight_loader(param, loaded, shard)


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b) with W split by input columns; partial sums are all-reduced."""

    onednn_weight: torch.Tensor | None = None  # on CPU, set by cpu_layout.pack_linears_onednn
    panel_weight: torch.Tensor | None = None  # on CPU, set by cpu_layout.pack_linears_panels

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        if input_size % tp_size:
            raise ValueError(f"input size {input_size} is not divisible by tp_size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.input_size = input_size // tp_size  # per rank
        self.weight = _new_param(output_size, self.input_size)
        self.bias = _new_param(output_size) if bias else None

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard: object = None
    ) -> None:
        if param.dim() == 1:  # the bias is not split
            param.data.copy_(loaded)
            return
        start = self.tp_rank * self.input_size
        param.data.copy_(loaded[:, start : start + self.input_size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _all_reduce(linear(x, self.weight, tp_size=self.tp_size,
                               onednn_weight=self.onednn_weight,
                               panel_weight=self.panel_weight), self.tp_size)
        # the bias is added once, after the reduction
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split in contiguous ranges across ranks."""

    def __init__(
        self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__()
        self.vocab_size, self.tp_rank, self.tp_size = vocab_size, tp_rank, tp_size
        self.shard_size = -(-vocab_size // tp_size)  # last shard is padded
        self.vocab_start = tp_rank * self.shard_size
        self.weight = _new_param(self.shard_size, hidden_size)

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard: object = None
    ) -> None:
        rows = loaded[self.vocab_start : self.vocab_start + self.shard_size]
        param.data[: rows.shape[0]].copy_(rows)
        param.data[rows.shape[0] :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return _all_reduce(out, self.tp_size)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary; each rank computes its vocab slice, then gathers."""

    onednn_weight: torch.Tensor | None = None  # on CPU, set by cpu_layout.pack_linears_onednn
    panel_weight: torch.Tensor | None = None  # on CPU, set by cpu_layout.pack_linears_panels

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = linear(hidden, self.weight, tp_size=self.tp_size,
                        onednn_weight=self.onednn_weight, panel_weight=self.panel_weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.vocab_size]


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up packed into one column-parallel matmul.

    The decoder layer runs `gate_up_proj` itself (fused with its norm at one row), then
    `activate_down`."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], False, tp_rank, tp_size
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, tp_rank, tp_size)

    def activate_down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """down(silu(gate) * up) of the packed projection; one fused GEMV for one row on the GPU."""
        down = self.down_proj
        if fused_gemv_applies(gate_up, down.weight, down.bias, down.tp_size):
            from pdserve.kernels.triton_fused_gemv import silu_mul_gemv

            return silu_mul_gemv(gate_up, down.weight)
        if gate_up.is_cuda:
            from pdserve.kernels.triton_activation import silu_and_mul

            return down(silu_and_mul(gate_up))
        if native := cpu_native.elementwise_applies(gate_up):
            return down(cpu_native.silu_and_mul(native, gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return down(F.silu(gate) * up)
