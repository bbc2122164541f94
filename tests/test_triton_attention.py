"""The Triton attention backend against the torch reference backend on random paged caches: decode batches
(split-K, GQA, head_dim that is not a power of two, padding rows of a captured graph), prefill chunks, mixed steps,
sliding windows, and the cache writes.

Without a GPU the kernels run in Triton's CPU interpreter, so the shapes here stay small; bench/attention_check.py
runs larger ones on a GPU.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
import torch

from engine.device import resolve_device

DEVICE = resolve_device("auto")
pytest.importorskip("triton")  # on the CPU, conftest.py has switched Triton to its interpreter

from engine.attention import AttentionBackend, AttentionMetadata, select_backend  # noqa: E402
from engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from engine.attention.triton_kernels import decode_num_splits, paged_decode  # noqa: E402
from engine.config import EngineConfig  # noqa: E402

ON_GPU = DEVICE.type != "cpu"


@dataclass(frozen=True)
class Case:
    """One step: decodes (context lengths, longest first as the model runner orders them), then prefill chunks
    (num_new, context_len); num_new == context_len is a prompt's first chunk, less is a later chunk."""
    decode_lens: tuple[int, ...] = ()
    prefills: tuple[tuple[int, int], ...] = ()
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 64
    block_size: int = 16
    sliding_window: int | None = None
    # Rows a captured CUDA graph pads the decode batch with: slot -1, context 0, seen by the triton backend only.
    padding_rows: int = 0
    # Extra zero columns in the decode block table (a graph captured for longer contexts).
    table_slack: int = 0
    index_dtype: torch.dtype = torch.long
    # Cache size; None: what the requests need plus a few spare blocks.
    num_blocks: int | None = None


@dataclass
class Step:
    """One backend's inputs for a step."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_cache: tuple[torch.Tensor, torch.Tensor]
    meta: AttentionMetadata


def make_steps(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[Step, Step, list[int]]:
    """(the step as the torch backend sees it, the same step with padding rows for the triton backend, the triton
    step's rows that are real tokens, in the torch step's order). Both share no tensors."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    bs = case.block_size
    requests = [(n, n - 1, 1) for n in case.decode_lens] + [(ctx, ctx - new, new) for new, ctx in case.prefills]
    needed = [-(-ctx // bs) for ctx, _, _ in requests]
    num_blocks = case.num_blocks or sum(needed) + 8
    # Blocks in random order and spare ones in the pool, so a wrong table lookup reads the wrong numbers.
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(n)] for n in needed]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    cache_shape = (num_blocks, bs, case.num_kv_heads, case.head_dim)
    # Random (not zero) cache: earlier chunks' keys are there, and masked-out slots hold numbers that would show.
    k_cache, v_cache = randn(*cache_shape), randn(*cache_shape)
    num_decodes = len(case.decode_lens)
    num_real = num_decodes + sum(new for new, _ in case.prefills)
    num_rows = num_real + case.padding_rows
    q, k, v = (randn(num_rows, heads, case.head_dim)
               for heads in (case.num_heads, case.num_kv_heads, case.num_kv_heads))
    real_rows = list(range(num_decodes)) + list(range(num_decodes + case.padding_rows, num_rows))

    def meta(padding_rows: int, slack: int, index_dtype: torch.dtype) -> AttentionMetadata:
        slots = []
        for (ctx, start, _), table in zip(requests, tables):
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, ctx))
        slots[num_decodes:num_decodes] = [-1] * padding_rows
        width = max(needed[:num_decodes], default=0) + (slack if num_decodes else 0)
        decode_tables = [t + [0] * (width - len(t)) for t in tables[:num_decodes]] + [[0] * width] * padding_rows
        decode_lens = list(case.decode_lens) + [0] * padding_rows
        prefills = []
        first = num_decodes + padding_rows
        for (ctx, _, new), table in zip(requests[num_decodes:], tables[num_decodes:]):
            prefills.append((first, new, ctx, torch.tensor(table, dtype=torch.long, device=device)))
            first += new
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            decode_block_tables=torch.tensor(decode_tables, dtype=index_dtype, device=device).view(len(decode_lens),
                                                                                                  width),
            decode_context_lens=torch.tensor(decode_lens, dtype=index_dtype, device=device),
            decode_context_lens_host=decode_lens,
            prefills=prefills)

    def on_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, copy=True)

    reference = Step(on_device(q[real_rows]), on_device(k[real_rows]), on_device(v[real_rows]),
                     (on_device(k_cache), on_device(v_cache)), meta(0, 0, torch.long))
    padded_meta = meta(case.padding_rows, case.table_slack, case.index_dtype)
    # The triton backend must plan a decode batch from tensors alone.
    padded_meta.decode_context_lens_host = _Untouchable()
    candidate = Step(on_device(q), on_device(k), on_device(v), (on_device(k_cache), on_device(v_cache)), padded_meta)
    return reference, candidate, real_rows


class _Untouchable:
    """Stands in for decode_context_lens_host: any read fails the test."""

    def _fail(self, *args: object) -> None:
        raise AssertionError("the triton backend read decode_context_lens_host")

    __len__ = __getitem__ = __iter__ = __bool__ = _fail


def forward(backend: AttentionBackend, step: Step, sliding_window: int | None) -> torch.Tensor:
    return backend.forward(step.q, step.k, step.v, step.kv_cache, step.meta, step.q.shape[-1] ** -0.5,
                           sliding_window)


TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3),
              torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def check_case(case: Case, dtype: torch.dtype = torch.float32, device: torch.device = DEVICE, seed: int = 0) -> float:
    """Triton in `dtype` against the torch backend in float32 on the same (rounded) numbers; caches exactly equal.
    Returns the largest absolute difference."""
    reference, candidate, real_rows = make_steps(case, dtype, device, seed)
    expected = reference_output(reference, case.sliding_window)
    out = forward(TritonAttentionBackend(), candidate, case.sliding_window)
    assert out.dtype == dtype and out.shape == candidate.q.shape
    torch.testing.assert_close(out[real_rows].float(), expected, **TOLERANCES[dtype])
    padding = out[len(case.decode_lens):len(case.decode_lens) + case.padding_rows]
    assert torch.equal(padding, torch.zeros_like(padding)), "padding rows must come out as zeros"
    for cache, expected_cache in zip(candidate.kv_cache, reference.kv_cache):
        assert torch.equal(cache.float(), expected_cache), "store_kv wrote different cache contents"
    return (out[real_rows].float() - expected).abs().max().item()


def reference_output(reference: Step, sliding_window: int | None) -> torch.Tensor:
    """The torch backend in float32 (it updates reference's caches in place, to float32 copies of them)."""
    reference.q, reference.k, reference.v = reference.q.float(), reference.k.float(), reference.v.float()
    reference.kv_cache = (reference.kv_cache[0].float(), reference.kv_cache[1].float())
    return forward(TorchAttentionBackend(), reference, sliding_window)


def sorted_lens(seed: int, count: int, low: int, high: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(sorted((rng.randint(low, high) for _ in range(count)), reverse=True))


CASES = {
    "decode-1-long-mha": Case(decode_lens=(300,), num_heads=4, num_kv_heads=4),
    "decode-5-block-edges-gqa4-d80-bs32": Case(decode_lens=(257, 33, 32, 31, 2), num_heads=8, num_kv_heads=2,
                                               head_dim=80, block_size=32),
    **{f"decode-{n}-gqa8": Case(decode_lens=sorted_lens(n, n, 2, 500), num_heads=8, num_kv_heads=1)
       for n in (2, 8, 17, 33)},
    "decode-3-gqa8-d128-bs32": Case(decode_lens=(480, 129, 64), num_heads=16, num_kv_heads=2, head_dim=128,
                                    block_size=32),
    "decode-gqa7-d64": Case(decode_lens=(90, 17), num_heads=14, num_kv_heads=2),
    "decode-d256": Case(decode_lens=(100, 40), num_heads=2, num_kv_heads=1, head_dim=256),
    "decode-7-window-d128-int32-slack": Case(decode_lens=sorted_lens(2, 7, 2, 200), num_heads=2, num_kv_heads=2,
                                             head_dim=128, sliding_window=40, index_dtype=torch.int32,
                                             table_slack=5),
    "decode-gqa2-d96-bs8": Case(decode_lens=(150, 65, 9, 8), num_heads=4, num_kv_heads=2, head_dim=96, block_size=8),
    "decode-padded-graph-batch": Case(decode_lens=(120, 47, 3), num_heads=8, num_kv_heads=2, block_size=32,
                                      padding_rows=4, table_slack=3, index_dtype=torch.int32),
    "prefill-first-chunks": Case(prefills=((70, 70), (1, 1), (17, 17)), num_heads=4, num_kv_heads=2),
    "prefill-later-chunk-gqa8": Case(prefills=((40, 150),), num_heads=8, num_kv_heads=1, block_size=32),
    "prefill-gqa7-d80": Case(prefills=((30, 30), (25, 61)), num_heads=14, num_kv_heads=2, head_dim=80),
    "prefill-long-chunk-window-mha": Case(prefills=((200, 260),), num_heads=2, num_kv_heads=2, sliding_window=64,
                                          block_size=8),
    "mixed-d80": Case(decode_lens=(200, 90, 16), prefills=((70, 70), (33, 150)), num_heads=8, num_kv_heads=2,
                      head_dim=80),
    "mixed-window-mha-d128": Case(decode_lens=(180, 30), prefills=((50, 180), (40, 40)), num_heads=2,
                                  num_kv_heads=2, head_dim=128, sliding_window=32),
    "mixed-window-gqa4-bs32": Case(decode_lens=(97,), prefills=((64, 64), (20, 120)), num_heads=4, num_kv_heads=1,
                                   block_size=32, sliding_window=50),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_torch_backend(name: str) -> None:
    check_case(CASES[name])


@pytest.mark.skipif(not ON_GPU, reason="half precision is checked on a GPU (the interpreter runs float32 here)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_half_precision_matches_float32_reference(name: str, dtype: torch.dtype) -> None:
    check_case(CASES[name], dtype)


ROTARY_CASES = ["decode-padded-graph-batch", "mixed-d80", "decode-gqa2-d96-bs8", "prefill-first-chunks"]


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if ON_GPU else []))
@pytest.mark.parametrize("name", ROTARY_CASES)
def test_rotary_fused_into_the_cache_write(name: str, dtype: torch.dtype) -> None:
    """Given cos and sin, the triton backend rotates q and k in the kernel that writes the cache: the same cache
    and output, bit for bit, as rotating first (fused_ops' Triton rotary) and passing no cos/sin; and close to the
    torch backend, which rotates with torch first."""
    from engine.fused_kernels import apply_rotary_triton

    case = CASES[name]
    reference, fused, real_rows = make_steps(case, dtype, DEVICE)
    _, separate, _ = make_steps(case, dtype, DEVICE)
    generator = torch.Generator().manual_seed(5)
    positions = torch.randint(0, 4096, (fused.q.shape[0],), generator=generator).float()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, case.head_dim, 2).float() / case.head_dim))
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    cos, sin = angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)

    backend = TritonAttentionBackend()
    out = backend.forward(fused.q, fused.k, fused.v, fused.kv_cache, fused.meta, case.head_dim ** -0.5,
                          case.sliding_window, (cos, sin))
    separate.q, separate.k = apply_rotary_triton(separate.q, separate.k, cos, sin)
    assert torch.equal(out, forward(backend, separate, case.sliding_window))
    for cache, separate_cache in zip(fused.kv_cache, separate.kv_cache):
        assert torch.equal(cache, separate_cache)

    reference.q, reference.k, reference.v = reference.q.float(), reference.k.float(), reference.v.float()
    reference.kv_cache = (reference.kv_cache[0].float(), reference.kv_cache[1].float())
    expected = TorchAttentionBackend().forward(reference.q, reference.k, reference.v, reference.kv_cache,
                                               reference.meta, case.head_dim ** -0.5, case.sliding_window,
                                               (cos[real_rows].float(), sin[real_rows].float()))
    torch.testing.assert_close(out[real_rows].float(), expected, **TOLERANCES[dtype])
    for cache, expected_cache in zip(fused.kv_cache, reference.kv_cache):
        torch.testing.assert_close(cache.float(), expected_cache, **TOLERANCES[dtype])


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_counts_agree(num_splits: int) -> None:
    """Any split count (the single-split kernel, uneven shares, more splits than tiles) gives the same answer."""
    case = Case(decode_lens=(250, 64, 5), num_heads=4, num_kv_heads=2, sliding_window=100)
    reference, candidate, _ = make_steps(case, torch.float32, DEVICE)
    expected = reference_output(reference, case.sliding_window)
    forward(TritonAttentionBackend(), candidate, case.sliding_window)  # fills the cache
    k_cache, v_cache = candidate.kv_cache
    out = paged_decode(candidate.q, k_cache, v_cache, candidate.meta.decode_block_tables,
                       candidate.meta.decode_context_lens, case.head_dim ** -0.5, case.sliding_window,
                       num_splits=num_splits)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


def test_split_count_comes_from_shapes_and_fills_the_gpu() -> None:
    # Batch 1 over a long context splits it; a batch that fills the GPU alone does not; short tables cap it.
    assert decode_num_splits(1, 8, 128, 16, 128) == 32
    assert decode_num_splits(256, 8, 128, 16, 128) == 1
    assert decode_num_splits(1, 8, 2, 16, 128) == 1
    assert decode_num_splits(1, 1, 10_000, 16, 128) == 64


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs")
def test_decode_step_replays_in_a_cuda_graph() -> None:
    """Capture a padded decode step once, then replay it with other contexts written into the same tensors."""
    case = Case(decode_lens=(300, 40, 7), num_heads=8, num_kv_heads=2, padding_rows=5, table_slack=16,
                num_blocks=64)
    backend = TritonAttentionBackend()
    _, captured, _ = make_steps(case, torch.bfloat16, DEVICE, seed=1)
    forward(backend, captured, None)  # compile before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward(backend, captured, None)
    for seed, lens in ((2, (310, 200, 199)), (3, (12, 2, 1))):
        replay = replace(case, decode_lens=lens, table_slack=0)
        reference, fresh, real_rows = make_steps(replay, torch.bfloat16, DEVICE, seed)
        fresh_meta = fresh.meta
        for target, source in ((captured.q, fresh.q), (captured.k, fresh.k), (captured.v, fresh.v),
                               (captured.kv_cache[0], fresh.kv_cache[0]), (captured.kv_cache[1], fresh.kv_cache[1]),
                               (captured.meta.slot_mapping, fresh_meta.slot_mapping),
                               (captured.meta.decode_context_lens, fresh_meta.decode_context_lens)):
            target.copy_(source)
        captured.meta.decode_block_tables.zero_()
        width = fresh_meta.decode_block_tables.shape[1]
        captured.meta.decode_block_tables[:, :width].copy_(fresh_meta.decode_block_tables)
        graph.replay()
        expected = reference_output(reference, None)
        torch.testing.assert_close(out[real_rows].float(), expected, **TOLERANCES[torch.bfloat16])


def test_select_backend_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(select_backend("torch", DEVICE), TorchAttentionBackend)
    assert isinstance(select_backend("triton", DEVICE), TritonAttentionBackend)
    assert isinstance(select_backend("auto", DEVICE), TritonAttentionBackend if ON_GPU else TorchAttentionBackend)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="cuda or xpu"):
        select_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend("flash", DEVICE)
    assert EngineConfig(model="m", attention_backend="triton").attention_backend == "triton"
    with pytest.raises(ValueError, match="auto, torch or triton"):
        EngineConfig(model="m", attention_backend="flash")


@pytest.mark.parametrize("arch", ["mistral-sliding"])  # GQA and a sliding window
def test_engine_with_triton_backend_matches_transformers(arch: str, tmp_path) -> None:
    """The whole engine on the Triton backend (the interpreter on the CPU): the staggered parity workload, with
    chunked prefill forced, token for token against transformers."""
    from engine.engine import LLMEngine
    from tests.checkpoints import greedy_reference, write_checkpoint
    from tests.test_parity import run_staggered, workload

    model = write_checkpoint(tmp_path, arch)
    requests = workload()[:12]
    references = [greedy_reference(model, prompt, max_tokens) for prompt, max_tokens, _ in requests]
    engine = LLMEngine(EngineConfig(model=str(tmp_path), skip_tokenizer_init=True, device=str(DEVICE),
                                    dtype="float32", attention_backend="triton", max_num_batched_tokens=24))
    results, _, _ = run_staggered(engine, requests)
    assert [results[str(i)] for i in range(len(requests))] == references
