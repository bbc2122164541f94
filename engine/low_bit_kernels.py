"""Triton matmuls for QuantizedLinear (engine/low_bit.py) on GPUs: out = x @ Wᵀ with W's integers widened and scaled
in registers, so each weight byte is read once from memory and no 16-bit copy of a weight is ever written (except
from CUBLAS_FROM_ROWS rows, where a one-pass dequantization feeds the vendor's GEMM).

Two kernels per width, chosen by the number of rows (tokens) of x:
- rows (M = 1, decode of one request): a CUDA-core GEMV; memory-bound, so what matters is bytes in flight and few
  instructions per weight: the grid splits K as well as N (SPLIT_K programs per strip of outputs), and the last
  program of a strip to finish adds the strip's partial sums in a fixed order (deterministic, unlike atomics). The
  4-bit one and the 8-bit one on fragments work on int32 words at two to three operations per weight
  (_int4_words_kernel, _int8_words_kernel).
- tiles (larger M): a tiled GEMM on tensor cores computing outᵀ = W·xᵀ, so the dequantized weight tile is the
  operand that may live in registers (Hopper's wgmma reads its other operand from shared memory), with the same
  optional split of K for the few-tiles case. On weights in fragments (low_bit.to_fragments, the GPU's layout where
  a weight's groups and rows allow) _fragments_kernel loads each weight tile straight into the MMA's register
  layout.

Integers become floats by the exponent trick (as FasterTransformer's and Marlin's kernels do it, here in portable
Triton): an integer q OR-ed into the mantissa of a float reads as that float plus q times the mantissa's step, with
no int-to-float conversion (those run at a small fraction of a GPU's FMA rate: 16 per clock per SM on Hopper,
against 128 FMAs). The GEMVs convert into float32; the GEMM straight into the 16-bit type its tensor cores take,
where the type's mantissa holds the integers (4-bit always; 8-bit in float16).

4-bit weights are in GGUF's pairing (byte j of each run of 32 inputs holds inputs j and j + 16), so a tile's low
nibbles meet x's inputs k_lo = 32·(t // 16) + t % 16 and its high nibbles k_lo + 16. On a GPU they lie in fragments
(to_fragments) or group by group (to_group_major: a tile of many rows and one group is one contiguous block, 5-6%
faster on an H200 than row by row at 1-64 rows); 8-bit weights in fragments or row by row (GGUF Q8_0's groups of
32); the kernels take every layout (weight_strides). Portable Triton
only (no vendor intrinsics), so it also builds for Intel GPUs and runs in Triton's CPU interpreter (tests). Block
sizes come from bench/low_bit_kernels.py's sweep on an H200; other GPUs get the same (correct, maybe not best)
choices, or a sweep's own through INFERQ_LOW_BIT_KERNEL_CONFIGS.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from engine.low_bit import FRAGMENT_K

# Rows up to which the CUDA-core kernel runs.
ROWS_MAX = 1
# Programs the grid should hold at least, for enough loads in flight on a large GPU.
_TARGET_PROGRAMS = 1024


def quantized_matmul(x: torch.Tensor, layer) -> torch.Tensor:
    """x [M, K] (float16 or bfloat16) @ the QuantizedLinear's weightᵀ -> [M, N] in x's dtype."""
    m, k = x.shape
    n = layer.out_features
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if m >= CUBLAS_FROM_ROWS.get(layer.bits, m + 1):
        return torch.nn.functional.linear(x, dequantize(layer, x.dtype))
    fragments = layer.layout == "fragments"
    programs, scale_product = _TARGET_PROGRAMS, False
    if m <= ROWS_MAX:
        block_m = 1
        if layer.bits == 8 and not fragments:
            block_n, block_k, warps, stages = INT8_ROWS_LAYOUT_CONFIG
            kernel = _int8_rows_kernel
        else:
            block_n, block_k, warps, stages = _rows_config(layer.bits)
            kernel = _int4_words_kernel if layer.bits == 4 else _int8_words_kernel
        if fragments:  # one block a step
            block_k = FRAGMENT_K[layer.bits]
        elif layer.bits == 4:  # its tiles lie in one group (so K is a whole number of them); it reads x in pairs
            block_k = min(block_k, layer.group_size)
        if layer.bits == 4 and x.data_ptr() % 4:
            x = x.clone()
    elif fragments:
        block_m, block_n, warps, stages, scale_product, programs = _fragments_config(layer.bits, m)
        block_k = FRAGMENT_K[layer.bits]
        kernel = _fragments_kernel
    else:
        block_m, block_n, block_k, warps, stages, scale_product = _tiles_config(layer.bits, m)
        kernel = _int4_tiles_kernel if layer.bits == 4 else _int8_tiles_kernel
    grid_m, grid_n = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    # The word GEMVs' tiles are one group or block (128 inputs at most): they may split K further.
    split_k = split_count(grid_m * grid_n, k, block_k,
                          *((2, 32) if kernel in (_int4_words_kernel, _int8_words_kernel) else (4, 16)),
                          programs=programs)
    partials = torch.empty((split_k, m, n) if split_k > 1 else (1,), dtype=torch.float32, device=x.device)
    locks = layer.split_locks(grid_m * grid_n)
    offset = layer.offset if layer.offset is not None else layer.scale  # unread when HAS_OFFSET is False
    has_offset = dict(HAS_OFFSET=layer.offset is not None)
    per_row = dict(PER_ROW=layer.bits == 8 and layer.group_size == k)  # 8-bit: integer products, scaled at the end
    subnormal = dict(SUBNORMAL=keeps_subnormals(x.device))
    flags = dict(GROUP=layer.group_size) | {
        _int4_words_kernel: has_offset | subnormal | dict(FRAGMENTS=fragments),
        _int8_words_kernel: per_row | subnormal,
        _int8_rows_kernel: per_row,
        _fragments_kernel: has_offset | per_row | dict(BITS=layer.bits, SCALE_PRODUCT=scale_product),
        _int4_tiles_kernel: has_offset | dict(SCALE_PRODUCT=scale_product),
        _int8_tiles_kernel: per_row}[kernel]
    stride_qn, stride_qg = weight_strides(layer)
    kernel[(grid_m * grid_n, split_k)](
        x, layer.qweight, layer.scale, offset, out, partials, locks, m, n, k, x.stride(0), stride_qn, stride_qg,
        layer.scale.stride(0), out.stride(0), **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, num_warps=warps, num_stages=stages)
    return out


def weight_strides(layer) -> tuple[int, int]:
    """Bytes (4-bit) or elements (8-bit) between the weight's output rows, and between a row's groups of inputs:
    a 2-D qweight [N, K / 2] lies row by row; a 3-D one [groups, N, group / 2] (low_bit.to_group_major) group by group,
    each group's bytes of all N rows contiguous. Fragments (low_bit.to_fragments) have no such strides: the kernels
    address them from N (0, 0)."""
    q = layer.qweight
    if layer.layout == "fragments":
        return 0, 0
    if layer.layout == "groups":
        return q.stride(1), q.stride(0)
    return q.stride(0), layer.group_size // 2 if layer.bits == 4 else layer.group_size


def keeps_subnormals(device: torch.device) -> bool:
    """Whether float32 arithmetic in the kernels on `device` keeps subnormal numbers, which the 4-bit GEMV's fast
    path reads nibbles as (_subnormal_dot). PTX's fma.rn.f32 and mul.f32 (Triton emits no .ftz for them) do on every
    NVIDIA GPU, and Triton's CPU interpreter computes in numpy, which does too. Intel GPUs may flush them (the
    compiler's choice), and no Intel GPU ran this: they keep the exponent-trick path."""
    return device.type in ("cuda", "cpu")


def split_count(tiles: int, k: int, block_k: int, min_blocks: int = 4, most: int = 16,
                programs: int = _TARGET_PROGRAMS) -> int:
    """How many programs share each output tile's K: enough for `programs` in all, at least `min_blocks` K-blocks
    each, `most` at most."""
    blocks = triton.cdiv(k, block_k)
    wanted = triton.cdiv(programs, tiles)
    return max(1, min(wanted, blocks // min_blocks, most))


# Tuning tables, from bench/low_bit_kernels.py --sweep on an H200; INFERQ_LOW_BIT_KERNEL_CONFIGS names a JSON file
# of the sweep's (written with --sweep) that replaces them, for another GPU.
# rows: bits -> (BLOCK_N, BLOCK_K, warps, stages), for the GPU's default layouts (BLOCK_K of fragments: their block).
ROWS_CONFIGS = {4: (256, 128, 4, 2), 8: (64, 64, 4, 2)}
# The 8-bit GEMV on weights row by row (GGUF Q8_0's groups of 32, which fragments cannot take).
INT8_ROWS_LAYOUT_CONFIG = (4, 1024, 4, 1)
# Rows from which the weight is dequantized into a 16-bit scratch copy and multiplied by the vendor's GEMM (bits ->
# rows); absent: never. On an H200 the fragments GEMMs lose to it above 256 rows (4-bit at 384: 430 µs a layer against
# 364).
CUBLAS_FROM_ROWS: dict[int, int] = {4: 257, 8: 257}
# tiles: bits -> ((largest M, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, scale the product)), ...), the first entry
# that holds M (the last: None, any M). Scale the product (4-bit only): _int4_tiles_kernel's SCALE_PRODUCT.
TILES_CONFIGS = {4: ((16, (16, 64, 64, 4, 3, True)), (128, (64, 128, 128, 8, 3, False)),
                     (None, (128, 128, 128, 8, 3, False))),
                 8: ((16, (16, 64, 128, 4, 3, False)), (64, (64, 64, 128, 4, 3, False)),
                     (None, (128, 64, 64, 4, 3, False)))}

# Tiles of the GEMM on weights in fragments: bits -> ((largest M, (BLOCK_M, BLOCK_N, warps, stages, scale the
# product, programs the split of K aims at)), ...) as TILES_CONFIGS (BLOCK_K is the fragments' block). Fewer
# programs than the other kernels' 1024 from 32 rows: each split's partial sums cost a pass over the output, which
# at 64 rows took a fifth of the time. From 65 rows a tile of 128 rows, so that each weight is dequantized once
# for all of them (at 128 rows 171 µs a 4-bit layer, against 202 in two tiles of 64).
FRAGMENTS_CONFIGS = {4: ((16, (16, 64, 4, 3, True, 264)), (32, (32, 64, 4, 3, True, 264)),
                         (64, (64, 64, 4, 3, False, 264)), (128, (128, 64, 4, 2, False, 264)),
                         (None, (128, 64, 4, 3, False, 132))),
                     8: ((16, (16, 64, 4, 3, False, 1024)), (32, (32, 64, 4, 3, False, 264)),
                         (64, (64, 64, 4, 3, False, 264)), (128, (128, 64, 4, 3, False, 132)),
                         (None, (256, 64, 4, 3, False, 132)))}


def load_configs(path: str | os.PathLike) -> None:
    """Replace the tuning tables by a sweep's JSON file: {"rows": {bits: config}, "tiles": {bits: [[M, config]]},
    "fragments": {bits: [[M, config]]}}."""
    tuned = json.loads(Path(path).read_text())
    ROWS_CONFIGS.update({int(bits): tuple(c)[:4] for bits, c in tuned.get("rows", {}).items()})
    # A swept width's vendor-GEMM threshold is the sweep's, or none.
    for bits in {**tuned.get("tiles", {}), **tuned.get("fragments", {})}:
        CUBLAS_FROM_ROWS.pop(int(bits), None)
    CUBLAS_FROM_ROWS.update({int(bits): rows for bits, rows in tuned.get("cublas_from_rows", {}).items()})
    TILES_CONFIGS.update({int(bits): tuple((limit, tuple(c)) for limit, c in table)
                          for bits, table in tuned.get("tiles", {}).items()})
    FRAGMENTS_CONFIGS.update({int(bits): tuple((limit, tuple(c)) for limit, c in table)
                              for bits, table in tuned.get("fragments", {}).items()})


if os.environ.get("INFERQ_LOW_BIT_KERNEL_CONFIGS"):
    load_configs(os.environ["INFERQ_LOW_BIT_KERNEL_CONFIGS"])


def _rows_config(bits: int) -> tuple[int, int, int, int]:
    return ROWS_CONFIGS[bits]


def _tiles_config(bits: int, m: int) -> tuple[int, int, int, int, int, bool]:
    return next(c for limit, c in TILES_CONFIGS[bits] if limit is None or m <= limit)


def _fragments_config(bits: int, m: int) -> tuple[int, int, int, int, bool, int]:
    return next(c for limit, c in FRAGMENTS_CONFIGS[bits] if limit is None or m <= limit)


@triton.jit
def _k_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[start, end) of K that this program's split covers, in whole blocks."""
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    start = tl.program_id(1) * per_split
    return start, tl.minimum(start + per_split, K)


@triton.jit
def _finish(acc, out_ptr, partials_ptr, locks_ptr, rows, cols, M, N, stride_om, SPLIT_K: tl.constexpr):
    """Store a [rows, cols] block of fp32 sums (acc [BLOCK_M, BLOCK_N]); with a split K, park them, and let the
    strip's last program add every split's block in split order and reset the strip's counter for the next call."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    out_at = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    if SPLIT_K == 1:
        tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        plane = M.to(tl.int64) * N
        at = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(partials_ptr + tl.program_id(1) * plane + at, acc, mask=mask)
        tl.debug_barrier()  # every thread's partials are written before the count says so
        done = tl.atomic_add(locks_ptr + tl.program_id(0), 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for split in range(SPLIT_K):
                total += tl.load(partials_ptr + split * plane + at, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_at, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(locks_ptr + tl.program_id(0), 0)


@triton.jit
def _as_float(q, bias: tl.constexpr, DTYPE: tl.constexpr):
    """q - bias as DTYPE, exactly, for int32 q >= 0 small enough for DTYPE's mantissa (below 2^23 in float32, 2^10 in
    float16, 2^7 in bfloat16): the exponent trick of the module docstring, no int-to-float conversion."""
    if DTYPE == tl.float16:
        return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - (1024.0 + bias)
    elif DTYPE == tl.bfloat16:
        return (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - (128.0 + bias)
    else:
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)


@triton.jit
def _int4_tile(q_ptr, s_ptr, o_ptr, cols, t, k_lo, k0, K, N, stride_qn, stride_qg, stride_sn,
               GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr,
               SCALED: tl.constexpr = True):
    """The weights [len(cols), BLOCK_K / 2] of inputs k0 + k_lo (low nibbles) and k0 + k_lo + 16 (high), as DTYPE
    (float32, or the 16-bit type of x: a scale rounded to bfloat16 loses 3 of float16's bits, far below 4-bit
    steps); SCALED False (symmetric only): the integers q - 8, unscaled."""
    col_ok = cols < N
    # K is a whole number of runs, so input k0 + k_lo is in range exactly where its byte is; masking by the byte's
    # index keeps the mask constant over each run's 16 contiguous bytes, which lets the load be one 16-byte access
    # per run (masked by k_lo, it was 16 one-byte loads).
    mask = col_ok[:, None] & (k0 // 2 + t < K // 2)[None, :]
    cols64 = cols.to(tl.int64)
    at = k0 // 2 + t  # byte of the row; its address is the group's (weight_strides), then the byte in the group
    at = (at // (GROUP // 2)) * stride_qg + at % (GROUP // 2)
    byte = tl.load(q_ptr + cols64[:, None] * stride_qn + at[None, :], mask=mask, other=0).to(tl.int32)
    bias: tl.constexpr = 0.0 if HAS_OFFSET else 8.0  # symmetric: q - 8
    low = _as_float(byte & 0xF, bias, DTYPE)
    high = _as_float(byte >> 4, bias, DTYPE)
    if not SCALED:  # symmetric: q - 8, for the caller to scale
        return low, high
    s_at = s_ptr + cols64[:, None] * stride_sn
    o_at = o_ptr + cols64[:, None] * stride_sn
    if BLOCK_K <= GROUP:  # the tile lies in one group: one scale per output row
        scale = tl.load(s_at + k0 // GROUP, mask=col_ok[:, None], other=0.0).to(DTYPE)
        if HAS_OFFSET:
            offset = tl.load(o_at + k0 // GROUP, mask=col_ok[:, None], other=0.0).to(DTYPE)
    else:
        group = ((k0 + k_lo) // GROUP)[None, :]
        scale = tl.load(s_at + group, mask=mask, other=0.0).to(DTYPE)
        if HAS_OFFSET:
            offset = tl.load(o_at + group, mask=mask, other=0.0).to(DTYPE)
    if HAS_OFFSET:
        return low * scale + offset, high * scale + offset
    return low * scale, high * scale


@triton.jit
def _bf16_pair(pair):
    """Two bfloat16 values packed in int32 (the first in the low half) as float32: their bits, moved up."""
    return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _word_inputs(x_ptr, first):
    """x at the inputs of a word's 8 nibbles (nibble n: byte n // 2, high if n is odd), as float32 [WORDS] each, for
    words whose byte 0 low nibble is input `first`."""
    if x_ptr.dtype.element_ty == tl.bfloat16:  # loaded two at a time, as int32 (first is even)
        pairs = x_ptr.to(tl.pointer_type(tl.int32)) + first // 2
        x0, x2 = _bf16_pair(tl.load(pairs))
        x4, x6 = _bf16_pair(tl.load(pairs + 1))
        x1, x3 = _bf16_pair(tl.load(pairs + 8))
        x5, x7 = _bf16_pair(tl.load(pairs + 9))
    else:
        x0, x1, x2, x3, x4, x5, x6, x7 = _inputs_at(x_ptr, first, 0, 16, 1, 17, 2, 18, 3, 19)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _fragment_inputs(x_ptr, first):
    """x at the inputs of a fragment word's 8 nibbles (nibble 4e + i: input first + 16i + e), as float32 [WORDS]
    each."""
    return _inputs_at(x_ptr, first, 0, 16, 32, 48, 1, 17, 33, 49)


@triton.jit
def _inputs_at(x_ptr, first, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
               D4: tl.constexpr, D5: tl.constexpr, D6: tl.constexpr, D7: tl.constexpr):
    """x at first + D0 ... first + D7 (the inputs of nibbles 0-7), as float32."""
    return (tl.load(x_ptr + first + D0).to(tl.float32), tl.load(x_ptr + first + D1).to(tl.float32),
            tl.load(x_ptr + first + D2).to(tl.float32), tl.load(x_ptr + first + D3).to(tl.float32),
            tl.load(x_ptr + first + D4).to(tl.float32), tl.load(x_ptr + first + D5).to(tl.float32),
            tl.load(x_ptr + first + D6).to(tl.float32), tl.load(x_ptr + first + D7).to(tl.float32))


@triton.jit
def _at_12_and_16(word):
    """Floats of the nibbles of `word` at bits 12-15 and 16-19 without a shift: each masked under the exponent of 1.0,
    f12 = 1 + q·2^-11 and f16 = 1 + q·2^-7 (one masked OR each)."""
    f12 = ((word & 0x0000F000) | 0x3F800000).to(tl.float32, bitcast=True)
    f16 = ((word & 0x000F0000) | 0x3F800000).to(tl.float32, bitcast=True)
    return f12, f16


@triton.jit
def _subnormal_dot(word, x0, x1, x2, x3, x4, x5, x6, x7):
    """Σ q_n·x_n·2^-64 over the 8 nibbles q_n of each word (nibble n at bits 4n meets x_n): a nibble masked in place
    (one AND with an immediate) read as a float32 is the subnormal q·2^(p - 149), p its lowest bit, exact in any
    position up to 16; x_n·2^(85 - p) (per column, once for all of a thread's rows) turns it into q·x_n·2^-64 in
    one FMA. One shift by 12 brings nibbles 5-7 (bits 20-31, where a float's exponent starts) to bits 8-19.
    Exact for |x| from 2^-62 (below, the products turn subnormal and lose bits) to 2^43 (above, x·2^85 overflows):
    activations of a working model lie far inside."""
    high = word >> 12  # the arithmetic shift's sign bits land above bit 19, where no mask reaches
    dot = (word & 0xF).to(tl.float32, bitcast=True) * (x0 * 3.8685626227668134e+25)[None, :]  # 2^85
    dot = tl.fma((word & 0xF0).to(tl.float32, bitcast=True), (x1 * 2.4178516392292583e+24)[None, :], dot)  # 2^81
    dot = tl.fma((word & 0xF00).to(tl.float32, bitcast=True), (x2 * 1.5111572745182865e+23)[None, :], dot)  # 2^77
    dot = tl.fma((word & 0xF000).to(tl.float32, bitcast=True), (x3 * 9.444732965739290e+21)[None, :], dot)  # 2^73
    dot = tl.fma((word & 0xF0000).to(tl.float32, bitcast=True), (x4 * 5.902958103587057e+20)[None, :], dot)  # 2^69
    dot = tl.fma((high & 0xF00).to(tl.float32, bitcast=True), (x5 * 1.5111572745182865e+23)[None, :], dot)
    dot = tl.fma((high & 0xF000).to(tl.float32, bitcast=True), (x6 * 9.444732965739290e+21)[None, :], dot)
    return tl.fma((high & 0xF0000).to(tl.float32, bitcast=True), (x7 * 5.902958103587057e+20)[None, :], dot)


@triton.jit(do_not_specialize=["M"])
def _int4_words_kernel(x_ptr, q_ptr, s_ptr, o_ptr, out_ptr, partials_ptr, locks_ptr, M, N, K,
                       stride_xm, stride_qn, stride_qg, stride_sn, stride_om,
                       GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       SUBNORMAL: tl.constexpr, FRAGMENTS: tl.constexpr):
    """The 4-bit GEMV (one row of x) on int32 words, under three operations per weight (CUDA cores; at one row a
    tensor core would idle 15 of its 16 rows).

    Word c of a run holds in byte b the inputs 4c + b (low nibble) and 4c + b + 16 (high nibble): nibble n at bits
    4n. A nibble q at bits 12-15 or 16-19 becomes a float by one masked OR under the exponent of 1.0
    (_at_12_and_16: 1 + q·2^-11, 1 + q·2^-7), and the word shifted by 8 either way or rotated by 16 brings every
    other nibble there, two at a time: 8 nibbles in 3 shifts and 8 ORs, then one FMA each with x scaled by 2^7 or
    2^3 (x' per position, computed once per thread for all its rows), so f·x' = x' + q·x/16. With D = Σ f·x' and
    X' = Σ x', X = Σ x over a tile, which lies in one group (BLOCK_K <= GROUP) of scale s (and offset o):
    Σ (q - 8)·s·x = 16·s·(D - X' - X/2), and Σ (q·s + o)·x = 16·(s·(D - X') + o/16·X).

    SUBNORMAL (where the device keeps float32 subnormals, keeps_subnormals): _subnormal_dot's one AND and one FMA per
    nibble instead, D = Σ q·x·2^-64, and no constant to hold in a register (the masked OR needs two: the compiled
    loop above spent a sixth of its instructions re-making them); Σ (q - 8)·s·x = 2^64·s·(D - 8·X·2^-64).

    FRAGMENTS: the weight in low_bit.to_fragments' words (BLOCK_K 128): a row's 16 words of a block are contiguous
    too, and nibble 4e + i of a word holds input 16i + e past the word's first (_fragment_inputs)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    col_ok = cols < N
    c = tl.arange(0, WORDS)
    cols64 = cols.to(tl.int64)
    if FRAGMENTS:  # row r's words of block 0: its 16-row block's 256 words, then half r % 16 // 8, then r % 8
        q_at = q_ptr + ((cols64 // 16) * 256 + (cols64 % 16 // 8) * 128 + (cols64 % 8) * 16)[:, None] + c[None, :]
        x_first = 64 * (c % 2) + 8 * (c % 4 // 2) + 2 * (c // 4)  # input of word c's nibble 0
    else:
        q_at = q_ptr.to(tl.pointer_type(tl.int32)) + cols64[:, None] * (stride_qn // 4) + c[None, :]
        x_first = 32 * (c // 4) + 4 * (c % 4)  # input of word c's byte 0 low nibble
    WORDS_PER_GROUP: tl.constexpr = GROUP // 8
    s_at = s_ptr + cols64 * stride_sn
    o_at = o_ptr + cols64 * stride_sn
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    start, end = _k_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(start, end, BLOCK_K):
        group = k0 // GROUP
        if FRAGMENTS:
            word = tl.load(q_at + (tl.cdiv(N, 16) * 256).to(tl.int64) * (k0 // BLOCK_K), mask=col_ok[:, None],
                           other=0)
            x0, x1, x2, x3, x4, x5, x6, x7 = _fragment_inputs(x_ptr, k0 + x_first)
        else:
            word = tl.load(q_at + group * (stride_qg // 4) + (k0 // 8) % WORDS_PER_GROUP, mask=col_ok[:, None],
                           other=0)
            x0, x1, x2, x3, x4, x5, x6, x7 = _word_inputs(x_ptr, k0 + x_first)
        scale = tl.load(s_at + group, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        if SUBNORMAL:
            dot = _subnormal_dot(word, x0, x1, x2, x3, x4, x5, x6, x7)
            x_all = ((x0 + x1) + (x2 + x3) + (x4 + x5) + (x6 + x7)) * 5.421010862427522e-20  # 2^-64
            if HAS_OFFSET:
                offset = tl.load(o_at + group, mask=col_ok, other=0.0).to(tl.float32)[:, None]
                acc += scale * dot + offset * x_all[None, :]
            else:
                acc += scale * (dot - 8.0 * x_all[None, :])
        else:
            # nibbles at bits 12-15 meet x·2^7, at 16-19 x·2^3; one FMA chain per output
            f12, f16 = _at_12_and_16(word)  # nibbles 3, 4
            dot = tl.fma(f16, (x4 * 8.0)[None, :], f12 * (x3 * 128.0)[None, :])
            f12, f16 = _at_12_and_16(word << 8)  # nibbles 1, 2
            dot = tl.fma(f16, (x2 * 8.0)[None, :], tl.fma(f12, (x1 * 128.0)[None, :], dot))
            f12, f16 = _at_12_and_16(word >> 8)  # nibbles 5, 6 (the arithmetic shift's sign bits are masked off)
            dot = tl.fma(f16, (x6 * 8.0)[None, :], tl.fma(f12, (x5 * 128.0)[None, :], dot))
            f12, f16 = _at_12_and_16((word << 16) | ((word >> 16) & 0xFFFF))  # rotated: nibbles 7, 0
            dot = tl.fma(f16, (x0 * 8.0)[None, :], tl.fma(f12, (x7 * 128.0)[None, :], dot))
            x_all = (x0 + x1) + (x2 + x3) + (x4 + x5) + (x6 + x7)
            x_scaled = 128.0 * (x1 + x3 + x5 + x7) + 8.0 * (x0 + x2 + x4 + x6)
            if HAS_OFFSET:
                offset = tl.load(o_at + group, mask=col_ok, other=0.0).to(tl.float32)[:, None]
                acc += scale * (dot - x_scaled[None, :]) + (offset * 0.0625) * x_all[None, :]
            else:
                acc += scale * (dot - (x_scaled + 0.5 * x_all)[None, :])
    if SUBNORMAL:
        total = tl.sum(acc, axis=1) * 1.8446744073709552e+19  # 2^64
    else:
        total = tl.sum(acc, axis=1) * 16.0
    _finish(total[None, :], out_ptr, partials_ptr, locks_ptr, rows, cols, M, N, stride_om, SPLIT_K)


def dequantize(layer, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight [N, K] in `dtype` (16-bit), in one pass over its bytes: for the vendor's GEMM where many
    rows share each weight (CUBLAS_FROM_ROWS)."""
    n, k = layer.out_features, layer.in_features
    out = torch.empty((n, k), dtype=dtype, device=layer.qweight.device)
    offset = layer.offset if layer.offset is not None else layer.scale
    if layer.layout == "fragments":
        block_n = 64
        _dequantize_fragments_kernel[(triton.cdiv(n, block_n), k // FRAGMENT_K[layer.bits])](
            layer.qweight, layer.scale, offset, out, n, k, layer.scale.stride(0), GROUP=layer.group_size,
            HAS_OFFSET=layer.offset is not None, BITS=layer.bits, BLOCK_N=block_n, BLOCK_K=FRAGMENT_K[layer.bits])
        return out
    block_n, block_k = 16, 256
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        layer.qweight, layer.scale, offset, out, n, k, *weight_strides(layer), layer.scale.stride(0),
        BITS=layer.bits, GROUP=layer.group_size, HAS_OFFSET=layer.offset is not None, BLOCK_N=block_n,
        BLOCK_K=block_k)
    return out


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, o_ptr, out_ptr, N, K, stride_qn, stride_qg, stride_sn, BITS: tl.constexpr,
                       GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    col_ok = (cols < N)[:, None]
    cols64 = cols.to(tl.int64)[:, None]
    if BITS == 4:
        t = tl.arange(0, BLOCK_K // 2)
        k_lo = (t // 16) * 32 + t % 16
        w_low, w_high = _int4_tile(q_ptr, s_ptr, o_ptr, cols, t, k_lo, k0, K, N, stride_qn, stride_qg, stride_sn,
                                   GROUP, HAS_OFFSET, BLOCK_K, tl.float32)
        mask = col_ok & (k0 + k_lo < K)[None, :]
        at = out_ptr + cols64 * K + (k0 + k_lo)[None, :]
        tl.store(at, w_low.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(at + 16, w_high.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = col_ok & (ks < K)[None, :]
        w = _int8_as_float(tl.load(q_ptr + cols64 * stride_qn + ks[None, :], mask=mask, other=0), tl.float32)
        scale = tl.load(s_ptr + cols64 * stride_sn + (ks // GROUP)[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols64 * K + ks[None, :], (w * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_coordinates(M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """rows and cols of this program's output tile; consecutive programs share a weight tile (M fastest)."""
    grid_m = tl.cdiv(M, BLOCK_M)
    tile = tl.program_id(0)
    rows = (tile % grid_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile // grid_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols


@triton.jit(do_not_specialize=["M"])
def _int4_tiles_kernel(x_ptr, q_ptr, s_ptr, o_ptr, out_ptr, partials_ptr, locks_ptr, M, N, K,
                       stride_xm, stride_qn, stride_qg, stride_sn, stride_om,
                       GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       SCALE_PRODUCT: tl.constexpr):
    """The tiled 4-bit GEMM. SCALE_PRODUCT, taken where a tile has one scale per output row and no offset
    (symmetric, BLOCK_K <= GROUP): the tile's integers q - 8 (exact in x's type) meet x, and the product is scaled
    in float32, the scale loaded straight in the accumulator's layout; otherwise each weight is scaled before the
    product, the scale passing through shared memory to reach the weights' layout. On an H200 the first wins up to
    16 rows (fewer accumulators than weights per thread, 8%), the second from 64."""
    SCALED_PRODUCT: tl.constexpr = SCALE_PRODUCT and not HAS_OFFSET and BLOCK_K <= GROUP
    HALF: tl.constexpr = BLOCK_K // 2
    rows, cols = _tile_coordinates(M, BLOCK_M, BLOCK_N)
    t = tl.arange(0, HALF)
    k_lo = (t // 16) * 32 + t % 16
    # xᵀ tiles [HALF, BLOCK_M]: outᵀ = W · xᵀ puts the dequantized weight first.
    x_at = x_ptr + rows.to(tl.int64)[None, :] * stride_xm + k_lo[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    start, end = _k_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(start, end, BLOCK_K):
        w_low, w_high = _int4_tile(q_ptr, s_ptr, o_ptr, cols, t, k_lo, k0, K, N, stride_qn, stride_qg, stride_sn,
                                   GROUP, HAS_OFFSET, BLOCK_K, x_ptr.dtype.element_ty, not SCALED_PRODUCT)
        x_mask = (k0 + k_lo < K)[:, None] & (rows < M)[None, :]
        x_low = tl.load(x_at + k0, mask=x_mask, other=0.0)
        x_high = tl.load(x_at + k0 + 16, mask=x_mask, other=0.0)
        if SCALED_PRODUCT:
            product = tl.dot(w_high, x_high, tl.dot(w_low, x_low))
            scale = tl.load(s_ptr + cols.to(tl.int64) * stride_sn + k0 // GROUP, mask=cols < N, other=0.0)
            acc += product * scale.to(tl.float32)[:, None]
        else:
            acc = tl.dot(w_low, x_low, acc)
            acc = tl.dot(w_high, x_high, acc)
    _finish(tl.trans(acc), out_ptr, partials_ptr, locks_ptr, rows, cols, M, N, stride_om, SPLIT_K)


@triton.jit
def _fragment_block(q_ptr, first_block, block, N, BLOCKS: tl.constexpr):
    """The words [16·BLOCKS, 16] of input block `block` for output rows 16·first_block on (low_bit.to_fragments),
    shaped so that thread (g, t) of warp w holds rows 16w + g and 16w + g + 8, words 2t, 2t + 1, 2t + 8 and 2t + 9:
    the register layout of a tensor-core MMA's A operand, which Triton then takes as it is. Each row half is loaded
    as [BLOCKS, 8 g, 4 t, 4 words] (a thread's 16 bytes contiguous, a warp's 512), and the halves joined and the
    dimensions permuted, which moves no data between threads."""
    b = tl.arange(0, BLOCKS)[:, None, None, None]
    at = (first_block + b) * 256 + tl.arange(0, 8)[None, :, None, None] * 16 \
        + tl.arange(0, 4)[None, None, :, None] * 4 + tl.arange(0, 4)[None, None, None, :]
    at = q_ptr + (tl.cdiv(N, 16) * 256).to(tl.int64) * block + at  # (N / 16 · 256 · blocks may pass 2^31)
    ok = first_block + b < tl.cdiv(N, 16)
    words = tl.join(tl.load(at, mask=ok, other=0), tl.load(at + 128, mask=ok, other=0))  # [b, g, t, word, half]
    words = words.reshape(BLOCKS, 8, 4, 2, 2, 2).permute(0, 5, 1, 3, 2, 4)  # [b, half, g, word // 2, t, word % 2]
    return words.reshape(16 * BLOCKS, 16)


@triton.jit
def _nibble_pair(words, bias: tl.constexpr, DTYPE: tl.constexpr):
    """The nibbles at bits 0-3 and 16-19 of each word, less `bias`, as DTYPE [rows, words, 2]. In a 16-bit type both
    become floats in one masked OR of the word (each half is the exponent trick's 16-bit pattern), so the word is
    the tensor cores' register for the pair, with no shuffle of halves between words."""
    if DTYPE == tl.float32:
        values = tl.join(_as_float(words & 0xF, bias, DTYPE), _as_float((words >> 16) & 0xF, bias, DTYPE))
    elif DTYPE == tl.float16:
        values = _halves((words & 0x000F000F) | 0x64006400, DTYPE) - (1024.0 + bias)
    else:
        values = _halves((words & 0x000F000F) | 0x43004300, DTYPE) - (128.0 + bias)
    return values


@triton.jit
def _halves(pair, DTYPE: tl.constexpr):
    """Each int32's two 16-bit halves (low first) as DTYPE, [..., 2]."""
    return tl.join(pair.to(tl.int16), (pair >> 16).to(tl.int16)).to(DTYPE, bitcast=True)


@triton.jit
def _fragment_nibbles(words, HAS_OFFSET: tl.constexpr, DTYPE: tl.constexpr):
    """The nibbles of each word as DTYPE (q, or q - 8 for symmetric weights) in one [rows, 128] tile, as
    to_fragments orders them: nibble 4e + i of word c (bits 4i + 16e) is input 64·(c % 2) + 16i + 2·(c // 2) + e
    of the block."""
    bias: tl.constexpr = 0.0 if HAS_OFFSET else 8.0
    pairs = tl.join(tl.join(_nibble_pair(words, bias, DTYPE), _nibble_pair(words >> 4, bias, DTYPE)),
                    tl.join(_nibble_pair(words >> 8, bias, DTYPE), _nibble_pair(words >> 12, bias, DTYPE)))
    rows: tl.constexpr = words.shape[0]
    pairs = pairs.reshape(rows, 8, 2, 2, 2, 2)  # [rows, c // 2, c % 2, e, i % 2, i // 2]
    return pairs.permute(0, 2, 5, 4, 1, 3).reshape(rows, 128)


@triton.jit
def _fragment_bytes(words, DTYPE: tl.constexpr):
    """The 4 bytes of each word (int8, two's complement) as DTYPE in one [rows, 64] tile whose column 16n + c is
    byte n of word c: input 16n + c of the block, as to_fragments orders them. XOR-ed with 0x80 each byte is
    q + 128 (0..255), which the exponent trick takes (float16's mantissa holds it; bfloat16's is one bit short,
    so its go through float32)."""
    u = words ^ -2139062144  # 0x80808080
    FLOAT: tl.constexpr = tl.float16 if DTYPE == tl.float16 else tl.float32
    b01 = tl.join(_as_float(u & 0xFF, 128.0, FLOAT), _as_float((u >> 8) & 0xFF, 128.0, FLOAT))
    b23 = tl.join(_as_float((u >> 16) & 0xFF, 128.0, FLOAT), _as_float((u >> 24) & 0xFF, 128.0, FLOAT))
    values = tl.join(b01, b23).to(DTYPE)  # [rows, c, n % 2, n // 2]
    return values.permute(0, 3, 2, 1).reshape(words.shape[0], 4 * words.shape[1])


@triton.jit(do_not_specialize=["M"])
def _fragments_kernel(x_ptr, q_ptr, s_ptr, o_ptr, out_ptr, partials_ptr, locks_ptr, M, N, K,
                      stride_xm, stride_qn, stride_qg, stride_sn, stride_om,
                      GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, PER_ROW: tl.constexpr, BITS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, SCALE_PRODUCT: tl.constexpr):
    """The tiled GEMM on 4- or 8-bit weights in fragments (low_bit.to_fragments; BLOCK_K their block, within one
    group): outᵀ = W·xᵀ with each weight tile loaded straight into the MMA's register layout (_fragment_block), so
    the one dot per block takes it from registers (Triton issues it as 16-input MMAs, waited for at the step's
    end). PER_ROW (8-bit, one scale a row): the integers meet x, exact in
    its type, and the sums are scaled once at the end. SCALE_PRODUCT (symmetric): the dot multiplies the integers
    (q - 8 for 4 bits) and its float32 product is scaled per row; otherwise the weights are scaled (and offset)
    before it, which keeps the dot chained into the accumulator. On an H200 the first wins up to 32 rows (4-bit),
    the second from 64."""
    SCALED_PRODUCT: tl.constexpr = SCALE_PRODUCT and not HAS_OFFSET
    rows, cols = _tile_coordinates(M, BLOCK_M, BLOCK_N)
    first_block = (tl.program_id(0) // tl.cdiv(M, BLOCK_M)) * (BLOCK_N // 16)
    ks = tl.arange(0, BLOCK_K)
    x_at = x_ptr + rows.to(tl.int64)[None, :] * stride_xm + ks[:, None]
    col_ok = cols < N
    s_at = s_ptr + cols.to(tl.int64) * stride_sn
    o_at = o_ptr + cols.to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    start, end = _k_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(start, end, BLOCK_K):
        words = _fragment_block(q_ptr, first_block, k0 // BLOCK_K, N, BLOCK_N // 16)
        if BITS == 4:
            w = _fragment_nibbles(words, HAS_OFFSET, x_ptr.dtype.element_ty)
        else:
            w = _fragment_bytes(words, x_ptr.dtype.element_ty)
        x = tl.load(x_at + k0, mask=(rows < M)[None, :], other=0.0)
        if PER_ROW:
            acc = tl.dot(w, x, acc)
        else:
            scale = tl.load(s_at + k0 // GROUP, mask=col_ok, other=0.0)
            if SCALED_PRODUCT:
                acc += tl.dot(w, x) * scale.to(tl.float32)[:, None]
            else:
                w = w * scale.to(w.dtype)[:, None]
                if HAS_OFFSET:
                    w += tl.load(o_at + k0 // GROUP, mask=col_ok, other=0.0).to(w.dtype)[:, None]
                acc = tl.dot(w, x, acc)
    if PER_ROW:
        acc = acc * tl.load(s_at, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    _finish(tl.trans(acc), out_ptr, partials_ptr, locks_ptr, rows, cols, M, N, stride_om, SPLIT_K)


@triton.jit
def _dequantize_fragments_kernel(q_ptr, s_ptr, o_ptr, out_ptr, N, K, stride_sn, GROUP: tl.constexpr,
                                 HAS_OFFSET: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    """One block of BLOCK_K (the fragments' block) inputs of BLOCK_N rows of a weight in fragments, dequantized
    into out [N, K]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    words = _fragment_block(q_ptr, tl.program_id(0) * (BLOCK_N // 16), tl.program_id(1), N, BLOCK_N // 16)
    if BITS == 4:
        w = _fragment_nibbles(words, HAS_OFFSET, tl.float32)
    else:
        w = _fragment_bytes(words, tl.float32)
    col_ok = (cols < N)[:, None]
    cols64 = cols.to(tl.int64)[:, None]
    w = w * tl.load(s_ptr + cols64 * stride_sn + k0 // GROUP, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        w += tl.load(o_ptr + cols64 * stride_sn + k0 // GROUP, mask=col_ok, other=0.0).to(tl.float32)
    ks = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + cols64 * K + ks[None, :], w.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _int8_scales(s_ptr, cols, ks, k0, K, N, stride_sn, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scales of a grouped int8 tile [len(cols), BLOCK_K] (GGUF Q8_0), shaped to multiply it."""
    col_ok = cols < N
    s_at = s_ptr + cols.to(tl.int64)[:, None] * stride_sn
    if BLOCK_K <= GROUP:
        return tl.load(s_at + k0 // GROUP, mask=col_ok[:, None], other=0.0).to(tl.float32)
    return tl.load(s_at + ((k0 + ks) // GROUP)[None, :], mask=col_ok[:, None] & (k0 + ks < K)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _int8_as_float(q, DTYPE: tl.constexpr):
    """int8 q as DTYPE exactly: q + 128 (0..255) through the exponent trick in float32, or float16's (1152 + q);
    bfloat16's mantissa cannot hold 256 steps, so it takes float32's and rounds (exactly: |q| < 2^8)."""
    if DTYPE == tl.float16:
        return (q.to(tl.int32) + 0x6480).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
    else:
        return ((q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0).to(DTYPE)


@triton.jit(do_not_specialize=["M"])
def _int8_rows_kernel(x_ptr, q_ptr, s_ptr, o_ptr, out_ptr, partials_ptr, locks_ptr, M, N, K,
                      stride_xm, stride_qn, stride_qg, stride_sn, stride_om,
                      GROUP: tl.constexpr, PER_ROW: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    q_at = q_ptr + cols.to(tl.int64)[:, None] * stride_qn + ks[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    start, end = _k_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(start, end, BLOCK_K):
        k_ok = k0 + ks < K
        w = _int8_as_float(tl.load(q_at + k0, mask=col_ok[:, None] & k_ok[None, :], other=0), tl.float32)
        if not PER_ROW:
            w = w * _int8_scales(s_ptr, cols, ks, k0, K, N, stride_sn, GROUP, BLOCK_K)
        acc += w * tl.load(x_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.sum(acc, axis=1)[None, :]
    if PER_ROW:  # integer products, scaled once at the end (a split's partial sums scale the same way)
        acc = acc * tl.load(s_ptr + cols.to(tl.int64) * stride_sn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    _finish(acc, out_ptr, partials_ptr, locks_ptr, rows, cols, M, N, stride_om, SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _int8_words_kernel(x_ptr, q_ptr, s_ptr, o_ptr, out_ptr, partials_ptr, locks_ptr, M, N, K,
                       stride_xm, stride_qn, stride_qg, stride_sn, stride_om,
                       GROUP: tl.constexpr, PER_ROW: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       SUBNORMAL: tl.constexpr):
    """The 8-bit GEMV (one row of x) on weights in fragments (low_bit.to_fragments, BLOCK_K their 64), one block a
    step: a row's 16 words of a block are contiguous, and byte n of word c holds input 16n + c' of the block. XOR-ed
    with 0x80 a byte is u = q + 128, and Σ q·x = Σ u·x - 128·Σ x.

    SUBNORMAL (keeps_subnormals): a byte masked in place (bits 0-7 or 8-15, after one shift by 16 for the upper
    two) read as a float32 is the subnormal u·2^(p - 149), p its lowest bit, and one FMA with x·2^(85 - p) makes
    it u·x·2^-64 (as the 4-bit _subnormal_dot): one AND and one FMA a weight. Otherwise the exponent trick
    (_as_float), one more subtraction a weight."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    col_ok = cols < N
    c = tl.arange(0, 16)
    cols64 = cols.to(tl.int64)
    # row r's words of block 0: its 16-row block's 256 words, then half r % 16 // 8, then r % 8
    q_at = q_ptr + ((cols64 // 16) * 256 + (cols64 % 16 // 8) * 128 + (cols64 % 8) * 16)[:, None] + c[None, :]
    x_first = 8 * (c % 4 // 2) + 2 * (c // 4) + c % 2  # input of word c's byte 0
    s_at = s_ptr + cols64 * stride_sn
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    start, end = _k_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(start, end, BLOCK_K):
        u = tl.load(q_at + (tl.cdiv(N, 16) * 256).to(tl.int64) * (k0 // BLOCK_K), mask=col_ok[:, None],
                    other=0) ^ -2139062144  # 0x80808080: each byte q + 128
        x0 = tl.load(x_ptr + k0 + x_first).to(tl.float32)
        x1 = tl.load(x_ptr + k0 + x_first + 16).to(tl.float32)
        x2 = tl.load(x_ptr + k0 + x_first + 32).to(tl.float32)
        x3 = tl.load(x_ptr + k0 + x_first + 48).to(tl.float32)
        if SUBNORMAL:
            high = u >> 16  # the arithmetic shift's sign bits land above bit 15, where no mask reaches
            dot = (u & 0xFF).to(tl.float32, bitcast=True) * (x0 * 3.8685626227668134e+25)[None, :]  # 2^85
            dot = tl.fma((u & 0xFF00).to(tl.float32, bitcast=True), (x1 * 1.5111572745182865e+23)[None, :], dot)
            dot = tl.fma((high & 0xFF).to(tl.float32, bitcast=True), (x2 * 3.8685626227668134e+25)[None, :], dot)
            dot = tl.fma((high & 0xFF00).to(tl.float32, bitcast=True), (x3 * 1.5111572745182865e+23)[None, :], dot)
            dot -= (((x0 + x1) + (x2 + x3)) * 6.938893903907228e-18)[None, :]  # 128·2^-64
        else:
            dot = _as_float(u & 0xFF, 128.0, tl.float32) * x0[None, :]
            dot = tl.fma(_as_float((u >> 8) & 0xFF, 128.0, tl.float32), x1[None, :], dot)
            dot = tl.fma(_as_float((u >> 16) & 0xFF, 128.0, tl.float32), x2[None, :], dot)
            dot = tl.fma(_as_float((u >> 24) & 0xFF, 128.0, tl.float32), x3[None, :], dot)
        if PER_ROW:
            acc += dot
        else:
            acc += dot * tl.load(s_at + k0 // GROUP, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    total = tl.sum(acc, axis=1)
    if SUBNORMAL:
        total = total * 1.8446744073709552e+19  # 2^64
    if PER_ROW:  # integer products, scaled once at the end (a split's partial sums scale the same way)
        total = total * tl.load(s_at, mask=col_ok, other=0.0).to(tl.float32)
    _finish(total[None, :], out_ptr, partials_ptr, locks_ptr, rows, cols, M, N, stride_om, SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _int8_tiles_kernel(x_ptr, q_ptr, s_ptr, o_ptr, out_ptr, partials_ptr, locks_ptr, M, N, K,
                       stride_xm, stride_qn, stride_qg, stride_sn, stride_om,
                       GROUP: tl.constexpr, PER_ROW: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    rows, cols = _tile_coordinates(M, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    x_at = x_ptr + rows.to(tl.int64)[None, :] * stride_xm + ks[:, None]
    q_at = q_ptr + cols.to(tl.int64)[:, None] * stride_qn + ks[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    start, end = _k_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(start, end, BLOCK_K):
        k_ok = k0 + ks < K
        x = tl.load(x_at + k0, mask=k_ok[:, None] & (rows < M)[None, :], other=0.0)
        w = tl.load(q_at + k0, mask=col_ok[:, None] & k_ok[None, :], other=0)
        if PER_ROW:  # int8 values are exact in every 16-bit float type: exact products, scaled at the end
            acc = tl.dot(_int8_as_float(w, x.dtype), x, acc)
        else:
            scale = _int8_scales(s_ptr, cols, ks, k0, K, N, stride_sn, GROUP, BLOCK_K)
            acc = tl.dot((_int8_as_float(w, tl.float32) * scale).to(x.dtype), x, acc)
    if PER_ROW:
        acc = acc * tl.load(s_ptr + cols.to(tl.int64) * stride_sn, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    _finish(tl.trans(acc), out_ptr, partials_ptr, locks_ptr, rows, cols, M, N, stride_om, SPLIT_K)
