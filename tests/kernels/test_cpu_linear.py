"""The C kernel for the linears of decode-sized steps (pdserve/kernels/cpu_linear.c), against
x W^T written out in float64: row counts on and off its row groups, output widths of one panel
and many, odd input widths, bias, threads; the AVX2 build of the same source where this
machine has AVX-512; and what it declines."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from pdserve.kernels import cpu_native

COMPILER = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C compiler: nothing to build")


def expected(x, weight, bias):
    y = x.double() @ weight.double().t()
    return y if bias is None else y + bias.double()


def operands(rows, n, k, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g) if with_bias else None
    return torch.randn(rows, k, generator=g), weight, bias


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 12, 13, 24, 25, 37, 64])
@pytest.mark.parametrize("n,k", [(32, 1), (96, 7), (960, 576)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_rows_equals_x_w_transposed(rows, n, k, threads):
    """Every row count up to 64 (12 rows a group with AVX-512, 5 with AVX2: 13, 25 and 37 leave
    groups unequal), one panel and many, K of 1 and 7 (no vector's multiple)."""
    x, weight, bias = operands(rows, n, k, with_bias=rows % 2 == 1, seed=rows * n + k)
    panels = cpu_native.pack_panels(weight)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = cpu_native.linear_rows(x, panels, bias)
    finally:
        torch.set_num_threads(before)
    assert y is not None and y.shape == (rows, n)
    torch.testing.assert_close(y.double(), expected(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_leading_dimensions_are_kept_and_a_k_major_weight_packs_the_same():
    x, weight, _ = operands(6, 64, 40, with_bias=False, seed=1)
    k_major = weight.t().contiguous().t()  # how models/cpu_layout.py stores CPU weights
    assert torch.equal(cpu_native.pack_panels(k_major), cpu_native.pack_panels(weight))
    y = cpu_native.linear_rows(x.reshape(2, 3, 40), cpu_native.pack_panels(k_major), None)
    assert y.shape == (2, 3, 64)
    torch.testing.assert_close(y.reshape(6, 64).double(), expected(x, weight, None),
                               rtol=1e-5, atol=1e-5)


def test_what_the_kernel_declines():
    x, weight, bias = operands(4, 64, 16, with_bias=True, seed=2)
    panels = cpu_native.pack_panels(weight)
    assert cpu_native.pack_panels(torch.randn(48, 16)) is None  # not whole 32-column panels
    assert cpu_native.linear_rows(torch.randn(65, 16), panels, None) is None  # past 64 rows
    assert cpu_native.linear_rows(x.double(), panels, None) is None
    assert cpu_native.linear_rows(x.t().contiguous().t(), panels, None) is None  # strided
    assert cpu_native.linear_rows(torch.randn(4, 17), panels, None) is None  # another K
    assert cpu_native.linear_rows(x, panels, bias[:32]) is None  # a bias of another width
    assert cpu_native.linear_rows(torch.randn(0, 16), panels, None) is None  # no rows


def _has_avx512() -> bool:
    try:
        return " avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512(), reason="the AVX-512 build already is the AVX2 one")
def test_the_avx2_build_of_the_same_source_computes_the_same(tmp_path):
    """cpu_vec.h gives 8 lanes without AVX-512 and the kernel then tiles 5 rows, not 12: a
    machine without AVX-512 runs that build, so it is built and checked here too."""
    source = cpu_native.SOURCES[[s.name for s in cpu_native.SOURCES].index("cpu_linear.c")]
    objects, library = tmp_path / "cpu_linear_avx2.o", tmp_path / "cpu_linear_avx2.so"
    # the library's own flags, in its two steps: linked with -ffast-math, it would set
    # flush-to-zero for this whole process (test_cpu_native.py checks that it does not)
    for command in ([COMPILER, *cpu_native.COMPILE_FLAGS, "-mno-avx512f", str(source), "-o",
                     str(objects)],
                    [COMPILER, *cpu_native.LINK_FLAGS, str(objects), "-o", str(library),
                     *cpu_native.LIBS]):
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    kernel = ctypes.CDLL(str(library)).linear_rows_f32
    kernel.restype = ctypes.c_int
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + \
        [ctypes.c_int64] * 4 + [ctypes.c_int]
    for rows in (1, 2, 5, 6, 11, 64):
        x, weight, bias = operands(rows, 96, 33, with_bias=True, seed=rows)
        panels, out = cpu_native.pack_panels(weight), torch.empty(rows, 96)
        assert kernel(x.data_ptr(), 33, panels.data_ptr(), bias.data_ptr(), out.data_ptr(), 96,
                      rows, 33, 96, 1) == 0
        torch.testing.assert_close(out.double(), expected(x, weight, bias), rtol=1e-5,
                                   atol=1e-5)
    assert kernel(x.data_ptr(), 33, panels.data_ptr(), None, out.data_ptr(), 96, 65, 33, 96,
                  1) == -1
