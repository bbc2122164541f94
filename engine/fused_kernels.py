"""Triton kernels behind engine/fused_ops.py: RMSNorm with the residual add, rotary embedding of q and k together,
SiLU-and-mul, one launch each, and the single-row GEMV (optionally with SiLU-and-mul on its input).

Only portable Triton is used (no inline asm, no vendor intrinsics), so the kernels also build for Intel GPUs and run
in Triton's CPU interpreter (tests). Arithmetic is float32; results are stored in the input dtype. Launch parameters
depend only on shapes and strides (constant for a model), never on values or token counts, so no host sync happens
and a captured CUDA graph never meets a new compilation. Row indices are int64: a long prefill's [tokens, 2 * inter]
activations exceed 2**31 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# SiLU-and-mul columns per program: a few KB per load keeps memory busy without idling lanes on short rows.
_SILU_BLOCK = 1024


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fused_ops.rms_norm for x [tokens, hidden] in one kernel, one program per row. With a residual, x + residual
    is written into `residual` (which is returned as the second result); x is never written. The normalised result
    is a new tensor in x's dtype."""
    x = _unit_last_stride(x)
    out = torch.empty_like(x)
    add_residual = residual is not None
    if add_residual:
        residual = _unit_last_stride(residual)
    num_tokens, hidden = x.shape
    if num_tokens > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_tokens,)](
            x, residual if add_residual else x, weight, out, x.stride(0),
            residual.stride(0) if add_residual else 0, out.stride(0), eps,
            HIDDEN=hidden, BLOCK=block, ADD_RESIDUAL=add_residual,
            # About 16 elements a thread: a whole row stays in registers up to hidden sizes of 16k.
            num_warps=min(max(block // 512, 1), 16))
    return (out, residual) if add_residual else out


def apply_rotary_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_ops.apply_rotary in one kernel for q and k, one program per token, rotating q and k in place (views
    with a contiguous last dim, such as slices of the fused qkv output, are written through). Only the first half
    of cos and sin is read: RotaryEmbedding.cos_sin repeats the frequencies in the second half."""
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotary embedding needs cos and sin with a contiguous last dim")
    if num_tokens > 0:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half,
            HEADS_PAD=triton.next_power_of_2(num_heads), KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
            HALF_PAD=triton.next_power_of_2(half))
    return q, k


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """fused_ops.silu_and_mul in one kernel: gate_up [tokens, 2 * inter] -> new [tokens, inter] in its dtype."""
    gate_up = _unit_last_stride(gate_up)
    num_tokens, width = gate_up.shape
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens > 0:
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, _SILU_BLOCK))](
            gate_up, out, gate_up.stride(0), out.stride(0), INTER=inter, BLOCK=_SILU_BLOCK)
    return out


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, x_row_stride, residual_row_stride, out_row_stride,
                     eps, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        residual_ptrs = residual_ptr + row * residual_row_stride + cols
        residual = tl.load(residual_ptrs, mask=mask, other=0.0)
        # Rounded to the model dtype before normalising, as the reference adds in the model dtype.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_ptrs, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / HIDDEN + eps)
    # Cast to the model dtype, then scaled by the weight: the reference's two roundings.
    normed = (x32 * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_token_stride, q_head_stride, k_token_stride, k_head_stride,
                   cos_token_stride, sin_token_stride, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                   HALF: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    dim_mask = dims < HALF
    cos, sin = load_cos_sin(cos_ptr, sin_ptr, token, cos_token_stride, sin_token_stride, dims, dim_mask)
    rotate_heads(q_ptr + token * q_token_stride, q_head_stride, cos, sin, dims, dim_mask, NUM_HEADS, HALF, HEADS_PAD)
    rotate_heads(k_ptr + token * k_token_stride, k_head_stride, cos, sin, dims, dim_mask, NUM_KV_HEADS, HALF,
                  KV_HEADS_PAD)


@triton.jit
def load_cos_sin(cos_ptr, sin_ptr, token, cos_token_stride, sin_token_stride, dims, dim_mask):
    """The first halves of one token's cos and sin rows (the second halves repeat them), in float32."""
    cos = tl.load(cos_ptr + token * cos_token_stride + dims, mask=dim_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * sin_token_stride + dims, mask=dim_mask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def rotate_heads(token_ptr, head_stride, cos, sin, dims, dim_mask, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  HEADS_PAD: tl.constexpr):
    """x * cos + rotate_half(x) * sin for all heads of one token, with rotate_half(x) = (-x2, x1): the first half
    becomes x1 * cos - x2 * sin, the second x2 * cos + x1 * sin."""
    heads = tl.arange(0, HEADS_PAD)
    mask = (heads < NUM_HEADS)[:, None] & dim_mask[None, :]
    first_ptrs = token_ptr + heads[:, None] * head_stride + dims[None, :]
    x1 = tl.load(first_ptrs, mask=mask, other=0.0)
    x2 = tl.load(first_ptrs + HALF, mask=mask, other=0.0)
    x1_rot, x2_rot = rotate_halves(x1, x2, cos, sin)
    tl.store(first_ptrs, x1_rot, mask=mask)
    tl.store(first_ptrs + HALF, x2_rot, mask=mask)


@triton.jit
def rotate_halves(x1, x2, cos, sin):
    """The two halves of rotated heads [heads, half] in float32, rounded to x1's dtype (as the reference rounds)."""
    x1_32, x2_32 = x1.to(tl.float32), x2.to(tl.float32)
    return ((x1_32 * cos[None, :] - x2_32 * sin[None, :]).to(x1.dtype),
            (x2_32 * cos[None, :] + x1_32 * sin[None, :]).to(x1.dtype))


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, in_row_stride, out_row_stride, INTER: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate_ptrs = gate_up_ptr + row * in_row_stride + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + INTER, mask=mask, other=0.0).to(tl.float32)
    silu = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + row * out_row_stride + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1; other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()



def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                silu_mul: bool = False) -> torch.Tensor:
    """fused_ops.linear for one row: x [1, K] @ weight [N, K]ᵀ (+ bias) -> [1, N] in x's dtype. With silu_mul, x is
    a gate_up row [1, 2K] and the input is silu(gate) * up, rounded to x's dtype as silu_and_mul_triton stores it.

    Each program streams BLOCK_N whole weight rows in BLOCK_K-wide tiles; a 1024-wide tile of 2-byte weights keeps
    enough loads in flight to run at the copy rate. Settings from a sweep on an H100 over the Llama-2-7B projections
    (bench/gemv_tune.py): 4 rows a program, 8 for K > 8192; 2 warps for weights up to 16M elements, else 4."""
    k = x.shape[1] // 2 if silu_mul else x.shape[1]
    return launch_gemv(x, weight, bias, silu_mul, block_n=4 if k <= 8192 else 8,
                       block_k=min(1024, triton.next_power_of_2(k)),
                       num_warps=2 if weight.shape[0] * k <= 1 << 24 else 4)


def launch_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool, block_n: int,
                block_k: int, num_warps: int, num_stages: int = 1) -> torch.Tensor:
    """gemv_triton with explicit launch settings (bench/gemv_tune.py sweeps them)."""
    k = x.shape[1] // 2 if silu_mul else x.shape[1]
    n = weight.shape[0]
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
        num_warps=num_warps, num_stages=num_stages)
    return out


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, w_row_stride,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SILU_MUL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # The last program's rows past N re-read row 0 instead of masking: unmasked loads vectorise.
    w_ptrs = w_ptr + tl.where(row_ok, rows, 0).to(tl.int64)[:, None] * w_row_stride + tl.arange(0, BLOCK_K)[None, :]
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + start + ks).to(tl.float32)
            w = tl.load(w_ptrs)
            if SILU_MUL:
                up = tl.load(x_ptr + K + start + ks).to(tl.float32)
        else:
            k_ok = start + ks < K
            x = tl.load(x_ptr + start + ks, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            if SILU_MUL:
                up = tl.load(x_ptr + K + start + ks, mask=k_ok, other=0.0).to(tl.float32)
        if SILU_MUL:
            x = (x / (1.0 + tl.exp(-x)) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)
