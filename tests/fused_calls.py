"""Counting the model's calls of the fused one-row GEMV kernels (CPU and GPU tests share it)."""

from __future__ import annotations

from pdserve.kernels import triton_fused_gemv


def count_calls(monkeypatch, calls: dict[str, int]) -> None:
    """Count the model's calls of each named fused kernel (layers imports them per call)."""
    for name in calls:
        kernel = getattr(triton_fused_gemv, name)

        def counted(*args, _name: str = name, _kernel=kernel, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(triton_fused_gemv, name, counted)
