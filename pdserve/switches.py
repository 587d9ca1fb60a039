"""pdserve's run-time switches: every `PDSERVE_*` environment variable that changes what it
does, in one typed, validated place, read once per process.

Read once because several are baked into what a process builds (a captured CUDA graph keeps
the kernels and launch flags it was captured with), so a switch that changed mid-run would
split a process into two behaviours. Spawned children (the engine process, tensor-parallel
workers, instances started by `pdserve up`) inherit the environment and read the same values.
Credentials (`PDSERVE_DEPLOYMENT_SECRET`, `PDSERVE_API_KEY`) are not switches: see
pdserve/security.py. Tests change a switch with
`monkeypatch.setattr(switches, "SWITCHES", dataclasses.replace(switches.SWITCHES, ...))`,
so users read `switches.SWITCHES.<name>` at call time, never a copy taken at import.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


class SwitchError(ValueError):
    """An environment variable holds a value its switch does not accept."""


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError("0 or 1")
    return text == "1"


def _backend(text: str) -> str:
    if text not in ("torch", "triton"):
        raise ValueError("torch or triton")
    return text


def _count(text: str) -> int | None:
    if not text.isdigit():
        raise ValueError("a whole number >= 0 (0 = the default)")
    return int(text) or None


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _host_id(text: str) -> str:
    if len(text) > 128 or not text.isprintable():
        raise ValueError("1 to 128 printable characters")
    return text


def _switch(env: str, default: object, parse: Callable[[str], object], doc: str):
    """A field of `Switches`: its variable, how its text is read, and why it exists."""
    return field(default=default, metadata={"env": env, "parse": parse, "doc": doc})


@dataclass(frozen=True)
class Switches:
    """Every run-time switch; unset or empty variables keep the defaults."""

    pdl: bool = _switch(
        "PDSERVE_PDL", True, _flag,
        "Programmatic dependent launch of decode-step kernels on Hopper+ (2% faster batch-1 "
        "decode); 0 turns it off to measure or rule it out.")
    gemv: bool = _switch(
        "PDSERVE_GEMV", True, _flag,
        "Triton GEMV for 1-row linears on a GPU (6% faster batch-1 decode); 0 keeps cuBLAS.")
    fused_gemv: bool = _switch(
        "PDSERVE_FUSED_GEMV", True, _flag,
        "RMSNorm and SwiGLU inside the batch-1 GEMVs (1.5% more); 0 runs them as kernels of "
        "their own.")
    prefill_sdpa: bool = _switch(
        "PDSERVE_PREFILL_SDPA", False, _flag,
        "Fresh long prompts through torch SDPA (cuDNN, 3% faster at 8k) instead of Triton; "
        "off by default since cuDNN plans cost 60-100 ms per new length.")
    attention_backend: str | None = _switch(
        "PDSERVE_ATTENTION_BACKEND", None, _backend,
        "Force the paged-attention backend (torch or triton); unset = Triton on CUDA, torch "
        "elsewhere. Tests force Triton's interpreter on CPU.")
    cpu_threads: int | None = _switch(
        "PDSERVE_CPU_THREADS", None, _count,
        "CPU engines' torch threads where --cpu-threads is not given; unset = half the "
        "cores, since instances share machines and oversubscribed OpenMP threads spin.")
    cpu_onednn: bool = _switch(
        "PDSERVE_CPU_ONEDNN", True, _flag,
        "CPU float32 linears through oneDNN on a packed copy of each weight (1.3-4x faster "
        "GEMMs than MKL), for steps of more than 64 rows (of every size with "
        "PDSERVE_CPU_PANELS=0); 0 keeps MKL on the plain weights, and one copy less.")
    cpu_panels: bool = _switch(
        "PDSERVE_CPU_PANELS", True, _flag,
        "CPU float32 linears of steps of up to 64 rows in a C kernel (kernels/cpu_linear.c) "
        "on a copy of each weight packed in 32-column panels (an 8-row decode step's linears "
        "1.7x faster than on oneDNN); 0 leaves them to oneDNN, and one copy less.")
    cpu_keep_heap: bool = _switch(
        "PDSERVE_CPU_KEEP_HEAP", True, _flag,
        "CPU engines keep freed memory for the next step's tensors instead of returning it "
        "to the kernel (glibc mallopt; 6% faster 1k-token prefill); 0 keeps glibc's "
        "defaults, and a smaller resident size between bursts.")
    cpu_native: bool = _switch(
        "PDSERVE_CPU_NATIVE", True, _flag,
        "CPU float32 decode attention in a C kernel that reads the paged cache in place "
        "(pdserve/kernels/cpu_native.py, built with the machine's compiler on first use); 0 "
        "keeps PyTorch's gather + SDPA.")
    tp_share_gpus: bool = _switch(
        "PDSERVE_TP_SHARE_GPUS", False, _flag,
        "Test mode: more tensor-parallel ranks than visible GPUs, sharing them over gloo "
        "(no CUDA graphs); otherwise too few GPUs is an error.")
    host_id: str | None = _switch(
        "PDSERVE_HOST_ID", None, _host_id,
        "This instance's host identity for KV transport choice: peers with the same id pull "
        "over shared memory or CUDA IPC, others over TCP. Unset = this machine's name and "
        "boot; the Ray launcher sets its node's id (two nodes on one machine still use TCP).")
    cache_dir: Path | None = _switch(
        "PDSERVE_CACHE_DIR", None, _path,
        "Where converted tokenizers, parsed GGUF configs, a GGUF's dequantized weights and "
        "the built CPU decode kernel are cached; unset = ~/.cache/pdserve.")


def env_name(name: str) -> str:
    """The environment variable of the switch called `name` (a field of `Switches`)."""
    return next(f.metadata["env"] for f in fields(Switches) if f.name == name)


def read_switches(env: Mapping[str, str] = os.environ) -> Switches:
    """The switches `env` sets; raises SwitchError naming the variable and what it accepts."""
    values = {}
    for f in fields(Switches):
        text = env.get(f.metadata["env"], "").strip()
        if not text:
            continue
        try:
            values[f.name] = f.metadata["parse"](text)
        except ValueError as accepted:
            raise SwitchError(
                f"{f.metadata['env']}={text!r} is not valid: it accepts {accepted}") from None
    return Switches(**values)


SWITCHES: Switches = read_switches()
