"""The GPU low-bit kernels (engine/low_bit_kernels.py) through Triton's CPU interpreter (conftest sets
TRITON_INTERPRET), against the float32 product of the dequantized weight: every format, group sizes 32/64/128 and
GGUF's Q8_0 grouping, odd N, K not a power of two, 1 to 300 rows (the GEMV, the tiled GEMM, and K split across
programs with the in-kernel reduction), with and without a split. float16 activations: the interpreter mishandles
int8 -> bfloat16 casts; bfloat16 is checked on the GPU by bench/low_bit_kernels.py (its max rel. err. column)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.low_bit import QuantizedLinear, fits_fragments, quantize_int4, quantize_int8

kernels = pytest.importorskip("engine.low_bit_kernels")

# (format, group size, N, K)
CASES = [("sym_int4", 32, 97, 288), ("asym_int4", 32, 97, 288), ("sym_int4", 64, 50, 320),
         ("asym_int4", 128, 33, 384), ("sym_int4", 128, 64, 4096), ("sym_int8", None, 97, 288),
         ("sym_int8", None, 40, 4096), ("q8_0", 32, 65, 352), ("q8_0", 32, 24, 2048), ("asym_int4", 128, 48, 384),
         ("sym_int4", 128, 80, 256), ("sym_int8", None, 48, 320), ("sym_int8", None, 64, 4096), ("q8_0", 64, 48, 384),
         ("q8_0", 128, 32, 384)]
ROWS = (1, 2, 5, 16, 17, 64, 130, 300)


def layer_for(fmt: str, group: int | None, n: int, k: int, layout: str = "rows") -> QuantizedLinear:
    """A random layer in `fmt` (q8_0: int8 in groups); weights row by row (as on the CPU), group by group (4-bit)
    or in fragments (as on a GPU)."""
    weight = torch.randn(n, k) * 0.05 + (0.01 if fmt == "asym_int4" else 0.0)
    if fmt == "sym_int8":
        return QuantizedLinear(8, k, *quantize_int8(weight, k), layout=layout)
    if fmt == "q8_0":
        return QuantizedLinear(8, group, *quantize_int8(weight, group), layout=layout)
    return QuantizedLinear(4, group, *quantize_int4(weight, group, symmetric=fmt == "sym_int4"), layout=layout)


INT4_CASES = [c for c in CASES if c[0].endswith("int4")]
FRAGMENT_CASES = [c for c in CASES if fits_fragments(4 if c in INT4_CASES else 8, c[1] or c[3], c[2])]
INT8_FRAGMENT_CASES = [c for c in FRAGMENT_CASES if c not in INT4_CASES]


@pytest.mark.parametrize("fmt,group,n,k,layout", [c + ("rows",) for c in CASES] + [
    c + ("groups",) for c in INT4_CASES] + [c + ("fragments",) for c in FRAGMENT_CASES])
def test_kernel_computes_the_dequantized_product(fmt, group, n, k, layout):
    torch.manual_seed(0)
    layer = layer_for(fmt, group, n, k, layout)
    reference_weight = layer.dequantize()
    for rows in ROWS:
        x = torch.randn(rows, k, dtype=torch.float16)
        out = kernels.quantized_matmul(x, layer)
        assert out.dtype == torch.float16 and out.shape == (rows, n)
        exact = x.float() @ reference_weight.t()
        error = ((out.float() - exact).norm() / exact.norm()).item()
        assert error < 2e-3, (fmt, group, n, k, rows, error)
    assert int(layer.split_locks(1).abs().sum()) == 0  # the split-K counters are left at zero for the next call


@pytest.mark.parametrize("scale_product", [False, True])
@pytest.mark.parametrize("fmt,group,n,k", [CASES[0], CASES[1], CASES[2], CASES[3], CASES[4]])
def test_the_tiled_gemm_scales_weights_or_products_alike(monkeypatch, fmt, group, n, k, scale_product):
    """The tiles table's last flag either way, at few and many rows: symmetric tiles within one group scale the
    product, the rest (asymmetric, or tiles over several groups) must keep scaling weights whatever the flag says."""
    torch.manual_seed(0)
    layer = layer_for(fmt, group, n, k, "groups")
    shipped = kernels._tiles_config
    monkeypatch.setattr(kernels, "_tiles_config", lambda bits, m: (*shipped(bits, m)[:5], scale_product))
    for rows in (2, 16, 17, 64):
        x = torch.randn(rows, k, dtype=torch.float16)
        exact = x.float() @ layer.dequantize().t()
        error = ((kernels.quantized_matmul(x, layer).float() - exact).norm() / exact.norm()).item()
        assert error < 2e-3, (fmt, group, rows, scale_product, error)


@pytest.mark.parametrize("scale_product", [False, True])
@pytest.mark.parametrize("fmt,group,n,k", FRAGMENT_CASES)
def test_the_fragments_gemm_scales_weights_or_products_alike(monkeypatch, fmt, group, n, k, scale_product):
    """The fragments table's flag either way, at few and many rows, tiles of 16 to 64 rows and outputs (a tile
    past N's end included): asymmetric weights keep scaling weights whatever the flag says, and int8 with one scale
    a row scales its sums at the end."""
    torch.manual_seed(0)
    layer = layer_for(fmt, group, n, k, "fragments")
    for block_m, block_n in ((16, 64), (32, 32), (64, 16)):
        monkeypatch.setattr(kernels, "_fragments_config",
                            lambda bits, m, bm=block_m, bn=block_n: (bm, bn, 4, 3, scale_product, 1024))
        for rows in (2, 17, 64):
            x = torch.randn(rows, k, dtype=torch.float16)
            exact = x.float() @ layer.dequantize().t()
            error = ((kernels.quantized_matmul(x, layer).float() - exact).norm() / exact.norm()).item()
            assert error < 2e-3, (fmt, n, block_m, block_n, rows, scale_product, error)


def test_the_split_of_k_aims_at_the_programs_asked_for():
    """split_count's target: the fragments tables ask for fewer programs than the default from 32 rows (each split
    costs a pass over the output), so the same tiles split K less."""
    tiles = 192  # a 12288-output projection in 64-row tiles
    assert kernels.split_count(tiles, 4096, 128, programs=264) == 2
    assert kernels.split_count(tiles, 4096, 128) == 6
    assert kernels._fragments_config(4, 64)[5] < kernels._TARGET_PROGRAMS


def test_split_k_is_exercised_and_deterministic():
    torch.manual_seed(0)
    layer = layer_for("sym_int4", 128, 40, 4096)
    # 40 outputs make 2 GEMV strips, so the grid splits K to have enough programs.
    assert kernels.split_count(2, 4096, kernels.ROWS_CONFIGS[4][1]) > 1
    x = torch.randn(1, 4096, dtype=torch.float16)
    assert torch.equal(kernels.quantized_matmul(x, layer), kernels.quantized_matmul(x, layer))


def test_bias_and_strided_rows_through_the_module():
    torch.manual_seed(0)
    linear = nn.Linear(256, 48, bias=True).half()
    layer = QuantizedLinear.from_linear(linear, "sym_int4")
    x = torch.randn(6, 512, dtype=torch.float16)[:, ::2]  # rows with a stride
    out = kernels.quantized_matmul(x, layer) + layer.bias
    exact = x.float() @ layer.dequantize().t() + linear.bias.float()
    assert ((out.float() - exact).norm() / exact.norm()).item() < 2e-3


@pytest.mark.parametrize("fmt,group,n,k,layout", [
    c + (layout,) for c in INT4_CASES + [("sym_int4", 32, 20, 96)] for layout in ("rows", "groups", "fragments")
    if layout != "fragments" or c in FRAGMENT_CASES])
@pytest.mark.parametrize("block_n,block_k", [(16, 128), (64, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("subnormal", [False, True])
def test_the_words_gemv_computes_the_dequantized_product(monkeypatch, fmt, group, n, k, block_n, block_k, dtype,
                                                         layout, subnormal):
    """The 4-bit GEMV on int32 words (nibbles read as subnormal floats, or moved under a float's exponent where a
    device may flush subnormals), tiles of a group and narrower (fragments: always their block of 128), x in either
    16-bit type (bfloat16 read in pairs), weights in every layout."""
    torch.manual_seed(0)
    monkeypatch.setitem(kernels.ROWS_CONFIGS, 4, (block_n, block_k, 4, 1))
    monkeypatch.setattr(kernels, "keeps_subnormals", lambda device: subnormal)
    layer = layer_for(fmt, group, n, k, layout)
    x = torch.randn(1, k, dtype=dtype)
    exact = x.float() @ layer.dequantize().t()
    out = kernels.quantized_matmul(x, layer)
    bound = 2e-3 if dtype == torch.float16 else 6e-3  # the interpreter truncates bfloat16 stores (2x the rounding)
    assert ((out.float() - exact).norm() / exact.norm()).item() < bound, (fmt, group, n, k, block_k)


@pytest.mark.parametrize("fmt,group,n,k,layout", [
    CASES[1] + ("rows",), CASES[1] + ("groups",), CASES[3] + ("groups",), CASES[5] + ("rows",), CASES[7] + ("rows",),
    CASES[9] + ("fragments",), CASES[10] + ("fragments",), CASES[11] + ("fragments",), CASES[13] + ("fragments",)])
def test_many_rows_can_take_the_dequantized_weight_to_the_vendor_gemm(monkeypatch, fmt, group, n, k, layout):
    """CUBLAS_FROM_ROWS: the weight dequantized in one kernel pass (exactly dequantize()'s values, rounded once),
    then F.linear."""
    torch.manual_seed(0)
    layer = layer_for(fmt, group, n, k, layout)
    assert torch.equal(kernels.dequantize(layer, torch.float16), layer.dequantize(torch.float16))
    monkeypatch.setitem(kernels.CUBLAS_FROM_ROWS, layer.bits, 64)
    x = torch.randn(70, k, dtype=torch.float16)
    exact = x.float() @ layer.dequantize().t()
    out = kernels.quantized_matmul(x, layer)
    assert ((out.float() - exact).norm() / exact.norm()).item() < 2e-3


def test_a_sweeps_tables_replace_the_shipped_ones_for_the_widths_it_swept(monkeypatch, tmp_path):
    """INFERQ_LOW_BIT_KERNEL_CONFIGS: a sweep where the tiled GEMM won at every row count leaves that width without a
    vendor-GEMM threshold (the shipped one would route its many-row calls elsewhere); other widths keep theirs."""
    import json

    for table in ("ROWS_CONFIGS", "CUBLAS_FROM_ROWS", "TILES_CONFIGS", "FRAGMENTS_CONFIGS"):
        monkeypatch.setattr(kernels, table, dict(getattr(kernels, table)))
    shipped_int8, shipped_cublas_int8 = kernels.FRAGMENTS_CONFIGS[8], kernels.CUBLAS_FROM_ROWS[8]
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"rows": {"4": [64, 128, 4, 2, 8]}, "tiles": {"4": [[None, [64, 64, 64, 4, 3, True]]]},
                                "fragments": {"4": [[16, [16, 64, 4, 2, True, 1024]],
                                                    [None, [64, 128, 8, 3, False, 264]]]},
                                "cublas_from_rows": {}}))
    kernels.load_configs(path)
    assert kernels.ROWS_CONFIGS[4] == (64, 128, 4, 2)  # an older sweep's 5-element entry, truncated
    assert kernels.TILES_CONFIGS[4] == ((None, (64, 64, 64, 4, 3, True)),)
    assert kernels._fragments_config(4, 16) == (16, 64, 4, 2, True, 1024)
    assert kernels._fragments_config(4, 17)[:2] == (64, 128)
    assert kernels.FRAGMENTS_CONFIGS[8] == shipped_int8
    assert 4 not in kernels.CUBLAS_FROM_ROWS and kernels.CUBLAS_FROM_ROWS[8] == shipped_cublas_int8


@pytest.mark.parametrize("fmt,layout", [(fmt, layout) for fmt in ("sym_int4", "asym_int4")
                                        for layout in ("groups", "fragments")] + [("sym_int8", "fragments")])
def test_the_subnormal_gemv_holds_large_and_small_activations(monkeypatch, fmt, layout):
    """The subnormal path scales x by up to 2^85 before its FMA, and its products are q·x·2^-64: activations from
    1e-15 to 1e12 (bfloat16; the range is 2^-62 to 2^43) come out as the dequantized product, not as overflow or
    flushed zeros."""
    torch.manual_seed(0)
    monkeypatch.setattr(kernels, "keeps_subnormals", lambda device: True)
    layer = layer_for(fmt, 128, 48, 384, layout)
    reference = layer.dequantize()
    for magnitude in (1e-15, 1e-8, 1.0, 1e6, 1e12):
        x = (torch.randn(1, 384) * magnitude).to(torch.bfloat16)
        exact = x.double() @ reference.double().t()
        out = kernels.quantized_matmul(x, layer).double()
        assert ((out - exact).norm() / exact.norm()).item() < 6e-3, magnitude


def test_only_devices_known_to_keep_subnormals_take_the_subnormal_gemv():
    """NVIDIA GPUs (PTX without .ftz) and the interpreter keep float32 subnormals; Intel GPUs, whose compiler may
    flush them, take the exponent-trick path."""
    assert kernels.keeps_subnormals(torch.device("cuda")) and kernels.keeps_subnormals(torch.device("cpu"))
    assert not kernels.keeps_subnormals(torch.device("xpu"))


@pytest.mark.parametrize("fmt,group,n,k", INT8_FRAGMENT_CASES)
@pytest.mark.parametrize("block_n", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("subnormal", [False, True])
def test_the_int8_words_gemv_computes_the_dequantized_product(monkeypatch, fmt, group, n, k, block_n, dtype,
                                                              subnormal):
    """The 8-bit GEMV on fragments' words (bytes read as subnormal floats, or through the exponent trick where a
    device may flush subnormals), one scale a row or groups of 64, x in either 16-bit type, a tile past N's end."""
    torch.manual_seed(0)
    monkeypatch.setitem(kernels.ROWS_CONFIGS, 8, (block_n, 64, 4, 1))
    monkeypatch.setattr(kernels, "keeps_subnormals", lambda device: subnormal)
    layer = layer_for(fmt, group, n, k, "fragments")
    x = torch.randn(1, k, dtype=dtype)
    exact = x.float() @ layer.dequantize().t()
    out = kernels.quantized_matmul(x, layer)
    bound = 2e-3 if dtype == torch.float16 else 6e-3  # the interpreter truncates bfloat16 stores (2x the rounding)
    assert ((out.float() - exact).norm() / exact.norm()).item() < bound, (fmt, group, n, k, block_n)
