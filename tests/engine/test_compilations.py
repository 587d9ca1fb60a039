"""The compile/capture counter counts from the moment the engine says ready, by kind."""

from __future__ import annotations

import torch

from pdserve.engine.compilations import KINDS, CompileCounter


def test_nothing_counts_as_after_ready_before_ready():
    counter = CompileCounter()
    counter.count("triton", 5)
    counter.count("cuda_graph")
    assert counter.after_ready() == dict.fromkeys(KINDS, 0)


def test_only_what_comes_after_ready_counts():
    counter = CompileCounter()
    counter.count("triton", 3)  # warm-up
    counter.count("cuda_graph", 19)
    counter.mark_ready()
    counter.count("triton")
    counter.count("cuda_graph", 2)
    assert counter.after_ready() == {"triton": 1, "cuda_graph": 2, "torch_compile": 0,
                                     "native": 0}


def test_a_torch_compile_after_ready_counts():
    counter = CompileCounter()
    counter.mark_ready()

    def double_plus_one(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    compiled = torch.compile(double_plus_one, backend="eager")  # dynamo's capture, no codegen
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))
    assert counter.after_ready()["torch_compile"] == 1
    compiled(torch.ones(3))  # the same graph again: no new compile
    assert counter.after_ready()["torch_compile"] == 1
