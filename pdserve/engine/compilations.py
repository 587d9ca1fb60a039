"""What the engine process compiles or captures, and how much of it came after it was ready.

A Triton JIT compile (one per kernel specialization: ~1 s), a CUDA-graph capture or a
torch.compile run while serving stalls every request of that step; warm-up exists to do them
all before the instance says ready. This counter makes that checkable: the engine process
marks the moment it is ready, and /metrics serves what was compiled or captured since
(`pdserve:compilations_after_ready_total{kind=...}`), which should stay 0.

Counted here: Triton through its post-compile hook (`triton.knobs.runtime.
jit_post_compile_hook`: each new specialization of a JIT function, compiled or loaded from
Triton's disk cache, autotuning's trials included; the interpreter compiles nothing, so it
counts nothing); CUDA graphs by `DecodeGraphs.capture`;
torch.compile by TorchDynamo's own count of graphs it compiled (pdserve does not use it, so
0 unless something does); the CPU's C decode kernel by `kernels/cpu_native.py` when it builds
or loads it (a CPU engine does so at start). One counter per process: tensor-parallel
workers' are not counted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

KINDS = ("triton", "cuda_graph", "torch_compile", "native")


def _torch_compiled_graphs() -> int:
    """Graphs TorchDynamo compiled in this process; 0 where it was never imported."""
    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    if dynamo_utils is None:
        return 0
    return int(dynamo_utils.counters["stats"]["unique_graphs"])


@dataclass
class CompileCounter:
    """Compilations and captures of this process, by kind, and the totals when it was ready."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    at_ready: dict[str, int] | None = None  # None: not ready yet
    watching_triton: bool = False

    def count(self, kind: str, n: int = 1) -> None:
        """Record `n` compilations or captures of `kind` (one of KINDS)."""
        self.counts[kind] += n

    def totals(self) -> dict[str, int]:
        return {**self.counts, "torch_compile": _torch_compiled_graphs()}

    def mark_ready(self) -> None:
        """The engine has warmed up and says ready: from now on every compile is counted."""
        self.at_ready = self.totals()

    def after_ready(self) -> dict[str, int]:
        """Compilations and captures since `mark_ready`, by kind (all 0 before it)."""
        if self.at_ready is None:
            return dict.fromkeys(KINDS, 0)
        now = self.totals()
        return {kind: now[kind] - self.at_ready[kind] for kind in KINDS}

    def watch_triton(self) -> None:
        """Count every Triton JIT compile of this process from now on (idempotent).

        Chains to a post-compile hook someone else set. Imports triton: call it only where
        Triton kernels run (a CUDA engine), so CPU-only installs need no triton."""
        if self.watching_triton:
            return
        from triton import knobs

        previous = knobs.runtime.jit_post_compile_hook

        def counted(*args, **kwargs):
            self.count("triton")
            return previous(*args, **kwargs) if previous else None

        knobs.runtime.jit_post_compile_hook = counted
        self.watching_triton = True


COMPILATIONS = CompileCounter()  # the engine process's one counter (Triton's hook is global)
