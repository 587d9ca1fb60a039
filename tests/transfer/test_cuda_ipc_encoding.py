"""cuda_ipc's JSON encoding of torch's IPC arguments (runs on CPU: torch's side is faked)."""

from __future__ import annotations

import json

import torch
import torch.multiprocessing.reductions as reductions

from pdserve.transfer import cuda_ipc


def fake_args(t: torch.Tensor) -> tuple:
    """What reduce_tensor returns for a CUDA tensor, in rebuild_cuda_tensor's order."""
    return (
        type(t),
        t.size(),
        t.stride(),
        0,
        torch.storage.TypedStorage,
        t.dtype,
        3,
        b"\x01handle\xff",
        4096,
        512,
        False,
        b"/torch_ref_counter",
        7,
        b"\x02event",
        True,
    )


def test_export_then_import_hands_torch_back_its_own_arguments(monkeypatch):
    layer = torch.zeros(2, 4, 16, 8, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(reductions, "reduce_tensor", lambda t: (None, fake_args(t)))
    exported = json.loads(json.dumps(cuda_ipc.export_kv_caches([layer])))

    rebuilt: list[tuple] = []
    monkeypatch.setattr(reductions, "rebuild_cuda_tensor", lambda *a: rebuilt.append(a) or a)
    cuda_ipc.import_kv_caches(exported, torch.device("cuda", 1))

    want = list(fake_args(layer))
    want[0] = torch.Tensor
    want[6] = 1  # opened on the decode engine's own device, not P's index
    assert list(rebuilt[0]) == want


def test_importing_the_module_needs_no_gpu():
    assert cuda_ipc.CudaIpcPuller().name == "cuda_ipc"
