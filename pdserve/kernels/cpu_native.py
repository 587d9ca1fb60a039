"""The CPU's one native kernel, decode attention over the paged cache (cpu_paged_decode.c):
built with the machine's C compiler on first use, cached, and loaded with ctypes.

Why C and not a library: PyTorch has no paged attention on the CPU (its SDPA needs the keys
gathered into one padded tensor first), and the libraries that have one are tied to one torch
version (intel-extension-for-pytorch) or are another server's internals (vLLM's `_C`). Why
ctypes and not torch.utils.cpp_extension: the kernel needs no torch headers, so it builds in
about a second instead of a minute. Without a compiler, or with `PDSERVE_CPU_NATIVE=0`, the
engine keeps PyTorch's path; `decode_kernel()` is then None.
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

SOURCE = Path(__file__).with_name("cpu_paged_decode.c")
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
    """Where the build for this source, compiler, flags and machine is cached."""
    identity = "\n".join([SOURCE.read_text(), compiler, *COMPILE_FLAGS, *LINK_FLAGS, *LIBS,
                          platform.machine(), _cpu_flags()])
    key = hashlib.sha1(identity.encode()).hexdigest()[:16]
    return cache_root() / "native" / f"cpu_paged_decode-{key}.so"


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
        obj = path.with_suffix(".o")
        try:
            for command in ([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(obj)],
                            [compiler, *LINK_FLAGS, str(obj), "-o", str(path), *LIBS]):
                subprocess.run(command, check=True, capture_output=True,
                               timeout=BUILD_TIMEOUT_S)
        finally:
            obj.unlink(missing_ok=True)

    replace_atomically(target, compile_to)  # concurrent engines never load half a file


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler: CPU decode attention stays on PyTorch's gather + SDPA")
        return None
    path = _library_path(compiler)
    try:
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
        COMPILATIONS.count("native")
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("could not build the CPU decode attention kernel (%s%s); PyTorch's path "
                    "serves instead", exc, ": " + detail.decode(errors="replace")[:500]
                    if detail else "")
        return None
    fn = lib.paged_decode_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64, ctypes.c_void_p] + \
        [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
    return lib


def decode_kernel() -> ctypes.CDLL | None:
    """The built library, or None where the switch is off or it cannot be built."""
    if not switches.SWITCHES.cpu_native:
        return None
    return _library()


def paged_decode(lib: ctypes.CDLL, q: torch.Tensor, out: torch.Tensor, q_rows: torch.Tensor,
                 kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float) -> None:
    """out[q_rows[b]] = attention of q[q_rows[b]] over sequence b's first seq_lens[b] cached
    keys and values. q, out: float32 [T, Hq, D]; kv_cache: float32 [2, blocks, block_size,
    Hkv, D]; q_rows int64 [B]; block_tables, seq_lens int32 [B, W] and [B]; all contiguous."""
    _, _, block_size, kv_heads, dim = kv_cache.shape
    for name, t in (("q", q), ("out", out), ("kv_cache", kv_cache), ("q_rows", q_rows),
                    ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU tensor")
    status = lib.paged_decode_f32(
        q.data_ptr(), out.data_ptr(), q_rows.data_ptr(), kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        seq_lens.data_ptr(), len(q_rows), block_size, kv_heads, q.shape[1] // kv_heads, dim,
        scale, torch.get_num_threads())
    if status != 0:
        raise MemoryError("the CPU decode attention kernel could not allocate its scores")
