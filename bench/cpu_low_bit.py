"""CPU: decode speed of each --load-in-low-bit format against float32, on the demo model and a ~134M random Llama.

For each model and format, an engine (engine.llm.LLM, device cpu) is loaded once; then, in --repeats interleaved
rounds (so that the machine's drift and other load spread over every format alike), batches of --batches requests
with --context prompt tokens are filled and decoded: the step time is the median of --steps decode steps after a
warm-up. Printed as markdown tables: ms per step and the ratio to float32 (float32 ms / format ms: above 1 is
faster), per model and batch; then a per-projection table of one matmul of each format against float32's packed
oneDNN weight (engine/cpu_linear.py), which is what the decoder's projections run on.

The integer formats run engine/cpu_low_bit.cpp (built on first use); fp16 and bf16 are the whole model in that dtype
(bf16 through oneDNN's packed weights where it has a bf16 kernel for the CPU, else, as fp16, through F.linear),
shown for information. A benchmark, not a test: nothing is asserted.

    python bench/cpu_low_bit.py                     # both models, every format, batches 1 and 32 (~5 min on 2 cores)
    python bench/cpu_low_bit.py --models 100m --formats float32,sym_int4
    python bench/cpu_low_bit.py --quick             # demo model, small shapes, seconds (the smoke test runs this)
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

FORMATS = ("float32", "sym_int8", "sym_int4", "asym_int4", "bf16", "fp16")
INTEGER_FORMATS = ("sym_int8", "sym_int4", "asym_int4")
# The dtype of a dense format's weights, and of every format's activations (the integer kernels take float32).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The ~134M model of bench/cpu_engine_vs_hf.py (its defaults), written by its checkpoint writer.
LLAMA_100M = SimpleNamespace(vocab=32000, hidden=768, intermediate=2048, layers=12, heads=12, seed=0)
PROJECTIONS = ((576, 1536), (768, 3072))  # (in, out): SmolLM2-135M's MLP, and the 100M model's widest
QUICK = dict(models="demo", batches="1,4", context=16, steps=3, warmup=1, repeats=1, micro_shapes="64x128",
             micro_rows="1,4")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,100m", help="comma-separated, of demo, 100m")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--batches", default="1,32", help="decode batch sizes")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens of each request")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per measurement (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the formats; median shown")
    parser.add_argument("--micro-shapes", default=",".join(f"{k}x{n}" for k, n in PROJECTIONS),
                        help="projection shapes INxOUT for the per-projection table ('' skips it)")
    parser.add_argument("--micro-rows", default="1,32", help="rows (batch) of the per-projection matmuls")
    parser.add_argument("--quick", action="store_true", help="demo model, small shapes (smoke test)")
    # --quick only changes the defaults, so explicit flags still win.
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


def write_model(name: str, directory: str) -> None:
    if name == "demo":
        from engine.demo_model import write_demo_model

        write_demo_model(directory, size="tiny")  # what `inferq` serves by default, and the tests' demo_model_dir
        return
    from cpu_engine_vs_hf import make_model

    make_model(LLAMA_100M, directory)  # saves the checkpoint; the in-memory HF model it returns is dropped
    gc.collect()


def load(model_dir: str, fmt: str, max_batch: int, tokens_per_request: int):
    from engine.llm import LLM

    blocks = max_batch * -(-tokens_per_request // 16) + 8
    return LLM(model_dir, skip_tokenizer_init=True, device="cpu", block_size=16, num_kv_blocks=blocks,
               max_num_seqs=max_batch, max_num_batched_tokens=max(4096, max_batch * tokens_per_request),
               load_in_low_bit=None if fmt == "float32" else fmt,
               dtype="auto" if fmt in ("bf16", "fp16") else "float32")  # the 16-bit formats set their own


def decode_step_ms(engine, batch: int, context: int, warmup: int, steps: int, vocab: int) -> float:
    """Median wall time of `steps` decode steps of `batch` requests of `context` prompt tokens (after `warmup`)."""
    from engine.sampling_params import SamplingParams

    rng = random.Random(batch)
    ids = [f"bench-{batch}-{i}-{time.monotonic_ns()}" for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=warmup + steps + 8, ignore_eos=True)
    for rid in ids:
        engine.add_request(rid, [rng.randrange(3, vocab) for _ in range(context)], params)
    while engine.scheduler.waiting or any(not r.output_token_ids for r in engine.scheduler.running):
        engine.step()  # prefill, until every request decodes
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return 1e3 * statistics.median(times)


def bench_model(args, name: str, formats: list[str], batches: list[int]) -> dict[tuple[str, int], float]:
    """{(format, batch): ms per decode step}, the median over the interleaved rounds."""
    tokens = args.context + args.warmup + args.steps + 16
    with tempfile.TemporaryDirectory(prefix=f"inferq-bench-{name}-") as directory:
        write_model(name, directory)
        engines = {fmt: load(directory, fmt, max(batches), tokens).engine for fmt in formats}
    vocab = next(iter(engines.values())).hf_config.vocab_size
    runs: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for batch in batches:
            for fmt, engine in engines.items():
                runs.setdefault((fmt, batch), []).append(
                    decode_step_ms(engine, batch, args.context, args.warmup, args.steps, vocab))
    del engines
    gc.collect()
    return {key: statistics.median(values) for key, values in runs.items()}


def micro(shapes: list[tuple[int, int]], rows: list[int], formats: list[str], reps: int = 30):
    """{(shape, rows, format): µs per matmul}: float32, bf16 and fp16 as the engine runs them (engine/cpu_linear.py),
    the integer formats through QuantizedLinear (the CPU kernel). Minimum over rounds of `reps` calls: the least
    disturbed by other load."""
    from engine.cpu_linear import PackedLinear, packs
    from engine.low_bit import QuantizedLinear

    results = {}
    torch.manual_seed(0)
    for k, n in shapes:
        linear = torch.nn.Linear(k, n, bias=False)
        layers = {}
        for fmt in formats:
            if fmt in INTEGER_FORMATS:
                layers[fmt] = QuantizedLinear.from_linear(linear, fmt)
            else:  # as the engine runs them: packed where oneDNN has a kernel for the dtype, else F.linear
                dtype = DTYPES.get(fmt, torch.float32)
                if packs(torch.device("cpu"), dtype):
                    layers[fmt] = PackedLinear(linear.weight.detach().to(dtype), None)
                else:
                    layers[fmt] = torch.nn.Linear(k, n, bias=False).to(dtype).requires_grad_(False)
        for m in rows:
            x = torch.randn(m, k)
            inputs = {fmt: x.to(DTYPES.get(fmt, torch.float32)) for fmt in formats}
            best = {fmt: float("inf") for fmt in formats}
            for _ in range(5):  # rounds interleaved over the formats
                for fmt, layer in layers.items():
                    layer(inputs[fmt])
                    start = time.perf_counter()
                    for _ in range(reps):
                        layer(inputs[fmt])
                    best[fmt] = min(best[fmt], (time.perf_counter() - start) / reps * 1e6)
            results.update({((k, n), m, fmt): us for fmt, us in best.items()})
    return results


def ratio(base: float, value: float) -> str:
    return f"{base / value:.2f}x"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    formats = args.formats.split(",")
    if "float32" not in formats:
        formats.insert(0, "float32")  # the baseline of every ratio
    batches = [int(b) for b in args.batches.split(",")]
    from engine.low_bit import _cpu_kernels

    kernel = "engine/cpu_low_bit.cpp" if _cpu_kernels() is not None else "none: dequantizing fallback (slow)"
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; integer kernel: {kernel}")
    print(f"decode step: median of {args.steps} steps after {args.warmup}, context {args.context}, "
          f"median of {args.repeats} interleaved rounds; ratio = float32 ms / format ms (above 1: faster)\n")

    header = ["model", "batch", *[f"{fmt} ms" for fmt in formats], *[f"{fmt} vs f32" for fmt in formats[1:]]]
    rows = []
    for name in args.models.split(","):
        times = bench_model(args, name, formats, batches)
        for batch in batches:
            base = times[("float32", batch)]
            rows.append([name, str(batch), *[f"{times[(fmt, batch)]:.2f}" for fmt in formats],
                         *[ratio(base, times[(fmt, batch)]) for fmt in formats[1:]]])
    print_table(header, rows)

    if args.micro_shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.micro_shapes.split(",")]
        rows_m = [int(m) for m in args.micro_rows.split(",")]
        times = micro(shapes, rows_m, formats)
        print("\nper projection (one matmul; float32 and bf16 as the engine runs them: oneDNN packed weights where "
              "it has a kernel for the dtype, else F.linear; fp16: F.linear; integer formats: the CPU kernel), µs, "
              "minimum of 5 rounds:\n")
        header = ["projection", "rows", *[f"{fmt} µs" for fmt in formats], *[f"{fmt} vs f32" for fmt in formats[1:]]]
        table = []
        for shape in shapes:
            for m in rows_m:
                base = times[(shape, m, "float32")]
                table.append([f"{shape[0]}->{shape[1]}", str(m),
                              *[f"{times[(shape, m, fmt)]:.0f}" for fmt in formats],
                              *[ratio(base, times[(shape, m, fmt)]) for fmt in formats[1:]]])
        print_table(header, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
