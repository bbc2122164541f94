"""Low-bit weight formats on a GPU: memory, decode speed and accuracy of each --load-in-low-bit format against
bf16, on one random-weight checkpoint (Llama-2-7B shape by default). Prints one table.

For each format: the weights' bytes on the device and the peak memory while loading (the checkpoint is read
layer by layer and quantized as it comes; sym_int4 and asym_int4 load with the process capped at 16 GiB, as on a
16 GB card), decode steps at batch 1, 64 and 256 (mean of 30; context ~512 tokens; decode graphs on), and accuracy
against bf16: relative error of the next-token logits after each of 32 fixed prompts (‖l - l_bf16‖ / ‖l_bf16‖)
and greedy agreement (tokens equal to bf16's before the first divergence, of 32 per prompt). A random network
amplifies any perturbation layer after layer (fp16 against bf16 shows how much), so the table also gives the
format's own error: layer 0's projections on random inputs against the bf16 weights.

    python bench/low_bit.py [shape] [formats]     # shape: llama2-7b | tinyllama-1.1b | tiny (smoke test)
    python bench/low_bit.py llama2-7b bf16,sym_int4
"""
from __future__ import annotations

import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from peers_gpu import SHAPES, decode_micro  # noqa: E402
from tests.checkpoints import common_prefix  # noqa: E402

FORMATS = ("bf16", "fp16", "sym_int4", "asym_int4", "sym_int8", "fp8")
CARD_16GB = 16 * 2**30
NUM_PROMPTS, GREEDY_TOKENS, BATCHES, CONTEXT = 32, 32, (1, 64, 256), 512


def write_checkpoint(directory: str, shape: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=4096))
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def load_footprint(directory: str, fmt: str) -> dict:
    """Load the weights alone (no KV cache): their bytes and the peak allocated while loading; int4 under a 16 GiB
    cap on the process's GPU memory."""
    from engine.device import resolve_dtype
    from engine.loader import load_config, load_model
    from engine.low_bit import compute_dtype, weight_bytes

    device = torch.device("cuda", 0)
    dtype = compute_dtype(fmt, device, resolve_dtype("auto", "bfloat16", device), False)
    capped = fmt.endswith("int4")
    total = torch.cuda.get_device_properties(device).total_memory
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    if capped:
        torch.cuda.set_per_process_memory_fraction(CARD_16GB / total)
    try:
        start = time.perf_counter()
        model = load_model(directory, load_config(directory), device, dtype, fmt)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    result = {"weights_GiB": weight_bytes(model) / 2**30,
              "load_peak_GiB": (torch.cuda.max_memory_allocated() - before) / 2**30,
              "load_s": seconds, "under_16GiB_cap": capped,
              "projection_rel_err": projection_error(directory, model.model.layers[0])}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


@torch.inference_mode()
def projection_error(directory: str, layer) -> float:
    """The format's own error, free of how a random network amplifies it: layer 0's four projections on random
    inputs of 1 and 64 rows against the checkpoint's bf16 weights, mean of ‖y - y_bf16‖ / ‖y_bf16‖."""
    from safetensors import safe_open

    from engine.loader import safetensors_files

    projections = [(layer.self_attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                   (layer.self_attn.o_proj, ("self_attn.o_proj",)),
                   (layer.mlp.gate_up_proj, ("mlp.gate_proj", "mlp.up_proj")),
                   (layer.mlp.down_proj, ("mlp.down_proj",))]
    wanted = {f"model.layers.0.{name}.weight" for _, names in projections for name in names}
    weights = {}
    for file in safetensors_files(Path(directory)):
        with safe_open(file, framework="pt", device="cuda") as f:
            weights |= {key: f.get_tensor(key) for key in f.keys() if key in wanted}
    generator = torch.Generator("cuda").manual_seed(0)
    dtype = layer.input_layernorm.weight.dtype
    errors = []
    for module, names in projections:
        weight = torch.cat([weights[f"model.layers.0.{name}.weight"] for name in names])
        for rows in (1, 64):
            x = torch.randn(rows, weight.shape[1], device="cuda", generator=generator)
            y = module(x.to(dtype)).float()
            reference = x.to(torch.bfloat16).float() @ weight.float().t()
            errors.append(((y - reference).norm() / reference.norm()).item())
    return statistics.mean(errors)


def prompts(vocab: int) -> list[list[int]]:
    r = random.Random(0)
    return [[r.randrange(3, vocab) for _ in range(r.randrange(32, 129))] for _ in range(NUM_PROMPTS)]


def measure(directory: str, fmt: str, shape: str) -> tuple[dict, list[torch.Tensor], list[list[int]]]:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(directory, skip_tokenizer_init=True, device="cuda",
              load_in_low_bit=fmt, max_num_seqs=max(BATCHES),
              max_num_batched_tokens=8192, num_kv_blocks=max(BATCHES) * (CONTEXT + 64) // 16 + 64)
    engine = llm.engine
    asked = prompts(SHAPES[shape]["vocab_size"])
    logits = [engine.prompt_logits(p).cpu() for p in asked]
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    greedy = [out.outputs[0].token_ids for out in llm.generate(asked, params)]
    micro = decode_micro(engine, list(BATCHES), CONTEXT)
    row = {f"b{m['batch']}_ms": m["mean_step_ms"] for m in micro}
    row |= {f"b{m['batch']}_tok_s": m["tok_s"] for m in micro}
    del llm, engine
    gc.unfreeze()  # the engine froze the heap at start (engine/engine.py): let the collector reach it again
    gc.collect()
    torch.cuda.empty_cache()
    return row, logits, greedy


def main() -> None:
    shape = sys.argv[1] if len(sys.argv) > 1 else "llama2-7b"
    formats = sys.argv[2].split(",") if len(sys.argv) > 2 else list(FORMATS)
    if "bf16" in formats:
        formats.remove("bf16")
    formats.insert(0, "bf16")  # the reference: first, always
    name = torch.cuda.get_device_name()
    try:
        from torchao import __version__ as torchao_version  # fp8 only
    except ImportError:
        torchao_version = "absent"
    print(f"device {name}, torch {torch.__version__}, torchao {torchao_version}, shape {shape}", flush=True)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        write_checkpoint(directory, shape)
        print(f"checkpoint written in {time.perf_counter() - start:.0f}s", flush=True)
        reference = None
        for fmt in formats:
            try:
                row = load_footprint(directory, fmt)
                speed, logits, greedy = measure(directory, fmt, shape)
                row |= speed
                if reference is None:
                    reference = (logits, greedy)
                ref_logits, ref_greedy = reference
                errors = [((a - b).norm() / b.norm()).item() for a, b in zip(logits, ref_logits)]
                row["logits_rel_err_mean"] = statistics.mean(errors)
                row["logits_rel_err_max"] = max(errors)
                row["greedy_agreement"] = sum(common_prefix(a, b) for a, b in zip(greedy, ref_greedy)) / (
                    GREEDY_TOKENS * len(ref_greedy))
                row["same_first_token"] = sum(a[0] == b[0] for a, b in zip(greedy, ref_greedy)) / len(ref_greedy)
            except Exception as exc:  # report and go on to the next format
                import traceback
                traceback.print_exc()
                row = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
            rows[fmt] = row
            print(fmt, json.dumps(row), flush=True)
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], f"low_bit_{shape}.json").write_text(
                    json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    base = rows["bf16"]
    print(f"\n== --load-in-low-bit on {name}, {shape} (random weights), torch {torch.__version__}, "
          f"torchao {torchao_version} ==")
    print("| format | weights GiB | load peak GiB | load s | b1 ms/step | b1 × bf16 | b64 ms/step | b64 tok/s | "
          "b64 × bf16 | b256 tok/s | b256 × bf16 | projection rel. err. | logits rel. err. mean / max | greedy agreement | "
          "same 1st token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for fmt, r in rows.items():
        if "failed" in r:
            print(f"| {fmt} | failed: {r['failed']} |")
            continue
        cap = " (16 GiB cap)" if r["under_16GiB_cap"] else ""
        print(f"| {fmt} | {r['weights_GiB']:.2f} | {r['load_peak_GiB']:.2f}{cap} | {r['load_s']:.1f} | "
              f"{r['b1_ms']:.2f} | {base['b1_ms'] / r['b1_ms']:.2f} | {r['b64_ms']:.2f} | {r['b64_tok_s']:.0f} | "
              f"{r['b64_tok_s'] / base['b64_tok_s']:.2f} | {r.get('b256_tok_s', 0):.0f} | "
              f"{r.get('b256_tok_s', 0) / base.get('b256_tok_s', 1):.2f} | {r['projection_rel_err']:.4f} | "
              f"{r['logits_rel_err_mean']:.4f} / "
              f"{r['logits_rel_err_max']:.4f} | {r['greedy_agreement']:.3f} | {r['same_first_token']:.2f} |")



if __name__ == "__main__":
    main()
