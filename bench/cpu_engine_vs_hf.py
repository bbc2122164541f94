"""CPU throughput: our continuous-batching engine vs Hugging Face `generate` with static batches at its best size.

Both run the same random-weight Llama (float32) on the same workloads in this process. HF runs each workload in
static batches of every size in --hf-batch-sizes (8, 16, 32, 64) and is credited with its fastest; inferq runs with
max_num_seqs = the workload's request count (continuous batching needs no batch size chosen). Prints, per workload,
output tokens/s of each and the ratio to HF's best. A benchmark, not a test: nothing is asserted.

Workloads (--workloads; each 64 requests by default):
  mixed         prompts 16-256, outputs 16-160 (the issue's held-out workload)
  long-prompts  prompts 256-512, outputs 16-64 (prefill-heavy: summarisation, classification)
  long-outputs  prompts 16-64, outputs 128-256 (decode-heavy: generation)

    python bench/cpu_engine_vs_hf.py            # 134M-parameter model (vocab 32,000), every workload (~30 min on 2 cores)
    python bench/cpu_engine_vs_hf.py --workloads mixed
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
# (prompt min, prompt max, output min, output max) per workload.
WORKLOADS = {"mixed": (16, 256, 16, 160), "long-prompts": (256, 512, 16, 64), "long-outputs": (16, 64, 128, 256)}
QUICK = dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=512, requests=8, hf_batch_sizes="2,4",
             workloads="quick", repeats=1)
WORKLOADS["quick"] = (4, 40, 4, 40)


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
    parser.add_argument("--requests", type=int, default=64, help="requests per workload")
    parser.add_argument("--workloads", default="mixed,long-prompts,long-outputs",
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--hf-batch-sizes", default="8,16,32,64", help="HF static batch sizes to try; the best counts")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each system, interleaved; median shown")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-gib", type=int, default=4, help="inferq's KV cache (every request fits)")
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


def make_workload(args: argparse.Namespace, name: str) -> Workload:
    prompt_min, prompt_max, output_min, output_max = WORKLOADS[name]
    rng = random.Random(args.seed)
    prompts, max_tokens = [], []
    for _ in range(args.requests):
        length = rng.randint(prompt_min, prompt_max)
        prompts.append([rng.randrange(EOS + 1, args.vocab) for _ in range(length)])  # no special ids
        max_tokens.append(rng.randint(output_min, output_max))
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


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    for row in [header, None, *rows]:
        print("-+-".join("-" * w for w in widths) if row is None
              else " | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def run_workload(args: argparse.Namespace, name: str, hf_model, llm: LLM, batch_sizes: list[int]):
    """HF at every batch size and inferq, interleaved repeats; prints the workload's table. (HF's best, ours), or
    None if a system returned the wrong number of tokens."""
    work = make_workload(args, name)
    prompt_min, prompt_max, output_min, output_max = WORKLOADS[name]
    print(f"\nworkload {name}: {args.requests} requests, prompt {prompt_min}-{prompt_max} tokens "
          f"({sum(map(len, work.prompts))} total), output {output_min}-{output_max} tokens "
          f"({work.useful_tokens} useful), greedy, EOS off, seed {args.seed}")
    # Interleaved repeats, median reported: the machine's speed drifts, and this spreads the drift over both.
    runs: dict[str, list[Result]] = {}
    for _ in range(args.repeats):
        for size in batch_sizes:
            runs.setdefault(f"HF generate, static batches of {size}", []).append(
                timed(f"HF generate, static batches of {size}", run_hf, hf_model, work, size))
        runs.setdefault("inferq continuous batching", []).append(
            timed("inferq continuous batching", run_ours, llm, work))
    medians = {system: median_run(results) for system, results in runs.items()}
    for r in medians.values():  # sanity, not a threshold: every request got exactly what it asked for
        if [len(o) for o in r.outputs] != work.max_tokens:
            print(f"error: {r.system} returned the wrong number of tokens", file=sys.stderr)
            return None
    ours = medians.pop("inferq continuous batching")
    best = min(medians.values(), key=lambda r: r.seconds)
    rows = []
    for r in [*medians.values(), ours]:
        rate = work.useful_tokens / r.seconds
        rows.append((r.system + (" (HF's best)" if r is best else ""), f"{r.seconds:.2f}", f"{rate:.1f}",
                     f"{best.seconds / r.seconds:.2f}x"))
    print_table(("system", "seconds", "out tok/s", "vs HF's best"), rows)
    print("runs (s): " + "; ".join(f"{system}: {', '.join(f'{r.seconds:.1f}' for r in results)}"
                                   for system, results in runs.items()))
    print(f"greedy agreement with HF's best (first {AGREEMENT_TOKENS} tokens equal): "
          f"{agreement(ours.outputs, best.outputs):.0%} of requests (HF left-padding changes numerics slightly)")
    loads = [r.others_load for r in (best, ours) if r.others_load is not None]
    if loads:
        print(f"CPU load of other processes during the runs: at most {max(loads):.0%} of all cores "
              "(anything but ~0% skews the timings)")
    return work, best, ours


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    transformers.logging.set_verbosity_error()  # generate() warns about the deliberate EOS/min_new_tokens setup
    transformers.logging.disable_progress_bar()
    names = args.workloads.split(",")
    batch_sizes = [int(size) for size in args.hf_batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="inferq-bench-") as model_dir:
        hf_model = make_model(args, model_dir)
        # Every request at once (continuous batching has no batch size to tune), a KV cache that holds them all.
        llm = LLM(model_dir, skip_tokenizer_init=True, max_num_seqs=args.requests, max_num_batched_tokens=8192,
                  device="cpu", dtype="float32", cpu_kv_cache_bytes=args.kv_cache_gib << 30)

    params = sum(p.numel() for p in hf_model.parameters())
    print(f"model: random Llama, {params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads, intermediate {args.intermediate}, vocab {args.vocab}), float32 | "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads")

    # Warm-up: first calls pay for allocator growth and kernel selection.
    tiny = Workload([[5, 6, 7], [8, 9, 10, 11, 12]], [2, 3])
    for _ in range(2):
        run_hf(hf_model, tiny, 2)
        run_ours(llm, tiny)

    summary = []
    for name in names:
        outcome = run_workload(args, name, hf_model, llm, batch_sizes)
        if outcome is None:
            return 1
        work, best, ours = outcome
        summary.append((name, best.system.rpartition(" ")[2], f"{work.useful_tokens / best.seconds:.1f}",
                        f"{work.useful_tokens / ours.seconds:.1f}", f"{best.seconds / ours.seconds:.2f}x"))
    print()
    print_table(("workload", "HF's best batch size", "HF out tok/s", "inferq out tok/s", "inferq vs HF's best"),
                summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
