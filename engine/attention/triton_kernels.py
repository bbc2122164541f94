"""Triton kernels over the paged KV cache: store new keys/values, decode attention (split-K) and prefill attention.

Cache layout (engine/kv_cache.py): per layer key and value tensors [num_blocks, block_size, num_kv_heads, head_dim];
token position p of a request lives in block table[p // block_size] at offset p % block_size. Query head h reads kv
head h // (num_heads // num_kv_heads), as torch's enable_gqa does.

Only portable Triton is used (no inline PTX, no vendor intrinsics), so the kernels also build for Intel GPUs and run
in Triton's CPU interpreter. Scores are computed in base 2 (scale folded with log2(e)) and all softmax state is
float32; outputs are stored in the query dtype.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.fused_kernels import load_cos_sin, rotate_halves, rotate_heads

_LOG2_E = 1.4426950408889634
# Running maximum before any key is seen. Finite, so a query row whose keys are all masked (padding rows, empty
# splits, rows before the sliding window) gives exp2(-inf - _NO_MAX) = 0 instead of exp2(-inf + inf) = NaN.
_NO_MAX = tl.constexpr(-1.0e30)

# Decode programs wanted in flight: a few per streaming multiprocessor of a large GPU, since decode only streams the
# cache from memory and needs many loads outstanding. Fewer programs than this come from small batches, which then
# split each context across programs.
_DECODE_TARGET_PROGRAMS = 512
_DECODE_MAX_SPLITS = 64
# Query rows of a tl.dot tile: matrix instructions work on 16 rows or more (older Triton releases insist on it).
_DOT_MIN_ROWS = 16
# Prefill tile: rows are (query token, query head of the kv group) pairs, so a kv head's keys are loaded once for
# its whole group.
_PREFILL_ROWS = 64


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [num_tokens, num_kv_heads, head_dim] to cache slot slot_mapping[i] (block * block_size + offset).
    Rows with a negative slot are skipped: they pad a captured CUDA graph's batch."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _unit_last_stride(k), _unit_last_stride(v)
    _check_caches(k_cache, v_cache)
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_head_dim_pad(head_dim), BLOCK_SIZE=k_cache.shape[1])


def rotate_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """fused_ops.apply_rotary and store_kv in one launch: rotates q in place and writes the rotated k, and v, to the
    cache (k itself is left as it was). Same roundings as the two ops one after the other."""
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotary embedding needs cos and sin with a contiguous last dim")
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    _check_caches(k_cache, v_cache)
    num_kv_heads, half = k.shape[1], head_dim // 2
    _rotate_and_store_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HALF_PAD=triton.next_power_of_2(half),
        BLOCK_SIZE=k_cache.shape[1])


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, sliding_window: int | None,
                 out: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over its cached context (the new token's key and value already
    stored), softmax(q.k * scale) over keys at positions > context_len - 1 - sliding_window when one is given.

    q [num_seqs, num_heads, head_dim]; block_tables [num_seqs, max_blocks] (int32 or int64, any padding beyond the
    context); context_lens [num_seqs] (the new token included; 0 marks a padding row, whose output is 0). Returns
    (or fills `out`) [num_seqs, num_heads, head_dim] in q's dtype. Launch parameters depend only on shapes, never on
    context lengths, so the call is safe inside CUDA-graph capture.
    """
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = _gqa_group(num_heads, num_kv_heads)
    if out is None:
        out = torch.empty((num_seqs, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    q = _unit_last_stride(q)
    _check_caches(k_cache, v_cache)
    if out.stride(-1) != 1:
        raise ValueError("paged_decode needs an output with contiguous head_dim")
    head_dim_pad = _head_dim_pad(head_dim)
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, block_tables.shape[1], block_size, head_dim)
    split = num_splits > 1
    # Unused by the single-split kernel; a one-element placeholder keeps one argument list.
    split_shape = (num_seqs, num_heads, num_splits) if split else (1,)
    split_out = torch.empty((*split_shape, head_dim) if split else (1,), dtype=torch.float32, device=q.device)
    split_lse = torch.empty(split_shape, dtype=torch.float32, device=q.device)
    # Matrix units even for a lone query head (no GQA): padding it to 16 rows wastes arithmetic, which decode has
    # plenty of, and streams the cache 2.5x faster than a multiply-and-sum (measured on an H200, 7B shape).
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, split_out, split_lse,
        scale * _LOG2_E, sliding_window or 0, num_heads, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, QUERY_ROWS=max(_DOT_MIN_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, TILE_N=_key_tile(head_dim_pad),
        USE_WINDOW=sliding_window is not None, SPLIT=split)
    if split:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            split_out, split_lse, out, num_heads, num_splits, out.stride(0), out.stride(1),
            # One compiled variant whatever the split count (a new count mid-run would stall ~0.5 s compiling).
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=_DECODE_MAX_SPLITS)
    return out


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, block_size: int, head_dim: int) -> int:
    """How many programs share each (sequence, kv head): a power of two, grown until the launch fills the GPU or
    each split would get less than one tile of the widest possible context. Shapes only, so a captured graph keeps
    one value; splits that find no keys of a shorter context exit at once."""
    tiles = max(1, math.ceil(max_blocks * block_size / _key_tile(_head_dim_pad(head_dim))))
    splits = 1
    while (2 * splits <= min(_DECODE_MAX_SPLITS, tiles)
           and num_seqs * num_kv_heads * splits < _DECODE_TARGET_PROGRAMS):
        splits *= 2
    return splits


@dataclass(slots=True, frozen=True)
class PrefillPlan:
    """The launch metadata of a step's prefill chunks, the same in every layer: built once per step (a host list,
    one host-to-device copy and a padded table each), not once per layer."""

    group: int  # query heads per kv head
    rows: int  # query rows per tile: tokens_per_tile tokens times their group heads
    tokens_per_tile: int
    chunk_info: torch.Tensor  # per chunk: first row in q, num_new, context_len
    tile_info: torch.Tensor  # per query tile: chunk index, first new token of the tile
    block_tables: torch.Tensor  # [num_chunks, max_blocks], padded with block 0

    @property
    def num_tiles(self) -> int:
        return self.tile_info.numel() // 2


def prefill_plan(chunks: Sequence[tuple[int, int, int, torch.Tensor]], num_heads: int, num_kv_heads: int,
                 device: torch.device) -> PrefillPlan:
    """chunks: (first row in q, num_new, context_len, block_table) as in AttentionMetadata.prefills (non-empty)."""
    group = _gqa_group(num_heads, num_kv_heads)
    rows = max(_PREFILL_ROWS, triton.next_power_of_2(group))
    tokens_per_tile = rows // group
    chunk_fields = [field for first, num_new, context_len, _ in chunks for field in (first, num_new, context_len)]
    tile_fields = [field for index, (_, num_new, _, _) in enumerate(chunks)
                   for start in range(0, num_new, tokens_per_tile) for field in (index, start)]
    packed = torch.tensor(chunk_fields + tile_fields, dtype=torch.int32, device=device)
    block_tables = torch.nn.utils.rnn.pad_sequence([table for *_, table in chunks], batch_first=True)
    return PrefillPlan(group, rows, tokens_per_tile, packed[:len(chunk_fields)], packed[len(chunk_fields):],
                       block_tables)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  chunks: Sequence[tuple[int, int, int, torch.Tensor]], scale: float, sliding_window: int | None,
                  out: torch.Tensor | None = None, plan: PrefillPlan | None = None) -> torch.Tensor:
    """Causal attention of every prefill chunk of a step, in one launch.

    chunks: (first row in q, num_new, context_len, block_table) as in AttentionMetadata.prefills; the chunk's
    queries sit at positions [context_len - num_new, context_len) and attend to the request's cached keys up to
    their own position (the chunk's own keys must already be stored). q [num_tokens, num_heads, head_dim]; rows of
    q outside the chunks are left untouched in `out`. plan: prefill_plan() of these chunks, when the caller reuses
    it across layers.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if not chunks:
        return out
    q = _unit_last_stride(q)
    _check_caches(k_cache, v_cache)
    if out.stride(-1) != 1:
        raise ValueError("paged_prefill needs an output with contiguous head_dim")
    if plan is None:
        plan = prefill_plan(chunks, num_heads, num_kv_heads, q.device)
    head_dim_pad = _head_dim_pad(head_dim)
    _prefill_kernel[(plan.num_tiles, num_kv_heads)](
        q, k_cache, v_cache, out, plan.block_tables, plan.chunk_info, plan.tile_info,
        scale * _LOG2_E, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        plan.block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=plan.group, ROWS=plan.rows, TOKENS_PER_TILE=plan.tokens_per_tile, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, TILE_N=_key_tile(head_dim_pad),
        USE_WINDOW=sliding_window is not None)
    return out


def _head_dim_pad(head_dim: int) -> int:
    """Tiles are powers of two: head_dim 80 or 96 runs in a 128-wide tile with the tail masked."""
    return max(16, triton.next_power_of_2(head_dim))


def _key_tile(head_dim_pad: int) -> int:
    """Keys per loop step: 64 keeps many loads in flight; halved for 256-wide heads to bound registers."""
    return 64 if head_dim_pad <= 128 else 32


def _gqa_group(num_heads: int, num_kv_heads: int) -> int:
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    return num_heads // num_kv_heads


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Kernels index head_dim with stride 1; other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    # One set of strides serves both caches.
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("key and value caches must have the same shape and strides, head_dim contiguous")


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                     k_stride_token, k_stride_head, v_stride_token, v_stride_head,
                     cache_stride_block, cache_stride_slot, cache_stride_head,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # negative: a padding row of a captured graph
        dims = tl.arange(0, HEAD_DIM_PAD)
        mask = dims < HEAD_DIM
        cache_offset = (slot // BLOCK_SIZE) * cache_stride_block + (slot % BLOCK_SIZE) * cache_stride_slot \
            + head * cache_stride_head + dims
        k = tl.load(k_ptr + token * k_stride_token + head * k_stride_head + dims, mask=mask)
        v = tl.load(v_ptr + token * v_stride_token + head * v_stride_head + dims, mask=mask)
        tl.store(k_cache_ptr + cache_offset, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + cache_offset, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_and_store_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                                q_stride_token, q_stride_head, k_stride_token, k_stride_head,
                                v_stride_token, v_stride_head, cos_stride_token, sin_stride_token,
                                cache_stride_block, cache_stride_slot, cache_stride_head,
                                NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                                HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
                                BLOCK_SIZE: tl.constexpr):
    """One token: its query heads rotated in place, its key heads rotated into the cache, its value heads copied
    there. Head dims are handled as two halves, the rotation's unit."""
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    dim_ok = dims < HALF
    cos, sin = load_cos_sin(cos_ptr, sin_ptr, token, cos_stride_token, sin_stride_token, dims, dim_ok)
    rotate_heads(q_ptr + token * q_stride_token, q_stride_head, cos, sin, dims, dim_ok, NUM_HEADS, HALF, HEADS_PAD)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # negative: a padding row of a captured graph
        heads = tl.arange(0, KV_HEADS_PAD)
        mask = (heads < NUM_KV_HEADS)[:, None] & dim_ok[None, :]
        cache_offsets = (slot // BLOCK_SIZE) * cache_stride_block + (slot % BLOCK_SIZE) * cache_stride_slot \
            + heads[:, None] * cache_stride_head + dims[None, :]
        k_ptrs = k_ptr + token * k_stride_token + heads[:, None] * k_stride_head + dims[None, :]
        k1, k2 = tl.load(k_ptrs, mask=mask, other=0.0), tl.load(k_ptrs + HALF, mask=mask, other=0.0)
        k1_rot, k2_rot = rotate_halves(k1, k2, cos, sin)
        tl.store(k_cache_ptr + cache_offsets, k1_rot.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_cache_ptr + cache_offsets + HALF, k2_rot.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v_ptrs = v_ptr + token * v_stride_token + heads[:, None] * v_stride_head + dims[None, :]
        for half in tl.static_range(2):
            value = tl.load(v_ptrs + half * HALF, mask=mask, other=0.0)
            tl.store(v_cache_ptr + cache_offsets + half * HALF, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _key_offsets(table_row_ptr, keys, key_ok, kv_head, cache_stride_block, cache_stride_slot, cache_stride_head,
                 BLOCK_SIZE: tl.constexpr):
    """Cache offsets of the given key positions of one request (head_dim offset excluded)."""
    blocks = tl.load(table_row_ptr + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    return blocks * cache_stride_block + (keys % BLOCK_SIZE) * cache_stride_slot + kv_head * cache_stride_head


@triton.jit
def _online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale):
    """Fold one tile of keys into the running (max, sum, weighted values) of each query row.

    q [rows, dim], k and v [keys, dim], visible [rows, keys]. Returns the updated (m_i, l_i, acc)."""
    scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    scores = tl.where(visible, scores * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    weighted = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc * alpha[:, None] + weighted


# Integer arguments that vary from step to step are not specialised on (Triton would otherwise compile a variant
# for each of "equals 1", "divisible by 16" and "other": a ~0.5 s stall the first time each one shows up).
@triton.jit(do_not_specialize=["window", "num_splits", "table_stride_seq"])
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
                         split_out_ptr, split_lse_ptr, qk_scale, window, num_heads, num_splits,
                         q_stride_seq, q_stride_head, cache_stride_block, cache_stride_slot, cache_stride_head,
                         table_stride_seq, out_stride_seq, out_stride_head,
                         GROUP: tl.constexpr, QUERY_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                         USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr):
    """One (sequence, kv head, split): the group's query heads against this split's share of the context tiles."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, QUERY_ROWS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * q_stride_seq + heads[:, None] * q_stride_head + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    first_key = 0
    if USE_WINDOW:
        first_key = tl.maximum(context_len - window, 0)
    # The split's share is decided here from the real length, so no host planning is needed and short contexts
    # leave the later splits empty.
    first_tile = first_key // TILE_N
    num_tiles = tl.cdiv(context_len, TILE_N) - first_tile
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_begin = first_tile + split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, first_tile + num_tiles)

    table_row_ptr = block_tables_ptr + seq * table_stride_seq
    m_i = tl.full([QUERY_ROWS], _NO_MAX, tl.float32)
    l_i = tl.zeros([QUERY_ROWS], tl.float32)
    acc = tl.zeros([QUERY_ROWS, HEAD_DIM_PAD], tl.float32)
    for tile in range(tile_begin, tile_end):
        keys = tile * TILE_N + tl.arange(0, TILE_N)
        key_ok = (keys < context_len) & (keys >= first_key)
        offsets = _key_offsets(table_row_ptr, keys, key_ok, kv_head, cache_stride_block, cache_stride_slot,
                               cache_stride_head, BLOCK_SIZE)
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, key_ok[None, :], m_i, l_i, acc, qk_scale)

    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    result = acc / l_safe[:, None]
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        split_rows = (seq * num_heads + heads) * num_splits + split
        tl.store(split_lse_ptr + split_rows, tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf")), mask=row_ok)
        tl.store(split_out_ptr + split_rows[:, None] * HEAD_DIM + dims[None, :], result, mask=out_mask)
    else:
        tl.store(out_ptr + seq * out_stride_seq + heads[:, None] * out_stride_head + dims[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(split_out_ptr, split_lse_ptr, out_ptr, num_heads, num_splits,
                          out_stride_seq, out_stride_head,
                          HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """Merge the splits of one (sequence, query head): each split's normalised output weighted by its share of the
    softmax mass, exp2(lse_split - lse_total)."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    split_ok = splits < num_splits
    first_row = (seq * num_heads + head) * num_splits
    lse = tl.load(split_lse_ptr + first_row + splits, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    # A padding row (context 0) has no keys in any split: weights all 0 and the output 0, not NaN.
    weights = tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0))
    total = tl.sum(weights, axis=0)
    parts = tl.load(split_out_ptr + (first_row + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=split_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    result = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * out_stride_seq + head * out_stride_head + dims,
             result.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@triton.jit(do_not_specialize=["window", "table_stride_chunk"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, chunk_info_ptr, tile_info_ptr,
                    qk_scale, window,
                    q_stride_token, q_stride_head, cache_stride_block, cache_stride_slot, cache_stride_head,
                    table_stride_chunk, out_stride_token, out_stride_head,
                    GROUP: tl.constexpr, ROWS: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr):
    """One (query tile, kv head): TOKENS_PER_TILE new tokens of one chunk times the GROUP query heads of the kv head,
    against the keys from the window start of the tile's first token up to its last token."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    chunk = tl.load(tile_info_ptr + 2 * tile)
    tile_start = tl.load(tile_info_ptr + 2 * tile + 1)
    first_row = tl.load(chunk_info_ptr + 3 * chunk).to(tl.int64)
    num_new = tl.load(chunk_info_ptr + 3 * chunk + 1)
    context_len = tl.load(chunk_info_ptr + 3 * chunk + 2)

    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    tokens = tile_start + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOKENS_PER_TILE * GROUP) & (tokens < num_new)
    dim_ok = dims < HEAD_DIM
    io_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + (first_row + tokens)[:, None] * q_stride_token + heads[:, None] * q_stride_head
                + dims[None, :], mask=io_mask, other=0.0)
    query_pos = context_len - num_new + tokens

    first_query = context_len - num_new + tile_start
    last_query = tl.minimum(first_query + TOKENS_PER_TILE, context_len) - 1
    first_key = 0
    if USE_WINDOW:
        first_key = tl.maximum(first_query - window + 1, 0)

    table_row_ptr = block_tables_ptr + chunk.to(tl.int64) * table_stride_chunk
    m_i = tl.full([ROWS], _NO_MAX, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_PAD], tl.float32)
    for key_start in range((first_key // TILE_N) * TILE_N, last_query + 1, TILE_N):
        keys = key_start + tl.arange(0, TILE_N)
        key_ok = keys <= last_query
        offsets = _key_offsets(table_row_ptr, keys, key_ok, kv_head, cache_stride_block, cache_stride_slot,
                               cache_stride_head, BLOCK_SIZE)
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        visible = keys[None, :] <= query_pos[:, None]
        if USE_WINDOW:
            visible = visible & (keys[None, :] > query_pos[:, None] - window)
        m_i, l_i, acc = _online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale)

    result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (first_row + tokens)[:, None] * out_stride_token + heads[:, None] * out_stride_head
             + dims[None, :], result.to(out_ptr.dtype.element_ty), mask=io_mask)
