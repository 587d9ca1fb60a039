"""CPU linears stored K-major: every linear of a loaded model, the same values, ties kept."""

from __future__ import annotations

import torch

from pdserve.models.cpu_layout import store_linears_k_major
from pdserve.models.layers import ColumnParallelLinear, RowParallelLinear
from pdserve.models.loader import load_model


def test_a_model_loaded_on_cpu_has_k_major_linears_and_its_tied_head_is_the_embedding():
    model = load_model(None, torch.float32, torch.device("cpu")).model
    kinds = (ColumnParallelLinear, RowParallelLinear)
    linears = [m for m in model.modules() if isinstance(m, kinds)]
    assert len(linears) == 4 * model.config.num_layers  # qkv, o, gate_up, down
    for m in [*linears, model.lm_head]:
        assert not m.weight.is_contiguous() and m.weight.t().is_contiguous()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor
    # a second call finds nothing left to re-store and changes no value
    before = {n: p.clone() for n, p in model.named_parameters()}
    store_linears_k_major(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_k_major_linears_compute_what_the_usual_layout_does():
    model = load_model(None, torch.float32, torch.device("cpu")).model
    x = torch.randn(8, model.config.hidden_size)
    proj = model.model.layers[0].mlp.gate_up_proj
    k_major = proj(x)
    proj.weight.data = proj.weight.data.contiguous()  # the usual [N, K] row-major layout
    torch.testing.assert_close(k_major, proj(x), rtol=1e-5, atol=1e-5)
