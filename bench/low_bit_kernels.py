"""The low-bit matmul kernels (engine/low_bit_kernels.py) on a GPU, one decoder layer of the Llama-2-7B shape at a
time: for each format and row count, GPU time of the layer's four projections through our kernel, against bf16
(cuBLAS) and against the dequantize-then-matmul reference. Also the kernels' error against the float32 product of
the dequantized weight. Times are CUDA-graph replays (triton.testing.do_bench_cudagraph): GPU time without launch
overhead, as decode steps run.

    python bench/low_bit_kernels.py             # the table with the shipped block sizes
    python bench/low_bit_kernels.py --sweep     # first try candidate block sizes; the table then runs the best
    FORMATS=sym_int4 SWEEP=sym_int4 SWEEP_ROWS=1,64 python bench/low_bit_kernels.py --sweep

--sweep writes the best block sizes as JSON to $OUT/low_bit_kernel_configs.json (or the working directory), the
file INFERQ_LOW_BIT_KERNEL_CONFIGS takes (engine/low_bit_kernels.py) for another GPU than the tables were swept on.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

# (N, K) of one Llama-2-7B decoder layer's fused projections: qkv, o, gate_up, down.
LAYER = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))
ROWS = tuple(int(r) for r in os.environ.get("ROWS", "1,2,4,8,16,32,64,128,256").split(","))
FORMATS = ("sym_int4", "asym_int4", "sym_int8")


# Copies of the layer each timing cycles through, so that its weights come from memory as in a model's forward
# pass (one 4-bit layer, ~100 MB, would otherwise sit half in an H200's 50 MB L2 and time faster than in use).
COPIES = int(os.environ.get("COPIES", "4"))
# Weight layouts to time (QuantizedLinear's layout): "fragments" (the GPU's for these shapes), "groups" (4-bit
# only) and "rows" to compare.
LAYOUTS = [layout for layout in os.environ.get("LAYOUTS", "fragments").split(",") if layout]


def layouts_of(fmt: str) -> list[str]:
    return [layout for layout in LAYOUTS if layout != "groups" or fmt != "sym_int8"]


def layers(fmt: str, layout: str = "fragments", copies: int = COPIES) -> list[list]:
    """`copies` copies of one layer's [(bf16 nn.Linear, QuantizedLinear)] (random weights)."""
    from engine.low_bit import QuantizedLinear

    torch.manual_seed(0)
    layer_copies = []
    for _ in range(copies):
        out = []
        for n, k in LAYER:
            linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            nn.init.normal_(linear.weight, std=0.02)
            quantized = QuantizedLinear.from_linear(linear, fmt)
            if layout != quantized.layout:
                quantized = QuantizedLinear(quantized.bits, quantized.group_size, quantized.rows_qweight,
                                            quantized.scale, quantized.offset, layout=layout)
            out.append((linear, quantized))
        layer_copies.append(out)
    return layer_copies


def gpu_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3


def per_layer_us(copies: list[list], xs: list, call) -> float:
    """GPU µs of call(x, linear, quantized) over one layer's projections, averaged over the copies."""
    return gpu_us(lambda: [call(x, lin, q) for layer in copies for x, (lin, q) in zip(xs, layer)]) / len(copies)


def measure(fmt: str, layout: str) -> list[dict]:
    from engine import low_bit_kernels as kernels

    rows_out = []
    copies = layers(fmt, layout)
    pairs = copies[0]
    for m in ROWS:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, k in LAYER]
        ours = per_layer_us(copies, xs, lambda x, lin, q: kernels.quantized_matmul(x, q))
        bf16 = per_layer_us(copies, xs, lambda x, lin, q: nn.functional.linear(x, lin.weight))
        reference = per_layer_us(copies[:1], xs, lambda x, lin, q: nn.functional.linear(x, q.dequantize(x.dtype)))
        fast_dequant = per_layer_us(copies, xs,
                                    lambda x, lin, q: nn.functional.linear(x, kernels.dequantize(q, x.dtype)))
        row = {"format": fmt, "layout": layout, "rows": m, "ours_us": ours,
               "bf16_us": bf16, "dequant_then_mm_us": reference, "dequant_kernel_then_mm_us": fast_dequant}
        errors = []
        for x, (_, q) in zip(xs, pairs):
            exact = x.float() @ q.dequantize().t()
            errors.append(((kernels.quantized_matmul(x, q).float() - exact).norm() / exact.norm()).item())
        row["max_rel_err"] = max(errors)
        weight_bytes = sum(q.qweight.numel() * q.qweight.element_size()
                           + 2 * q.scale.numel() * (2 if q.offset is not None else 1)
                           for _, q in pairs)
        row["ours_TBps"] = weight_bytes / (ours * 1e-6) / 1e12
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    return rows_out


def candidates(bits: int, m: int, layout: str = "fragments") -> list[tuple]:
    from engine import low_bit_kernels as kernels

    if m <= kernels.ROWS_MAX:
        if bits == 8 and layout == "rows":  # GGUF Q8_0's GEMV keeps low_bit_kernels.INT8_ROWS_LAYOUT_CONFIG
            return []
        return [("rows", bn, bk, w, s) for bn, bk, w, s in  # BLOCK_K: the fragments' block, whatever it says
                itertools.product((64, 128, 256, 512), (64, 128) if layout != "fragments" else (128,), (4, 8),
                                  (1, 2, 3))]
    block_ms = {2: (16,), 4: (16,), 8: (16,), 16: (16,), 32: (32,), 64: (64,), 128: (64, 128), 256: (128,)}[m]
    if layout == "fragments":  # _fragments_kernel: BLOCK_K is the fragments' block
        if m >= 64:  # one tile of rows may take all of them, so that each weight is dequantized once
            return [("cublas",)] + [("fragments", bm, bn, w, s, False, programs) for bm, bn, (w, s), programs in
                                    itertools.product((64, 128, 256), (64, 128), ((4, 2), (4, 3), (8, 2), (8, 3)),
                                                      (132, 264)) if bm <= 2 * m and bm * bn <= 256 * 128]
        return [("cublas",)] + [("fragments", bm, bn, w, s, scaled, programs) for bm, bn, (w, s), scaled, programs in
                                itertools.product(block_ms, (64, 128, 256), ((4, 2), (4, 3), (8, 3)),
                                                  (False, True) if bits == 4 else (False,), (264, 1024))
                                if bm * bn <= 128 * 128]
    scale_products = (False, True) if bits == 4 else (False,)  # _int4_tiles_kernel's SCALE_PRODUCT
    return [("cublas",)] + [("tiles", bm, bn, bk, w, s, scaled) for bm, bn, bk, (w, s), scaled in
                            itertools.product(block_ms, (64, 128, 256), (64, 128), ((4, 3), (8, 3), (8, 4)),
                                              scale_products)
                            if bm * bn <= 128 * 128]


def _with_config(config: tuple):
    """Patch the kernel tables so that every call takes `config` (a candidate)."""
    from engine import low_bit_kernels as kernels

    kernels.CUBLAS_FROM_ROWS.clear()
    if config[0] == "rows":
        kernels._rows_config = lambda bits: config[1:]
    elif config[0] == "tiles":
        kernels._tiles_config = lambda bits, m: config[1:]
    elif config[0] == "fragments":
        kernels._fragments_config = lambda bits, m: config[1:]
    else:  # dequantize, then cuBLAS
        kernels.CUBLAS_FROM_ROWS.update({4: 1, 8: 1})


def _compile(job: tuple) -> str:
    """Run one candidate once (in a pool process: compiles land in Triton's on-disk cache for the timing pass)."""
    fmt, layout, m, config = job
    from engine import low_bit_kernels as kernels

    _with_config(config)
    try:
        for (n, k), (_, q) in zip(LAYER[:2], layers(fmt, layout, copies=1)[0][:2]):
            kernels.quantized_matmul(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), q)
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is skipped
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def sweep(fmt: str, layout: str) -> dict:
    import engine.low_bit_kernels as kernels

    bits = 8 if fmt == "sym_int8" else 4
    sweep_rows = [int(r) for r in os.environ.get("SWEEP_ROWS", ",".join(map(str, ROWS))).split(",")]
    jobs = [(fmt, layout, m, c) for m in sweep_rows for c in candidates(bits, m, layout)]
    with ProcessPoolExecutor(max_workers=min(12, os.cpu_count() or 1),
                             mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        status = list(pool.map(_compile, jobs))
    failed = [(config, ok) for (_, _, _, config), ok in zip(jobs, status) if ok != "ok"]
    if failed:  # skipped below: say so, since a kernel that no longer compiles looks like one that lost
        print(f"sweep {fmt}: {len(failed)} of {len(jobs)} candidates did not compile, e.g. {failed[0]}", flush=True)
    copies = layers(fmt, layout)
    rows_fn, tiles_fn, fragments_fn = kernels._rows_config, kernels._tiles_config, kernels._fragments_config
    cublas = dict(kernels.CUBLAS_FROM_ROWS)
    best = {}
    for m in sweep_rows:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, k in LAYER]
        timings = []
        for (_, _, job_m, config), ok in zip(jobs, status):
            if job_m != m or ok != "ok":
                continue
            _with_config(config)
            timings.append((per_layer_us(copies, xs, lambda x, lin, q: kernels.quantized_matmul(x, q)), config))
        kernels._rows_config, kernels._tiles_config, kernels._fragments_config = rows_fn, tiles_fn, fragments_fn
        kernels.CUBLAS_FROM_ROWS.clear()
        kernels.CUBLAS_FROM_ROWS.update(cublas)
        timings.sort()
        best[m] = timings[:3] + [t for t in timings[3:] if t[1][0] in ("tiles", "fragments")][:1]  # with ours
        print(f"sweep {fmt} ({layout}) rows {m}: " + "; ".join(f"{t:.1f} us {c}" for t, c in timings[:3]), flush=True)
    return best


def tuned_tables(best: dict[int, list]) -> dict:
    """A format's sweep as low_bit_kernels' tables: the rows config, and tiles configs by largest M (the largest
    swept M's config for any M above)."""
    tables: dict = {}
    tiles, cublas = [], []
    kind = "tiles"
    for m, timings in sorted(best.items()):
        if timings and timings[0][1][0] == "rows":
            tables["rows"] = timings[0][1][1:]
        ours = [config for _, config in timings if config[0] in ("tiles", "fragments")]
        if ours:
            kind = ours[0][0]
            tiles.append((m, ours[0][1:]))
        if timings and timings[0][1][0] == "cublas":
            cublas.append(m)
    if tiles:
        tables[kind] = [[m, c] for m, c in tiles[:-1]] + [[None, tiles[-1][1]]]
    if cublas and cublas == [m for m, _ in tiles][-len(cublas):]:  # from some M on, and for every larger one
        tables["cublas_from_rows"] = cublas[0]
    return tables


def main() -> None:
    name = torch.cuda.get_device_name()
    print(f"device {name}, torch {torch.__version__}", flush=True)
    formats = [f for f in os.environ.get("FORMATS", ",".join(FORMATS)).split(",") if f]
    results = {"device": name}
    if "--sweep" in sys.argv:
        # asym_int4 runs sym_int4's block sizes
        swept = [f for f in os.environ.get("SWEEP", "sym_int4,sym_int8").split(",") if f]
        configs: dict = {"rows": {}, "tiles": {}, "fragments": {}, "cublas_from_rows": {}}
        results["sweep"] = {}
        for fmt in swept:
            for layout in layouts_of(fmt):
                best = sweep(fmt, layout)
                results["sweep"][f"{fmt} {layout}"] = {str(m): v for m, v in best.items()}
                if layout == layouts_of(fmt)[0]:  # the first layout's tables are the ones written
                    bits = "8" if fmt == "sym_int8" else "4"
                    for table, value in tuned_tables(best).items():
                        configs[table][bits] = value
        path = Path(os.environ.get("OUT", "."), "low_bit_kernel_configs.json")
        path.write_text(json.dumps(configs, indent=1))
        print(f"best block sizes: {path}", flush=True)
        from engine import low_bit_kernels

        low_bit_kernels.load_configs(path)  # the table below runs them
    results["rows"] = [row for fmt in formats for layout in layouts_of(fmt) for row in measure(fmt, layout)]
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "low_bit_kernels.json").write_text(json.dumps(results, indent=1))
    print(f"\n== one Llama-2-7B decoder layer's projections (qkv, o, gate_up, down) on {name}: GPU µs ==")
    print("| format | layout | rows | ours | TB/s of weights | bf16 (cuBLAS) | ours × bf16 | dequantize (torch) + "
          "matmul | dequantize (kernel) + matmul | max rel. err. |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['format']} | {r['layout']} | {r['rows']} | {r['ours_us']:.1f} | {r['ours_TBps']:.2f} | "
              f"{r['bf16_us']:.1f} | "
              f"{r['bf16_us'] / r['ours_us']:.2f} | {r['dequant_then_mm_us']:.1f} | "
              f"{r['dequant_kernel_then_mm_us']:.1f} | {r['max_rel_err']:.1e} |")


if __name__ == "__main__":
    main()
