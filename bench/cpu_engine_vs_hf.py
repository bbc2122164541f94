"""CPU throughput: our continuous-batching engine vs Hugging Face `generate` with static batches.

Both run the same random-weight Llama (float32) on the same mixed workload in this process, with the same
concurrency cap (HF batch size = our max_num_seqs). Prints output tokens/s of each and the ratio. A benchmark, not a
test: nothing is asserted.

    python bench/cpu_engine_vs_hf.py            # ~100M-parameter model, 64 requests (a few minutes on 2 cores)
    python bench/cpu_engine_vs_hf.py --quick    # tiny model, a few seconds (the smoke test runs this)
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from engine.llm import LLM
from engine.sampling_params import SamplingParams

PAD, BOS, EOS = 0, 1, 2
AGREEMENT_TOKENS = 8
QUICK = dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=512, requests=8, prompt_min=4, prompt_max=40,
             output_min=4, output_max=40, batch_size=4, repeats=1)


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def useful_tokens(self) -> int:
        return sum(self.max_tokens)


@dataclass(slots=True)
class Result:
    system: str
    outputs: list[list[int]]
    seconds: float
    # Share of the machine's CPUs that other processes kept busy meanwhile (None where /proc/stat is missing).
    others_load: float | None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-min", type=int, default=16)
    parser.add_argument("--prompt-max", type=int, default=160)
    parser.add_argument("--output-min", type=int, default=16)
    parser.add_argument("--output-max", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=64, help="HF static batch size = our max_num_seqs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each system, interleaved; median shown")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model and workload (smoke test)")
    # --quick only changes the defaults, so explicit flags still win: `--quick --requests 16` works.
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


def make_model(args: argparse.Namespace, directory: str) -> LlamaForCausalLM:
    """A seeded random Llama saved as a HF checkpoint in `directory`; returns the in-memory HF model."""
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=1024,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(directory)
    model.generation_config.eos_token_id = None  # run every batch to its limit
    return model


def make_workload(args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)
    prompts, max_tokens = [], []
    for _ in range(args.requests):
        length = rng.randint(args.prompt_min, args.prompt_max)
        prompts.append([rng.randrange(EOS + 1, args.vocab) for _ in range(length)])  # no special ids
        max_tokens.append(rng.randint(args.output_min, args.output_max))
    return Workload(prompts, max_tokens)


def run_hf(model: LlamaForCausalLM, work: Workload, batch_size: int) -> list[list[int]]:
    """Static batching: arrival order cut into batches, left-padded, each run to the longest request's limit."""
    outputs: list[list[int]] = []
    for start in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[start:start + batch_size]
        limits = work.max_tokens[start:start + batch_size]
        width = max(map(len, prompts))
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        new = max(limits)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=PAD)
        outputs += [row[width:width + limit].tolist() for row, limit in zip(out, limits)]
    return outputs


def run_ours(llm: LLM, work: Workload) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in work.max_tokens]
    return [list(o.outputs[0].token_ids) for o in llm.generate(work.prompts, params)]


def machine_busy_seconds() -> float | None:
    """CPU-seconds the whole machine has been busy (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal (guest time is inside user)
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def timed(system: str, fn, *fn_args) -> Result:
    # Two threads on two cores stall whenever another process takes a core, so other load is measured and shown.
    busy, own = machine_busy_seconds(), own_cpu_seconds()
    start = time.perf_counter()
    outputs = fn(*fn_args)
    seconds = time.perf_counter() - start
    busy_after = machine_busy_seconds()
    others = None
    if busy is not None and busy_after is not None:
        others = max(0.0, busy_after - busy - (own_cpu_seconds() - own)) / (seconds * (os.cpu_count() or 1))
    return Result(system, outputs, seconds, others)


def median_run(runs: list[Result]) -> Result:
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x[:AGREEMENT_TOKENS] == y[:AGREEMENT_TOKENS] for x, y in zip(a, b))
    return same / len(a)


def print_table(work: Workload, results: list[Result], baseline: Result) -> None:
    header = ("system", "requests", "useful output tokens", "seconds", "out tok/s", "ratio vs HF static")
    base_rate = work.useful_tokens / baseline.seconds
    rows = []
    for r in results:
        rate = work.useful_tokens / r.seconds
        rows.append((r.system, str(len(r.outputs)), str(work.useful_tokens), f"{r.seconds:.2f}", f"{rate:.1f}",
                     f"{rate / base_rate:.2f}x"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    for row in [header, None, *rows]:
        print("-+-".join("-" * w for w in widths) if row is None
              else " | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    transformers.logging.set_verbosity_error()  # generate() warns about the deliberate EOS/min_new_tokens setup
    transformers.logging.disable_progress_bar()
    work = make_workload(args)
    with tempfile.TemporaryDirectory(prefix="inferq-bench-") as model_dir:
        hf_model = make_model(args, model_dir)
        # Concurrency cap equal to HF's batch size; the token budget fits a whole batch of prompts in one step.
        llm = LLM(model_dir, skip_tokenizer_init=True, max_num_seqs=args.batch_size,
                  max_num_batched_tokens=max(2048, args.batch_size * args.prompt_max), device="cpu",
                  dtype="float32")

    params = sum(p.numel() for p in hf_model.parameters())
    print(f"model: random Llama, {params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads, intermediate {args.intermediate}, vocab {args.vocab}), float32 | "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads")
    print(f"workload: {args.requests} requests, prompt {args.prompt_min}-{args.prompt_max} tokens "
          f"({sum(map(len, work.prompts))} total), output {args.output_min}-{args.output_max} tokens "
          f"({work.useful_tokens} useful), greedy, EOS off, concurrency {args.batch_size}, seed {args.seed}")

    # Warm-up: first calls pay for allocator growth and kernel selection.
    tiny = Workload([[5, 6, 7], [8, 9, 10, 11, 12]], [2, 3])
    for _ in range(2):
        run_hf(hf_model, tiny, args.batch_size)
        run_ours(llm, tiny)

    # Interleaved repeats, median reported: the machine's speed drifts, and this spreads the drift over both.
    hf_runs, our_runs = [], []
    for _ in range(args.repeats):
        hf_runs.append(timed("HF generate, static batches", run_hf, hf_model, work, args.batch_size))
        our_runs.append(timed("inferq continuous batching", run_ours, llm, work))
    hf, ours = median_run(hf_runs), median_run(our_runs)
    for r in (hf, ours):  # sanity, not a threshold: every request got exactly what it asked for
        got = [len(o) for o in r.outputs]
        if got != work.max_tokens:
            print(f"error: {r.system} returned the wrong number of tokens", file=sys.stderr)
            return 1

    print()
    print_table(work, [hf, ours], hf)
    print()
    for runs in (hf_runs, our_runs):
        print(f"{runs[0].system}: runs of {', '.join(f'{r.seconds:.1f}' for r in runs)} s")
    print(f"greedy agreement (first {AGREEMENT_TOKENS} tokens equal): {agreement(ours.outputs, hf.outputs):.0%} "
          f"of requests (HF left-padding changes numerics slightly)")
    if hf.others_load is not None and ours.others_load is not None:
        print(f"CPU load of other processes during the runs: HF {hf.others_load:.0%}, inferq {ours.others_load:.0%} "
              "of all cores (anything but ~0% skews the timings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
