"""CPU linears: K-major for MKL, with copies packed for oneDNN and for the C kernel's panels;
the same values every way."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pdserve import switches
from pdserve.kernels import cpu_native
from pdserve.models import layers
from pdserve.models.cpu_layout import (
    onednn_available,
    pack_linears_onednn,
    pack_linears_panels,
    store_linears_k_major,
)
from pdserve.models.layers import (
    ONEDNN_MAX_ROWS,
    ONEDNN_MIN_ROWS,
    ONEDNN_STRIDE_ROWS,
    ColumnParallelLinear,
    RowParallelLinear,
    onednn_applies,
    onednn_linear,
    onednn_row_counts,
)
from pdserve.models.loader import load_model

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN linear")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    """tests/conftest.py turns the packed copies off for the suite; these tests are theirs."""
    on = dataclasses.replace(switches.SWITCHES, cpu_onednn=True, cpu_panels=True)
    monkeypatch.setattr(switches, "SWITCHES", on)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_model_loaded_on_cpu_has_k_major_linears_and_its_tied_head_is_the_embedding():
    model = load_model(None, torch.float32, torch.device("cpu")).model
    kinds = (ColumnParallelLinear, RowParallelLinear)
    linears = [m for m in model.modules() if isinstance(m, kinds)]
    assert len(linears) == 4 * model.config.num_layers  # qkv, o, gate_up, down
    for m in [*linears, model.lm_head]:
        assert not m.weight.is_contiguous() and m.weight.t().is_contiguous()
        assert (m.onednn_weight is not None) == onednn_available()
        assert (m.panel_weight is not None) == (cpu_native.native_kernels() is not None)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor
    # a second call finds nothing left to re-store and changes no value
    before = {n: p.clone() for n, p in model.named_parameters()}
    store_linears_k_major(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_k_major_weights_compute_what_the_usual_layout_does():
    weight = torch.randn(1536, 576)
    k_major = weight.t().contiguous().t()
    for rows in (1, 8):
        x = torch.randn(rows, 576)
        torch.testing.assert_close(F.linear(x, k_major), F.linear(x, weight), rtol=1e-5, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (1, 2, 64), (8, 64), (2, 3, 64)])
def test_onednn_linears_compute_what_f_linear_does_with_and_without_bias(shape, one_thread):
    proj = ColumnParallelLinear(64, [48, 48], bias=True)
    down = RowParallelLinear(96, 64)
    for p in [*proj.parameters(), *down.parameters()]:
        torch.nn.init.normal_(p)
    assert pack_linears_onednn(torch.nn.Sequential(proj, down)) == 2
    x = torch.randn(*shape)
    assert onednn_applies(x, proj.onednn_weight) == (x.numel() > 64)
    hidden = proj(x)
    torch.testing.assert_close(hidden, F.linear(x, proj.weight, proj.bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(down(hidden), F.linear(hidden, down.weight), rtol=1e-5, atol=1e-3)


@needs_onednn
def test_one_row_takes_mkl_on_one_thread_and_onednn_on_two(one_thread):
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(32, 16))
    row, rows = torch.randn(1, 16), torch.randn(2, 16)
    assert not onednn_applies(row, packed) and onednn_applies(rows, packed)
    assert not onednn_applies(rows, None)  # nothing packed: MKL
    assert not onednn_applies(rows.double(), packed)  # another dtype than the packed copy's
    prefill = torch.randn(ONEDNN_MAX_ROWS + 1, 16)  # prompt-sized: oneDNN too, in tiles
    assert onednn_applies(torch.randn(ONEDNN_MAX_ROWS, 16), packed)
    assert onednn_applies(prefill, packed)
    torch.set_num_threads(2)
    assert onednn_applies(row, packed)


@needs_onednn
def test_fewer_rows_than_onednn_min_rows_are_padded_and_give_what_f_linear_does():
    weight, bias = torch.randn(32, 16), torch.randn(32)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    for rows in range(1, ONEDNN_MIN_ROWS + 2):
        x = torch.randn(1, rows, 16)
        y = onednn_linear(x, packed, bias)
        assert y.shape == (1, rows, 32) and y.is_contiguous()
        torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


needs_native = pytest.mark.skipif(cpu_native.native_kernels() is None,
                                  reason="no C compiler: the kernels cannot be built")


@needs_native
@pytest.mark.parametrize("rows,in_c", [(1, 1), (2, 2), (8, 8), (64, 64), (65, 65), (300, 44)])
def test_steps_of_up_to_64_rows_take_the_c_kernel_and_the_rest_beside_a_prompt_too(
        rows, in_c, monkeypatch):
    """Up to 64 rows in C; past 64, oneDNN takes a multiple of 64 and the C kernel the rest
    (300 = 256 + 44; 65 = 64 + 1, both pieces small enough for C)."""
    proj = ColumnParallelLinear(64, [64, 32], bias=True)
    down = RowParallelLinear(96, 64)
    for p in [*proj.parameters(), *down.parameters()]:
        torch.nn.init.normal_(p)
    model = torch.nn.Sequential(proj, down)
    assert pack_linears_panels(model) == 2 and pack_linears_onednn(model) == 2
    store_linears_k_major(model)
    computed = []
    real = cpu_native.linear_rows

    def recording(x, panels, bias):
        y = real(x, panels, bias)
        computed.append(0 if y is None else x.numel() // x.shape[-1])
        return y

    monkeypatch.setattr(cpu_native, "linear_rows", recording)
    x = torch.randn(rows, 64)
    hidden = proj(x)
    torch.testing.assert_close(hidden, F.linear(x, proj.weight, proj.bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(down(hidden), F.linear(hidden, down.weight), rtol=1e-5, atol=1e-3)
    assert sum(computed) == 2 * in_c


@pytest.mark.parametrize("variable,switch,pack,copy", [
    ("PDSERVE_CPU_ONEDNN", "cpu_onednn", pack_linears_onednn, "onednn_weight"),
    ("PDSERVE_CPU_PANELS", "cpu_panels", pack_linears_panels, "panel_weight"),
])
def test_a_switch_at_0_packs_nothing(variable, switch, pack, copy, monkeypatch):
    off = dataclasses.replace(switches.SWITCHES, **{switch: False})
    monkeypatch.setattr(switches, "SWITCHES", off)
    proj = ColumnParallelLinear(16, [32])
    assert pack(proj) == 0 and getattr(proj, copy) is None
    assert getattr(switches.read_switches({variable: "0"}), switch) is False


@needs_onednn
def test_prompt_sized_steps_reach_onednn_in_a_few_row_counts_and_give_what_f_linear_does(
        monkeypatch):
    # every row count oneDNN sees stays in its primitive cache: a server sees every prompt
    # length, so those past ONEDNN_MAX_ROWS must come to it as a bounded set of tiles
    weight, bias = torch.randn(48, 16), torch.randn(48)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    seen: set[int] = set()
    real = layers._onednn_matmul

    def recording(x, w, b):
        seen.add(x.shape[0])
        return real(x, w, b)

    monkeypatch.setattr(layers, "_onednn_matmul", recording)
    for rows in [*range(ONEDNN_MAX_ROWS + 1, 700, 23), 130, 256, 513, 514, 1024, 1100]:
        x = torch.randn(rows, 16)
        y = onednn_linear(x, packed, bias)
        assert y.shape == (rows, 48)
        torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    stride = ONEDNN_STRIDE_ROWS
    allowed = {*range(ONEDNN_MIN_ROWS, ONEDNN_MAX_ROWS + 1), *range(stride, 2049, stride)}
    assert seen <= allowed and {128, 448, 576, 1024, 1088} <= seen  # 32 counts past 64 rows
    assert onednn_row_counts(1100) == [1088, 12] and onednn_row_counts(333) == [320, 13]
    assert onednn_row_counts(1027) == [1024, 3] and onednn_row_counts(1090) == [1088, 3]
    assert onednn_row_counts(2047) == [2048] and onednn_row_counts(1530) == [1536]  # <= 2%
    assert onednn_row_counts(130) == [128, 3] and onednn_row_counts(2) == [3]
    x = torch.randn(2, 300, 16)  # a 3-D input keeps its leading dimensions
    torch.testing.assert_close(onednn_linear(x, packed, None), F.linear(x, weight),
                               rtol=1e-5, atol=1e-4)
