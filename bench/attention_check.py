"""The Triton attention backend on a GPU: correctness against the torch backend at sizes the CPU interpreter cannot
run, in float32, float16 and bfloat16, then decode timings against the torch backend. Prints two tables.

    python bench/attention_check.py [--device cuda] [--skip-check] [--skip-timing]

Timed shape: Llama-3-8B attention (32 query heads, 8 kv heads, head_dim 128), bfloat16, block size 16, every
sequence at the same context length. Columns: the torch backend's forward, the triton backend's forward (store_kv
plus paged_decode), paged_decode alone, the latter replayed from a CUDA graph (CUDA only), and the cache bandwidth
paged_decode reaches (bytes of keys and values read / time).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from engine.attention import AttentionMetadata  # noqa: E402
from engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from engine.attention.triton_kernels import decode_num_splits, paged_decode  # noqa: E402
from engine.device import resolve_device, use_device  # noqa: E402
from tests.test_triton_attention import (CASES, Case, check_case, sorted_lens,  # noqa: E402
                                         test_decode_step_replays_in_a_cuda_graph)

LARGE_CASES = {
    "decode-64-long-gqa4": Case(decode_lens=sorted_lens(10, 64, 2, 4096), num_heads=32, num_kv_heads=8, head_dim=128),
    "decode-256-gqa4": Case(decode_lens=sorted_lens(11, 256, 2, 2048), num_heads=32, num_kv_heads=8, head_dim=128),
    "decode-1-8k-window": Case(decode_lens=(8191,), num_heads=32, num_kv_heads=8, head_dim=128, sliding_window=4096),
    "decode-mha-d80-bs64": Case(decode_lens=sorted_lens(12, 16, 2, 3000), num_heads=32, num_kv_heads=32, head_dim=80,
                                block_size=64),
    "decode-gqa8-d256-bs128": Case(decode_lens=sorted_lens(13, 9, 2, 3000), num_heads=16, num_kv_heads=2, head_dim=256,
                                   block_size=128),
    "decode-padded-slack": Case(decode_lens=sorted_lens(14, 20, 2, 1000), num_heads=32, num_kv_heads=8, head_dim=128,
                                padding_rows=12, table_slack=200, index_dtype=torch.int32),
    "prefill-2k-first-and-later": Case(decode_lens=sorted_lens(15, 30, 2, 2000), prefills=((2048, 2048), (512, 3000)),
                                       num_heads=32, num_kv_heads=8, head_dim=128),
    "prefill-mha-d96-window": Case(decode_lens=(900, 5), prefills=((700, 1500), (300, 300)), num_heads=16,
                                   num_kv_heads=16, head_dim=96, sliding_window=512, block_size=32),
    "prefill-gqa7-d64": Case(prefills=((1000, 1000), (257, 1400)), num_heads=14, num_kv_heads=2, head_dim=64),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TIMED_BATCHES = (1, 8, 64, 256)
TIMED_CONTEXTS = (512, 2048)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def check(device: torch.device) -> bool:
    rows = []
    for name, case in [*CASES.items(), *LARGE_CASES.items()]:
        for dtype in DTYPES:
            try:
                error = f"{check_case(case, dtype, device):.2e}"
                verdict = "ok"
            except AssertionError as exc:
                error, verdict = "-", f"FAIL {str(exc).splitlines()[0][:80]}"
            rows.append((name, str(dtype).removeprefix("torch."), error, verdict))
    if device.type == "cuda":
        rows.append(("cuda-graph-replay", "bfloat16", "-", _graph_replay_verdict()))
    _print_table(("case", "dtype", "max abs error", "result"), rows)
    return all(row[-1] == "ok" for row in rows)


def _graph_replay_verdict() -> str:
    try:
        test_decode_step_replays_in_a_cuda_graph()
    except AssertionError as exc:
        return f"FAIL {str(exc).splitlines()[0][:80]}"
    return "ok"


def decode_step(batch: int, context: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], AttentionMetadata]:
    """Random bfloat16 decode step: (q, k, v, kv_cache, metadata), each sequence at `context` tokens."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    kv_cache = (torch.randn(shape, dtype=torch.bfloat16, device=device),
                torch.randn(shape, dtype=torch.bfloat16, device=device))
    tables = torch.randperm(num_blocks - 1, device=device)[:batch * blocks_per_seq].view(batch, blocks_per_seq) + 1
    lens = torch.full((batch,), context, dtype=torch.long, device=device)
    slots = tables[:, -1] * BLOCK_SIZE + (context - 1) % BLOCK_SIZE
    meta = AttentionMetadata(slot_mapping=slots, decode_block_tables=tables, decode_context_lens=lens,
                             decode_context_lens_host=[context] * batch, prefills=[])
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
    k, v = (torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device) for _ in range(2))
    return q, k, v, kv_cache, meta


def time_decode(device: torch.device) -> None:
    rows = [_timing_row(batch, context, device) for context in TIMED_CONTEXTS for batch in TIMED_BATCHES]
    _print_table(("batch", "context", "splits", "torch us", "triton us", "paged_decode us", "graph replay us",
                  "speedup", "decode GB/s"), rows)


def _timing_row(batch: int, context: int, device: torch.device) -> tuple:
    scale = HEAD_DIM ** -0.5
    torch_backend, triton_backend = TorchAttentionBackend(), TritonAttentionBackend()
    q, k, v, kv_cache, meta = decode_step(batch, context, device)
    k_cache, v_cache = kv_cache
    torch_ms = triton.testing.do_bench(lambda: torch_backend.forward(q, k, v, kv_cache, meta, scale, None))
    backend_ms = triton.testing.do_bench(lambda: triton_backend.forward(q, k, v, kv_cache, meta, scale, None))

    def decode() -> torch.Tensor:
        return paged_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale, None)

    decode_ms = triton.testing.do_bench(decode)
    graph_ms = _graph_ms(decode) if device.type == "cuda" else float("nan")
    kernel_ms = graph_ms if device.type == "cuda" else decode_ms
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    splits = decode_num_splits(batch, NUM_KV_HEADS, meta.decode_block_tables.shape[1], BLOCK_SIZE, HEAD_DIM)
    return (batch, context, splits, f"{torch_ms * 1e3:.1f}", f"{backend_ms * 1e3:.1f}", f"{decode_ms * 1e3:.1f}",
            f"{graph_ms * 1e3:.1f}", f"{torch_ms / backend_ms:.1f}x", f"{kv_bytes / (kernel_ms * 1e6):.0f}")


def _graph_ms(fn: Callable[[], object]) -> float:
    """fn replayed from a CUDA graph: the kernels' time without Python and launch overhead."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay)


def _print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(" | ".join(str(value).ljust(width) for value, width in zip(row, widths)))
    print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        sys.exit("this check needs a GPU; on the CPU run tests/test_triton_attention.py (Triton's interpreter)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}\n")
    use_device(device)
    passed = True
    if not args.skip_check:
        passed = check(device)
    if not args.skip_timing:
        time_decode(device)
    if not passed:
        sys.exit("some checks failed")


if __name__ == "__main__":
    main()
