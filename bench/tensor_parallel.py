"""--tensor-parallel-size on a multi-GPU CUDA host: random-weight checkpoints, bf16, one table.

1. A Llama-2-7B shape (32 layers, hidden 4096, 32 heads, intermediate 11008): the decode step at batch 1 (512 tokens
   of context, CUDA graphs), TP=1 against TP=2. Target: the TP=2 step at most 0.62x the TP=1 step (half the weight
   bytes per GPU, plus two all-reduces per layer and the step's broadcast).
2. A Llama-3-70B shape (80 layers, hidden 8192, GQA 64/8, intermediate 28672) at TP=4: the W256 workload of
   bench/peers_gpu.py (256 requests, prompts of 64-512 tokens, 16-512 new tokens), out tok/s against its floor
   over 4 GPUs: prefill FLOPs at 4x one GPU's bf16 matmul rate, decode bytes at 4x its copy bandwidth (measured).

Each engine runs in this process, one after the other (one tensor-parallel group per process); the checkpoints are
written once, layer by layer, to --workdir (reused when already there: the 70B one takes ~140 GB and minutes).

    python bench/tensor_parallel.py                       # both parts (4 GPUs; the 70B part is left out on fewer)
    python bench/tensor_parallel.py --only 7b --workdir /scratch/tp
    python bench/tensor_parallel.py --smoke               # a tiny shape on the CPU over gloo: the script itself
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    # --smoke: the script on the CPU, not a benchmark.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000),
}
TARGET_7B = 0.62
CONTEXT, STEPS, WARM = 512, 50, 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (gloo), TP=1 vs TP=2")
    parser.add_argument("--only", choices=("7b", "70b"), help="one part only")
    parser.add_argument("--workdir", help="where the random checkpoints are written (default: a temporary one)")
    parser.add_argument("--requests", type=int, default=256, help="requests of the 70B workload (W256)")
    return parser.parse_args()


def write_checkpoint(directory: Path, shape: dict, dtype, device: str) -> Path:
    """A random Llama checkpoint in HF's format, one safetensors shard per layer (never the whole model in memory),
    generated on `device` (fast on a GPU). Reused when `directory` already holds one of this shape."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    written = directory / "model.safetensors.index.json"  # written last
    if written.is_file() and json.loads((directory / "config.json").read_text())["hidden_size"] == shape["hidden_size"]:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    config.save_pretrained(directory)
    generator = torch.Generator(device).manual_seed(0)
    h, inter, heads, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], \
        shape["num_key_value_heads"]
    head_dim = h // heads

    def rand(*size) -> torch.Tensor:  # std 0.02, as transformers' init
        return (torch.randn(*size, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()

    weight_map = {}

    def save(tensors: dict, name: str) -> None:
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    save({"model.embed_tokens.weight": rand(shape["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=dtype),
          "lm_head.weight": rand(shape["vocab_size"], h)}, "model-outer.safetensors")
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        save({p + "self_attn.q_proj.weight": rand(heads * head_dim, h),
              p + "self_attn.k_proj.weight": rand(kv * head_dim, h),
              p + "self_attn.v_proj.weight": rand(kv * head_dim, h),
              p + "self_attn.o_proj.weight": rand(h, heads * head_dim),
              p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
              p + "mlp.down_proj.weight": rand(h, inter),
              p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
              p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype)}, f"model-layer-{i:03d}.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def num_params(shape: dict) -> int:
    h, inter, heads, kv = (shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                              "num_key_value_heads"))
    head_dim = h // heads
    layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter
    return shape["num_hidden_layers"] * layer + 2 * shape["vocab_size"] * h


def build(model: Path, tp: int, device: str, smoke: bool, **options):
    from engine.llm import LLM

    started = time.perf_counter()
    llm = LLM(str(model), tensor_parallel_size=tp, device=device, skip_tokenizer_init=True,
              dtype="float32" if smoke else "bfloat16", **options)
    print(f"TP={tp}: engine built in {time.perf_counter() - started:.1f} s, "
          f"{llm.engine.stats()['num_kv_blocks']} KV blocks", flush=True)
    return llm


def release(llm) -> None:
    import torch

    llm.engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_step_ms(llm) -> float:
    """Mean wall time of a decode step at batch 1 (CONTEXT tokens of context), steps back to back."""
    from peers_gpu import _drain, _fill_decoding, step_time_ms

    engine = llm.engine
    ids = _fill_decoding(engine, 1, CONTEXT, "tp")
    for _ in range(WARM):
        engine.step()
    ms = step_time_ms(engine, STEPS)
    _drain(engine, ids)
    return ms


def part_7b(workdir: Path, smoke: bool, device: str) -> list[str]:
    import torch

    shape = SHAPES["tiny" if smoke else "7b"]
    model = write_checkpoint(workdir / ("tiny" if smoke else "llama2-7b"), shape,
                             torch.float32 if smoke else torch.bfloat16, "cpu" if smoke else "cuda")
    options = dict(max_num_seqs=8, max_model_len=2048) | (
        dict(cpu_kv_cache_bytes=64 << 20) if smoke else dict(gpu_memory_utilization=0.5))
    steps = {}
    for tp in (1, 2):
        if not smoke and torch.cuda.device_count() < tp:
            print(f"TP={tp}: left out, {torch.cuda.device_count()} GPU(s) here", flush=True)
            continue
        llm = build(model, tp, device, smoke, **options)
        steps[tp] = decode_step_ms(llm)
        print(f"TP={tp}: decode step at batch 1: {steps[tp]:.3f} ms", flush=True)
        release(llm)
    name = "tiny" if smoke else "Llama-2-7B shape"
    rows = ["| model | TP | decode step, batch 1 (ms) | vs TP=1 | target |", "|---|---|---|---|---|"]
    for tp, ms in steps.items():
        ratio = f"{ms / steps[1]:.3f}" if 1 in steps else "-"
        target = f"<= {TARGET_7B}" if tp == 2 else ""
        verdict = " (met)" if tp == 2 and 1 in steps and ms / steps[1] <= TARGET_7B else \
            " (missed)" if tp == 2 and 1 in steps else ""
        rows.append(f"| {name} | {tp} | {ms:.3f} | {ratio} | {target}{verdict} |")
    return rows


def part_70b(workdir: Path, smoke: bool, device: str, requests: int) -> list[str]:
    import torch
    from peers_gpu import ceilings, floor_seconds, run_inferq, workload
    from transformers import LlamaConfig

    tp = 2 if smoke else 4
    if not smoke and torch.cuda.device_count() < tp:
        return [f"70B shape at TP={tp}: left out, {torch.cuda.device_count()} GPU(s) here"]
    shape = SHAPES["tiny" if smoke else "70b"]
    bandwidth, flops = ceilings()  # one GPU's (nominal numbers on the CPU)
    model = write_checkpoint(workdir / ("tiny" if smoke else "llama3-70b"), shape,
                             torch.float32 if smoke else torch.bfloat16, "cpu" if smoke else "cuda")
    if smoke:
        reqs = workload(requests, pmin=8, pmax=48, omin=4, omax=24)
        options = dict(max_num_seqs=16, max_num_batched_tokens=256, cpu_kv_cache_bytes=64 << 20)
    else:
        reqs = workload(requests)
        options = dict(max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.85)
    llm = build(model, tp, device, smoke, **options)
    useful, seconds = run_inferq(llm, reqs, {})
    release(llm)
    floor = floor_seconds(reqs, LlamaConfig(**shape), num_params(shape), tp * bandwidth, tp * flops,
                          dtype_bytes=4 if smoke else 2)
    name = "tiny" if smoke else "Llama-3-70B shape"
    return [f"| model | TP | requests | out tok/s | floor over {tp} GPUs (tok/s) | fraction of floor |",
            "|---|---|---|---|---|---|",
            f"| {name}, W{requests} | {tp} | {len(reqs)} | {useful / seconds:.0f} | {useful / floor:.0f} | "
            f"{floor / seconds:.2f} |"]


def main() -> None:
    args = parse_args()
    if args.smoke:
        os.environ["BENCH_DEVICE"] = "cpu"  # bench/peers_gpu.py's helpers: no CUDA syncs, nominal ceilings
    from engine.tensor_parallel import disable_multicast

    disable_multicast()  # before anything touches NCCL (engine/tensor_parallel.py says why)
    import torch

    device = "cpu" if args.smoke else "cuda:0"
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        tables = []
        if args.only in (None, "7b"):
            tables.append(part_7b(workdir, args.smoke, device))
        if args.only in (None, "70b"):
            tables.append(part_70b(workdir, args.smoke, device, 16 if args.smoke else args.requests))
    gpus = "CPU (gloo)" if args.smoke else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    print(f"\n== --tensor-parallel-size, random weights, {gpus}, torch {torch.__version__} ==")
    for table in tables:
        print("\n" + "\n".join(table))


if __name__ == "__main__":
    main()
