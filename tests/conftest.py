"""Shared fixtures: the embedded SmolLM2 as an engine and as transformers' reference."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PDSERVE_DEPLOYMENT_SECRET", "pdserve-test-deployment-secret-0123456789")

# One torch thread per engine process: tests run several processes on 2 cores, and
# oversubscribed OpenMP threads spin (measured 8x slower steps).
os.environ.setdefault("PDSERVE_CPU_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# MKL on the plain weights, no oneDNN copies: this one process holds many engines and the
# models' reference copies at once, and with the packed copies it reached 13.4-14 GB and was
# killed on a 24 GiB machine (2026-12-07). tests/models/test_cpu_layout.py turns them on.
os.environ.setdefault("PDSERVE_CPU_ONEDNN", "0")
# nor the copies packed in panels for the C linears (tests/kernels/test_cpu_linear.py, the
# transformers parity tests and tests/models/test_cpu_layout.py turn them on)
os.environ.setdefault("PDSERVE_CPU_PANELS", "0")
# Every process a test spawns (router, instances) belongs to one test deployment.
os.environ.setdefault("PDSERVE_DEPLOYMENT_SECRET", "pdserve-test-deployment-secret-0123456789")
# Without a GPU, Triton kernels run in its interpreter; this must be set before anything
# imports triton, which a test folder collected earlier may do.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """(folder, file name) of the embedded GGUF, for transformers' own loader."""
    from pdserve.models.gguf_file import embedded_gguf_path

    path = embedded_gguf_path()
    return str(path.parent), path.name


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' LlamaForCausalLM from the same GGUF: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = smollm2_gguf
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from pdserve.models.loader import load_tokenizer

    return load_tokenizer(None)


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation with EOS ignored: argmax at every step."""
    import torch

    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.inference_mode():
        result = model(ids, use_cache=True)
        for _ in range(num_tokens):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            result = model(torch.tensor([[token]]), past_key_values=result.past_key_values,
                           use_cache=True)
    return out


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory):
    """(transformers' tiny SmolVLM, the HF folder it saved): one reference for every test."""
    from tests.smolvlm_reference import build_reference

    folder = tmp_path_factory.mktemp("tiny-smolvlm")
    return build_reference(folder), str(folder)
