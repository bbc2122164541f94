"""The CPU kernel of the integer low-bit formats (engine/cpu_low_bit.cpp) computes x @ Wᵀ with exactly the weights
QuantizedLinear.dequantize stands for: every format and group size, widths that are not multiples of its tiles, row
counts on both of its paths (weights dequantized in registers for a few rows, through a panel for more), rows
shared among threads in claims, bias, bfloat16 input; and without the kernel the layer still computes the same
through the dequantized weight."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from engine import low_bit
from engine.low_bit import QuantizedLinear, quantize_int4, quantize_int8

cpu_low_bit = pytest.importorskip("engine.cpu_low_bit", reason="the CPU low-bit kernel could not be built here")

ROWS = (1, 2, 3, 5, 17, 32, 33, 300)
N = 97  # not a multiple of either tile's width (4 and 6 weight rows) nor of the threads' split (12)
# (format, group size, K): int4 groups 32, 64, 128; int8 one scale per row (group K) and GGUF's Q8_0 (32). K = 288
# and 384 are no power of two; 200 (int8, one scale per row) is not even a multiple of the 16-float vectors.
CASES = [("sym_int4", 32, 288), ("asym_int4", 32, 288), ("sym_int4", 64, 384), ("asym_int4", 64, 384),
         ("sym_int4", 128, 384), ("asym_int4", 128, 384), ("sym_int8", 288, 288), ("sym_int8", 200, 200),
         ("sym_int8", 32, 288)]


def make_layer(fmt: str, group_size: int, k: int, bias: bool = True) -> QuantizedLinear:
    generator = torch.Generator().manual_seed(k + group_size)
    weight = torch.randn(N, k, generator=generator) * 0.05 + (0.01 if fmt == "asym_int4" else 0.0)
    b = torch.randn(N, generator=generator) if bias else None
    if fmt == "sym_int8":
        return QuantizedLinear(8, group_size, *quantize_int8(weight, group_size), bias=b)
    qweight, scale, offset = quantize_int4(weight, group_size, symmetric=fmt == "sym_int4")
    return QuantizedLinear(4, group_size, qweight, scale, offset, b)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.double() - reference.double()).norm() / reference.double().norm()).item()


def test_the_layer_runs_on_the_kernel():
    assert low_bit._cpu_kernels() is cpu_low_bit


@pytest.mark.parametrize(("fmt", "group_size", "k"), CASES, ids=[f"{f}-g{g}-k{k}" for f, g, k in CASES])
def test_kernel_equals_the_dequantized_weight(fmt, group_size, k):
    layer = make_layer(fmt, group_size, k)
    weight = layer.dequantize().double()
    generator = torch.Generator().manual_seed(1)
    for m in ROWS:
        x = torch.randn(m, k, generator=generator)
        reference = x.double() @ weight.t()
        assert relative_error(cpu_low_bit.quantized_matmul(x, layer), reference) < 1e-5, (fmt, group_size, k, m)
        y = layer(x)  # the module: the kernel, then the bias
        assert y.dtype == torch.float32 and y.shape == (m, N)
        assert relative_error(y, reference + layer.bias.double()) < 1e-5, (fmt, group_size, k, m)


@pytest.mark.parametrize("fmt", ["sym_int4", "asym_int4", "sym_int8"])
def test_threads_share_the_rows_in_claims(fmt):
    """Enough work for every thread: they claim blocks of rows from a shared counter, several each, the last one
    partial (1000 rows are no multiple of the 12-row blocks). Four threads even on fewer cores."""
    k, n = 384, 1000
    generator = torch.Generator().manual_seed(7)
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = torch.randn(n, k, generator=generator) * 0.05
    layer = QuantizedLinear.from_linear(linear, fmt)
    weight = layer.dequantize().double()
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for m in (1, 4, 33):
            x = torch.randn(m, k, generator=generator)
            y = cpu_low_bit.quantized_matmul(x, layer)
            assert relative_error(y, x.double() @ weight.t()) < 1e-5, (fmt, m)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt", ["sym_int4", "asym_int4", "sym_int8"])
@pytest.mark.parametrize("m", [1, 33])
def test_bfloat16_input_and_strided_rows(fmt, m):
    layer = make_layer(fmt, 32 if fmt != "sym_int8" else 288, 288, bias=False)
    weight = layer.dequantize().double()
    x = torch.randn(m, 288)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    # The input rounded to bfloat16, then float32 math, then the output rounded to bfloat16 (8 bits: 2^-8 each).
    assert relative_error(y, x.bfloat16().double() @ weight.t()) < 1e-2
    wide = torch.randn(m, 300)
    wide[:, :288] = x
    rows = wide[:, :288]  # rows 300 floats apart
    assert relative_error(cpu_low_bit.quantized_matmul(rows, layer), x.double() @ weight.t()) < 1e-5
    batched = layer(x.reshape(1, m, 288))  # leading dimensions, as a model's [batch, tokens, hidden]
    assert batched.shape == (1, m, N)


def test_without_the_kernel_the_layer_multiplies_by_the_dequantized_weight():
    """INFERQ_CPU_KERNELS=0: engine.cpu_low_bit does not import, and engine/low_bit.py falls back."""
    script = (
        "import torch\n"
        "from engine import low_bit\n"
        "from engine.low_bit import QuantizedLinear\n"
        "assert low_bit._cpu_kernels() is None\n"
        "layer = QuantizedLinear.from_linear(torch.nn.Linear(128, 40), 'sym_int4')\n"
        "x = torch.randn(3, 128)\n"
        "expected = x @ layer.dequantize().t() + layer.bias\n"
        "assert ((layer(x) - expected).norm() / expected.norm()).item() < 1e-6\n"
    )
    env = {**os.environ, "INFERQ_CPU_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# The AVX2 build (INFERQ_CPU_MARCH=haswell: AVX2 + FMA + F16C, no AVX-512) runs in a subprocess, so that this
# process's kernel stays the native one; one subprocess for every case, as the build (~40 s on 2 cores, cached
# afterwards under $INFERQ_HOME) is most of its cost.
def _check_cases(quantized_matmul) -> None:
    """Every format of CASES, every row count of ROWS (both paths), and 4 threads sharing 1000 rows: against the
    dequantized reference."""
    generator = torch.Generator().manual_seed(3)
    for fmt, group_size, k in CASES:
        layer = make_layer(fmt, group_size, k, bias=False)
        weight = layer.dequantize().double()
        for m in ROWS:
            x = torch.randn(m, k, generator=generator)
            err = relative_error(quantized_matmul(x, layer), x.double() @ weight.t())
            assert err < 1e-5, (fmt, group_size, k, m, err)


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="AVX2 is x86-64's")
def test_avx2_build_equals_the_dequantized_weight():
    """The kernel built with INFERQ_CPU_MARCH=haswell (the AVX2 path: the
    compiler defines __AVX2__, __FMA__ and __F16C__ but not __AVX512F__ for it)
    computes what the dequantized weight does for every format, odd N and K, rows on both paths, threads in claims."""
    probe = subprocess.run(["c++", "-march=haswell", "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True,
                           text=True, timeout=60)
    macros = probe.stdout if probe.returncode == 0 else ""
    if not all(f"#define {m} 1" in macros for m in ("__AVX2__", "__FMA__", "__F16C__")):
        pytest.skip("the C++ compiler cannot target haswell")
    script = (
        "import torch\n"
        "import engine.cpu_low_bit as kernel\n"
        "import tests.test_cpu_low_bit as t\n"
        "t._check_cases(kernel.quantized_matmul)\n"
        "torch.set_num_threads(4)\n"
        "for fmt in ('sym_int4', 'asym_int4', 'sym_int8'):\n"
        "    layer = t.QuantizedLinear.from_linear(torch.nn.Linear(384, 1000, bias=False), fmt)\n"
        "    w = layer.dequantize().double()\n"
        "    for m in (1, 4, 33):\n"
        "        x = torch.randn(m, 384)\n"
        "        assert t.relative_error(kernel.quantized_matmul(x, layer), x.double() @ w.t()) < 1e-5, (fmt, m)\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "INFERQ_CPU_MARCH": "haswell", "PYTHONPATH": root}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, (result.stdout + result.stderr)[-3000:]
