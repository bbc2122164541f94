"""Greedy parity with transformers on an accelerator: the staggered workload of tests/test_parity.py for every
architecture and engine setting, our engine on the GPU against transformers' greedy decoding on the CPU (float32),
then bfloat16 greedy agreement against the float32 reference, and how close bfloat16's next-token log-probs are
to float32's (our engine in both dtypes, the same prompts). Prints two tables.

    python bench/gpu_parity.py [--device cuda] [--attention-backend auto|torch|triton] [--enforce-eager]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.device import resolve_device  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.sampling_params import MAX_LOGPROBS, SamplingParams  # noqa: E402
from tests.checkpoints import ARCHITECTURES, common_prefix, greedy_reference, write_checkpoint  # noqa: E402
from tests.test_parity import ENGINE_SETTINGS, NUM_REQUESTS, run_staggered, workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"device: {name}, torch {torch.__version__}, attention {args.attention_backend}, "
          f"{'eager' if args.enforce_eager else 'decode graphs where supported'}")
    rows, closeness = [], []
    requests = workload()
    for arch in ARCHITECTURES:
        with tempfile.TemporaryDirectory() as directory:
            model = write_checkpoint(Path(directory), arch)
            references = [greedy_reference(model, prompt, max_tokens) for prompt, max_tokens, _ in requests]
            for setting, options in [*ENGINE_SETTINGS.items(), ("bfloat16", {"dtype": "bfloat16"})]:
                options = {"num_kv_blocks": 512, "dtype": "float32", "attention_backend": args.attention_backend,
                           "enforce_eager": args.enforce_eager, **options}
                start = time.perf_counter()
                engine = LLMEngine(EngineConfig(model=directory, device=str(device), skip_tokenizer_init=True,
                                                **options))
                results, _, preemptions = run_staggered(engine, requests)
                exact = sum(results[str(i)] == references[i] for i in range(NUM_REQUESTS))
                tokens = sum(len(r) for r in references)
                agree = sum(common_prefix(results[str(i)], references[i]) for i in range(NUM_REQUESTS))
                stats = engine.stats()
                rows.append((arch, setting, f"{exact}/{NUM_REQUESTS}", f"{agree / tokens:.3f}", preemptions,
                             stats["num_free_kv_blocks"] == stats["num_kv_blocks"], f"{time.perf_counter() - start:.1f}"))
                del engine
            closeness.append((arch, *_logprob_error(directory, device, args, [p for p, _, _ in requests])))
    header = ("architecture", "setting", "exact requests", "greedy agreement", "preemptions", "blocks freed", "s")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    print()
    header = ("architecture", "max |logprob bf16 - fp32|", "mean |logprob bf16 - fp32|", "same top-1")
    widths = [max(len(str(r[i])) for r in [header, *closeness]) for i in range(len(header))]
    for row in [header, *closeness]:
        print(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    float32_rows = [r for r in rows if r[1] != "bfloat16"]
    failed = [r for r in float32_rows if r[2] != f"{NUM_REQUESTS}/{NUM_REQUESTS}" or not r[5]]
    print("float32 parity:", "PASS" if not failed else f"FAIL {failed}")


def _logprob_error(directory: str, device, args, prompts: list[list[int]]) -> tuple[str, str, str]:
    """Next-token log-probs after each prompt, bfloat16 against float32: over the float32 top tokens that both
    report, the largest and the mean absolute difference, and how often the most likely token is the same."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=MAX_LOGPROBS)
    tops = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(directory, device=str(device), dtype=dtype, skip_tokenizer_init=True, num_kv_blocks=512,
                  attention_backend=args.attention_backend, enforce_eager=args.enforce_eager)
        tops[dtype] = [out.outputs[0].logprobs[0] for out in llm.generate(prompts, params)]
        del llm
    errors, same_top = [], 0
    for ref, low in zip(tops["float32"], tops["bfloat16"]):
        errors += [abs(ref[t] - low[t]) for t in ref if t in low]
        same_top += max(ref, key=ref.get) == max(low, key=low.get)
    return f"{max(errors):.4f}", f"{sum(errors) / len(errors):.4f}", f"{same_top}/{len(prompts)}"



if __name__ == "__main__":
    main()
