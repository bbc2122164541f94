"""Triton matmuls for QuantizedLinear (engine/low_bit.py) on GPUs: out = x @ Wᵀ with W's integers widened and scaled
in registers, so each weight byte is read once from memory and no 16-bit copy of a weight is ever written.

Two kernels per width, chosen by the number of rows (tokens) of x:
- rows (M = 1, decode of one request): a CUDA-core GEMV; memory-bound, so what matters is bytes in flight: the grid splits K as well as N (SPLIT_K programs per strip of outputs), and the last program of a strip
  to finish adds the strip's partial sums in a fixed order (deterministic, unlike atomics on the output).
- tiles (larger M): a tiled GEMM on tensor cores computing outᵀ = W·xᵀ, so the dequantized weight tile is the
  operand that may live in registers (Hopper's wgmma reads its other operand from shared memory), with the same
  optional split of K for the few-tiles case.

4-bit weights are in GGUF's pairing (byte j of each run of 32 inputs holds inputs j and j + 16), so a tile's low
nibbles meet x's inputs k_lo = 32·(t // 16) + t % 16 and its high nibbles k_lo + 16. Portable Triton only (no
vendor intrinsics), so it also builds for Intel GPUs and runs in Triton's CPU interpreter (tests). Block sizes come
from bench/low_bit_kernels.py's sweep on an H200; other GPUs get the same (correct, maybe not best) choices.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    if m <= ROWS_MAX:
        block_m = 1
        block_n, block_k, warps = _rows_config(layer.bits)
        kernel, stages = (_int4_rows_kernel if layer.bits == 4 else _int8_rows_kernel), 1
    else:
        block_m, block_n, block_k, warps, stages = _tiles_config(layer.bits, m)
        kernel = _int4_tiles_kernel if layer.bits == 4 else _int8_tiles_kernel
    grid_m, grid_n = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    split_k = split_count(grid_m * grid_n, k, block_k)
    partials = torch.empty((split_k, m, n) if split_k > 1 else (1,), dtype=torch.float32, device=x.device)
    locks = layer.split_locks(grid_m * grid_n)
    offset = layer.offset if layer.offset is not None else layer.scale  # unread when HAS_OFFSET is False
    flags = dict(GROUP=layer.group_size)
    flags |= dict(HAS_OFFSET=layer.offset is not None) if layer.bits == 4 else dict(PER_ROW=layer.group_size == k)
    kernel[(grid_m * grid_n, split_k)](
        x, layer.qweight, layer.scale, offset, out, partials, locks, m, n, k, x.stride(0), layer.qweight.stride(0),
        layer.scale.stride(0), out.stride(0), **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, num_warps=warps, num_stages=stages)
    return out


def split_count(tiles: int, k: int, block_k: int) -> int:
    """How many programs share each output tile's K: enough for _TARGET_PROGRAMS in all, at least 4 K-blocks each."""
    blocks = triton.cdiv(k, block_k)
    wanted = triton.cdiv(_TARGET_PROGRAMS, tiles)
    return max(1, min(wanted, blocks // 4, 16))


# Tuning tables, from bench/low_bit_kernels.py --sweep on an H200. rows: bits -> (BLOCK_N, BLOCK_K, warps).
ROWS_CONFIGS = {4: (64, 128, 4), 8: (8, 512, 4)}
# tiles: (largest M, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)), the first that holds M.
TILES_CONFIGS = {4: ((16, (16, 64, 64, 4, 3)), (32, (32, 64, 128, 4, 3)), (128, (64, 128, 64, 8, 3)),
                     (None, (128, 128, 128, 8, 3))),
                 8: ((16, (16, 64, 128, 4, 3)), (32, (32, 64, 128, 4, 3)), (128, (64, 64, 128, 4, 3)),
                     (None, (128, 64, 64, 4, 3)))}


def _rows_config(bits: int) -> tuple[int, int, int]:
    return ROWS_CONFIGS[bits]


def _tiles_config(bits: int, m: int) -> tuple[int, int, int, int, int]:
    return next(c for limit, c in TILES_CONFIGS[bits] if limit is None or m <= limit)


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
def _int4_tile(q_ptr, s_ptr, o_ptr, cols, t, k_lo, k0, K, N, stride_qn, stride_sn,
               GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_K: tl.constexpr):
    """The float32 weights [len(cols), BLOCK_K / 2] of inputs k0 + k_lo (low nibbles) and k0 + k_lo + 16 (high)."""
    col_ok = cols < N
    mask = col_ok[:, None] & (k0 + k_lo < K)[None, :]
    cols64 = cols.to(tl.int64)
    byte = tl.load(q_ptr + cols64[:, None] * stride_qn + (k0 // 2 + t)[None, :], mask=mask, other=0)
    s_at = s_ptr + cols64[:, None] * stride_sn
    o_at = o_ptr + cols64[:, None] * stride_sn
    if BLOCK_K <= GROUP:  # the tile lies in one group: one scale per output row
        scale = tl.load(s_at + k0 // GROUP, mask=col_ok[:, None], other=0.0).to(tl.float32)
        if HAS_OFFSET:
            offset = tl.load(o_at + k0 // GROUP, mask=col_ok[:, None], other=0.0).to(tl.float32)
    else:
        group = ((k0 + k_lo) // GROUP)[None, :]
        scale = tl.load(s_at + group, mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            offset = tl.load(o_at + group, mask=mask, other=0.0).to(tl.float32)
    low = (byte & 0xF).to(tl.float32)
    high = (byte >> 4).to(tl.float32)
    if HAS_OFFSET:
        return low * scale + offset, high * scale + offset
    return (low - 8.0) * scale, (high - 8.0) * scale


@triton.jit(do_not_specialize=["M"])
def _int4_rows_kernel(x_ptr, q_ptr, s_ptr, o_ptr, out_ptr, partials_ptr, locks_ptr, M, N, K,
                      stride_xm, stride_qn, stride_sn, stride_om, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    HALF: tl.constexpr = BLOCK_K // 2
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    t = tl.arange(0, HALF)
    k_lo = (t // 16) * 32 + t % 16
    # Products summed elementwise across the loop, reduced once at the end.
    acc = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    start, end = _k_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(start, end, BLOCK_K):
        w_low, w_high = _int4_tile(q_ptr, s_ptr, o_ptr, cols, t, k_lo, k0, K, N, stride_qn, stride_sn,
                                   GROUP, HAS_OFFSET, BLOCK_K)
        k_ok = k0 + k_lo < K
        x_low = tl.load(x_ptr + k0 + k_lo, mask=k_ok, other=0.0).to(tl.float32)
        x_high = tl.load(x_ptr + k0 + 16 + k_lo, mask=k_ok, other=0.0).to(tl.float32)
        acc += w_low * x_low[None, :] + w_high * x_high[None, :]
    _finish(tl.sum(acc, axis=1)[None, :], out_ptr, partials_ptr, locks_ptr, rows, cols, M, N, stride_om, SPLIT_K)


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
                       stride_xm, stride_qn, stride_sn, stride_om, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    HALF: tl.constexpr = BLOCK_K // 2
    rows, cols = _tile_coordinates(M, BLOCK_M, BLOCK_N)
    t = tl.arange(0, HALF)
    k_lo = (t // 16) * 32 + t % 16
    # xᵀ tiles [HALF, BLOCK_M]: outᵀ = W · xᵀ puts the dequantized weight first.
    x_at = x_ptr + rows.to(tl.int64)[None, :] * stride_xm + k_lo[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    start, end = _k_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(start, end, BLOCK_K):
        w_low, w_high = _int4_tile(q_ptr, s_ptr, o_ptr, cols, t, k_lo, k0, K, N, stride_qn, stride_sn,
                                   GROUP, HAS_OFFSET, BLOCK_K)
        x_mask = (k0 + k_lo < K)[:, None] & (rows < M)[None, :]
        x_low = tl.load(x_at + k0, mask=x_mask, other=0.0)
        x_high = tl.load(x_at + k0 + 16, mask=x_mask, other=0.0)
        acc = tl.dot(w_low.to(x_low.dtype), x_low, acc)
        acc = tl.dot(w_high.to(x_high.dtype), x_high, acc)
    _finish(tl.trans(acc), out_ptr, partials_ptr, locks_ptr, rows, cols, M, N, stride_om, SPLIT_K)


@triton.jit
def _int8_scales(s_ptr, cols, ks, k0, K, N, stride_sn, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scales of a grouped int8 tile [len(cols), BLOCK_K] (GGUF Q8_0), shaped to multiply it."""
    col_ok = cols < N
    s_at = s_ptr + cols.to(tl.int64)[:, None] * stride_sn
    if BLOCK_K <= GROUP:
        return tl.load(s_at + k0 // GROUP, mask=col_ok[:, None], other=0.0).to(tl.float32)
    return tl.load(s_at + ((k0 + ks) // GROUP)[None, :], mask=col_ok[:, None] & (k0 + ks < K)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _int8_rows_kernel(x_ptr, q_ptr, s_ptr, o_ptr, out_ptr, partials_ptr, locks_ptr, M, N, K,
                      stride_xm, stride_qn, stride_sn, stride_om, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
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
        w = tl.load(q_at + k0, mask=col_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
        if not PER_ROW:
            w = w * _int8_scales(s_ptr, cols, ks, k0, K, N, stride_sn, GROUP, BLOCK_K)
        acc += w * tl.load(x_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.sum(acc, axis=1)[None, :]
    if PER_ROW:  # integer products, scaled once at the end (a split's partial sums scale the same way)
        acc = acc * tl.load(s_ptr + cols.to(tl.int64) * stride_sn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    _finish(acc, out_ptr, partials_ptr, locks_ptr, rows, cols, M, N, stride_om, SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _int8_tiles_kernel(x_ptr, q_ptr, s_ptr, o_ptr, out_ptr, partials_ptr, locks_ptr, M, N, K,
                       stride_xm, stride_qn, stride_sn, stride_om, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
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
            acc = tl.dot(w.to(x.dtype), x, acc)
        else:
            scale = _int8_scales(s_ptr, cols, ks, k0, K, N, stride_sn, GROUP, BLOCK_K)
            acc = tl.dot((w.to(tl.float32) * scale).to(x.dtype), x, acc)
    if PER_ROW:
        acc = acc * tl.load(s_ptr + cols.to(tl.int64) * stride_sn, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    _finish(tl.trans(acc), out_ptr, partials_ptr, locks_ptr, rows, cols, M, N, stride_om, SPLIT_K)
