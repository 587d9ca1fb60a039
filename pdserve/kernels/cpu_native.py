"""The CPU's native kernels: attention over the paged cache, decode (cpu_paged_decode.c) and
prefill (cpu_paged_prefill.c), a layer's elementwise steps (cpu_elementwise.c) and the
linears of decode-sized steps (cpu_linear.c); one library built with the machine's C
compiler on first use, cached, and loaded with ctypes.

Why C and not a library: PyTorch has no paged attention on the CPU (its SDPA needs the keys
gathered into one padded tensor first), and the libraries that have one are tied to one torch
version (intel-extension-for-pytorch) or are another server's internals (vLLM's `_C`). Why
ctypes and not torch.utils.cpp_extension: the kernel needs no torch headers, so it builds in
about a second instead of a minute. Without a compiler, or with `PDSERVE_CPU_NATIVE=0`, the
engine keeps PyTorch's path; `native_kernels()` is then None.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from pdserve import switches
from pdserve.engine.compilations import COMPILATIONS
from pdserve.models.cache import cache_root, replace_atomically

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_paged_decode.c",
                                                       "cpu_paged_prefill.c",
                                                       "cpu_elementwise.c",
                                                       "cpu_linear.c")]
HEADERS = [Path(__file__).with_name("cpu_vec.h")]
# -march=native: the library is built on, and cached for, the machine that runs it.
# -ffast-math only to compile (vector expf); linking with it would add crtfastmath.o, which
# sets flush-to-zero for the whole process at load.
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c"]
LINK_FLAGS = ["-shared", "-fopenmp"]
LIBS = ["-lmvec", "-lm"]  # glibc's vector math (expf over 16 lanes), and its scalar one
BUILD_TIMEOUT_S = 120


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _library_path(compiler: str) -> Path:
    """Where the build for these sources, compiler, flags and machine is cached."""
    identity = "\n".join([*(path.read_text() for path in SOURCES + HEADERS), compiler,
                          *COMPILE_FLAGS, *LINK_FLAGS, *LIBS, platform.machine(), _cpu_flags()])
    key = hashlib.sha1(identity.encode()).hexdigest()[:16]
    return cache_root() / "native" / f"cpu_native-{key}.so"


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), '' where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str, target: Path) -> None:
    def compile_to(path: Path) -> None:
        objects = [path.with_suffix(f".{source.stem}.o") for source in SOURCES]
        commands = [[compiler, *COMPILE_FLAGS, str(source), "-o", str(obj)]
                    for source, obj in zip(SOURCES, objects)]
        commands.append([compiler, *LINK_FLAGS, *map(str, objects), "-o", str(path), *LIBS])
        try:
            for command in commands:
                subprocess.run(command, check=True, capture_output=True,
                               timeout=BUILD_TIMEOUT_S)
        finally:
            for obj in objects:
                obj.unlink(missing_ok=True)

    replace_atomically(target, compile_to)  # concurrent engines never load half a file


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler: CPU attention stays on PyTorch's (gather +) SDPA")
        return None
    path = _library_path(compiler)
    try:
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
        COMPILATIONS.count("native")
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("could not build the CPU attention kernels (%s%s); PyTorch's path "
                    "serves instead", exc, ": " + detail.decode(errors="replace")[:500]
                    if detail else "")
        return None
    decode, prefill = lib.paged_decode_f32, lib.paged_prefill_f32
    decode.restype = prefill.restype = ctypes.c_int
    decode.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64, ctypes.c_void_p] + \
        [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
    prefill.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + \
        [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
    norm, swiglu = lib.add_rms_norm_f32, lib.silu_and_mul_f32
    norm.restype = swiglu.restype = None
    norm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    swiglu.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    rope, store = lib.rope_f32, lib.store_kv_f32
    rope.restype = store.restype = ctypes.c_int
    rope.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p] + \
        [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                ctypes.c_int64, ctypes.c_int]
    store.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + \
        [ctypes.c_int64]
    lib.linear_rows_f32.restype = ctypes.c_int
    lib.linear_rows_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + \
        [ctypes.c_int64] * 4 + [ctypes.c_int]
    return lib


def native_kernels() -> ctypes.CDLL | None:
    """The built library, or None where the switch is off or it cannot be built."""
    if not switches.SWITCHES.cpu_native:
        return None
    return _library()


def _require_contiguous_cpu(**tensors: torch.Tensor) -> None:
    """The kernels read raw pointers: every tensor must be contiguous and in host memory."""
    for name, t in tensors.items():
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU tensor")


def paged_decode(lib: ctypes.CDLL, q: torch.Tensor, out: torch.Tensor, q_rows: torch.Tensor,
                 kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float) -> None:
    """out[q_rows[b]] = attention of q[q_rows[b]] over sequence b's first seq_lens[b] cached
    keys and values. q, out: float32 [T, Hq, D]; kv_cache: float32 [2, blocks, block_size,
    Hkv, D]; q_rows int64 [B]; block_tables, seq_lens int32 [B, W] and [B]; all contiguous."""
    _, _, block_size, kv_heads, dim = kv_cache.shape
    _require_contiguous_cpu(q=q, out=out, kv_cache=kv_cache, q_rows=q_rows,
                            block_tables=block_tables, seq_lens=seq_lens)
    status = lib.paged_decode_f32(
        q.data_ptr(), out.data_ptr(), q_rows.data_ptr(), kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        seq_lens.data_ptr(), len(q_rows), block_size, kv_heads, q.shape[1] // kv_heads, dim,
        scale, torch.get_num_threads())
    if status != 0:
        raise MemoryError("the CPU decode attention kernel could not allocate its scores")


def paged_prefill(lib: ctypes.CDLL, q: torch.Tensor, out: torch.Tensor, context: int,
                  kv_cache: torch.Tensor, block_table: torch.Tensor, scale: float) -> bool:
    """out = causal attention of one sequence's new tokens q (at positions context ..
    context + len(q) - 1) over its cached keys and values, this step's already written.
    q, out: float32 [q_len, Hq, D]; kv_cache: float32 [2, blocks, block_size, Hkv, D];
    block_table: int32 [W]; all contiguous. False where the kernel does not take this head
    size (out is then untouched)."""
    _, _, block_size, kv_heads, dim = kv_cache.shape
    _require_contiguous_cpu(q=q, out=out, kv_cache=kv_cache, block_table=block_table)
    status = lib.paged_prefill_f32(
        q.data_ptr(), out.data_ptr(), q.shape[0], context, kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(), block_table.data_ptr(), block_size, kv_heads,
        q.shape[1] // kv_heads, dim, scale, torch.get_num_threads())
    if status == -1:
        raise MemoryError("the CPU prefill attention kernel could not allocate its scratch")
    return status == 0


def _in_host_memory(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Contiguous, of `dtype`, on the CPU: what a kernel can read through a raw pointer."""
    return t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()


def elementwise_applies(*tensors: torch.Tensor | None) -> ctypes.CDLL | None:
    """The library, where the elementwise kernels take these tensors: contiguous float32 on
    the CPU (None entries are absent optional inputs)."""
    if not all(t is None or _in_host_memory(t, torch.float32) for t in tensors):
        return None
    return native_kernels()


def add_rms_norm(lib: ctypes.CDLL, x: torch.Tensor, residual: torch.Tensor | None,
                 weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual) in one pass; x, residual: [..., width],
    weight: [width], as `elementwise_applies` took them."""
    width = x.shape[-1]
    summed = x if residual is None else torch.empty_like(x)
    out = torch.empty_like(x)
    lib.add_rms_norm_f32(x.data_ptr(), None if residual is None else residual.data_ptr(),
                         summed.data_ptr(), out.data_ptr(), weight.data_ptr(),
                         x.numel() // width, width, eps, torch.get_num_threads())
    return out, summed


def silu_and_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of [..., 2 * width] rows packed as gate | up, in one pass; gate_up as
    `elementwise_applies` took it."""
    width = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], width)
    lib.silu_and_mul_f32(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * width),
                         width, torch.get_num_threads())
    return out


def _rows_of_heads(*tensors: torch.Tensor) -> bool:
    """float32 [T, heads, D] on the CPU whose token rows may lie apart (views of one qkv
    projection) but whose heads are packed: what the row kernels below read."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 3
               and t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in tensors)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
         table: torch.Tensor) -> bool:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by their positions' rows of `table`
    ([P, D]: cos | sin), with PyTorch's rounding. False where the kernel does not take these
    tensors (they are then untouched)."""
    if not (_rows_of_heads(q, k) and _in_host_memory(table, torch.float32)
            and _in_host_memory(positions, torch.int64)
            and len(q) == len(k) == len(positions) and q.shape[2] == k.shape[2]
            and table.dim() == 2 and table.shape[1] == q.shape[2]):
        return False
    lib = native_kernels()  # after the checks: never built for another device's tensors
    if lib is None:
        return False
    status = lib.rope_f32(q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0),
                          k.shape[1], q.shape[2], positions.data_ptr(), len(positions),
                          table.data_ptr(), table.shape[0], torch.get_num_threads())
    if status != 0:
        raise ValueError(f"a position is outside the RoPE table's {table.shape[0]} rows")
    return True


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
             slots: torch.Tensor) -> bool:
    """Copy this step's k and v ([T, Hkv, D]) to their cache slots (int64 [T], -1: padding)
    in kv_cache [2, blocks, block_size, Hkv, D]. False where the kernel does not take these
    tensors (nothing is then stored)."""
    if not (_rows_of_heads(k, v) and _in_host_memory(kv_cache, torch.float32)
            and _in_host_memory(slots, torch.int64) and kv_cache.dim() == 5
            and len(k) == len(v) == len(slots) and k.shape[1:] == v.shape[1:]
            and kv_cache.shape[3:] == k.shape[1:]):
        return False
    lib = native_kernels()
    if lib is None:
        return False
    _, blocks, block_size, heads, dim = kv_cache.shape
    status = lib.store_kv_f32(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                              slots.data_ptr(), len(slots), heads * dim, kv_cache[0].data_ptr(),
                              kv_cache[1].data_ptr(), blocks * block_size)
    if status != 0:
        raise IndexError(f"a KV slot is outside the cache's {blocks * block_size} slots")
    return True


PANEL_COLUMNS = 32  # cpu_linear.c's PANEL
PANEL_MAX_ROWS = 64  # cpu_linear.c's MAX_ROWS


def pack_panels(weight: torch.Tensor) -> torch.Tensor | None:
    """W [N, K] packed for `linear_rows`: [N / 32, K, 32], panel p holding W^T's columns
    32p .. 32p + 31 row after row. None where N is not a whole number of panels."""
    n, k = weight.shape
    if n % PANEL_COLUMNS:
        return None
    return weight.detach().t().reshape(k, n // PANEL_COLUMNS, PANEL_COLUMNS) \
        .permute(1, 0, 2).contiguous()


def linear_rows(x: torch.Tensor, panels: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor | None:
    """x W^T (+ bias) for x [..., K] of 1-64 rows, on W packed by `pack_panels`; None where
    the kernel does not take these tensors (another dtype or device, more rows)."""
    count, k, width = panels.shape
    rows = x.numel() // k if x.shape[-1] == k else 0
    if not (1 <= rows <= PANEL_MAX_ROWS and width == PANEL_COLUMNS
            and _in_host_memory(x, torch.float32) and _in_host_memory(panels, torch.float32)
            and (bias is None or (_in_host_memory(bias, torch.float32)
                                  and bias.shape == (count * width,)))):
        return None
    lib = native_kernels()
    if lib is None:
        return None
    n = count * width
    out = x.new_empty(*x.shape[:-1], n)
    status = lib.linear_rows_f32(x.data_ptr(), k, panels.data_ptr(),
                                 None if bias is None else bias.data_ptr(), out.data_ptr(), n,
                                 rows, k, n, torch.get_num_threads())
    return out if status == 0 else None
