"""Triton kernel for sym_int8 weights on GPUs: out = (x @ w_int8ᵀ) * scale, the int8 weights widened to x's dtype
in registers, so each weight byte is read once and no 16-bit copy of the weight is ever written.

Why our own: torchao's int8 weight-only linear widens the whole weight to 16 bits before a cuBLAS matmul on every
call (torch.compile would fuse that; we do not compile), which made a 7B decode step at batch 1 four times slower
than bf16 on an H100, and aten's _weight_int8pack_mm is slower still on CUDA. Portable Triton only, so it also
builds for Intel GPUs and runs in Triton's CPU interpreter (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows of x (tokens) up to which the kernel runs; longer inputs (prefill) widen the weight once and use the
# vendor matmul, whose cost then dwarfs the widening.
MAX_ROWS = 128


def int8_matmul_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (16- or 32-bit), weight [N, K] int8, scale [N] -> [M, N] in x's dtype; M <= MAX_ROWS."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = 16 if m <= 16 else 64
    # Enough programs to keep every SM streaming weights at small M (N / 32 tiles for a 4096-wide output).
    block_n = 32 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_matmul_kernel[grid](x, weight, scale, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, num_warps=4, num_stages=4)
    return out


@triton.jit(do_not_specialize=["M"])
def _int8_matmul_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k_ok = start + ks < K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0)
        # int8 values are exact in every 16-bit float type, so the product is exact before accumulation.
        acc += tl.dot(x, w.to(x.dtype))
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = acc * scale[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
