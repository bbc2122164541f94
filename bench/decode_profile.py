"""Where one decode step goes, on a GPU: the GPU time of each kernel of the decode graph (grouped by kernel name),
the graph replayed back to back, the whole engine step, and the host functions that take the rest.

    python bench/decode_profile.py [shape] [batches]      # default: llama2-7b 1 (the speed issue's batch-1 target)
    LOW_BIT=sym_int4 python bench/decode_profile.py       # the same with --load-in-low-bit sym_int4
    LOW_BIT=bf16,sym_int4 python bench/decode_profile.py llama2-7b 64,256   # each format at each batch, one checkpoint

Prints the weights-over-bandwidth bound of the step for comparison; with $OUT set, writes the tables there too.
"""
from __future__ import annotations

import cProfile
import gc
import io
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from low_bit import write_checkpoint  # noqa: E402
from peers_gpu import _drain, _fill_decoding, _graph_replay_ms, ceilings, step_time_ms  # noqa: E402

CONTEXT, STEPS = 512, 50


def kernel_table(run, replays: int = 5) -> tuple[str, float, int]:
    """GPU time per kernel name over `replays` calls of run()."""
    from torch.profiler import ProfilerActivity, profile
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            run()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name[:90]]
            entry[0] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            entry[1] += 1
    total_us = sum(us for us, _ in totals.values()) / replays
    launches = sum(n for _, n in totals.values()) // replays
    lines = ["| kernel | us per step | launches per step |", "|---|---|---|"]
    for name, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {name} | {us / replays:.1f} | {n // replays} |")
    return "\n".join(lines), total_us, launches


def host_phases(engine, steps: int) -> str:
    """Mean wall time per step of each phase of engine.step(), timed by wrapping the engine's parts (_finish
    includes waiting for the step's tokens), and cProfile's top functions by own time."""
    phases: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - start
        return wrapper

    parts = [(engine.scheduler, "schedule"), (engine.scheduler, "schedule_ahead"), (engine.scheduler, "update"),
             (engine.runner, "order"), (engine.runner, "execute"), (engine.runner.graphs, "run"),
             (engine.sampler, "launch"), (engine, "_finish"), (engine, "_accept"), (engine, "_output")]
    # Instance attributes (the sampler) are put back; wrapped methods are shadowed, then unshadowed.
    saved = [(owner, name, vars(owner).get(name)) for owner, name in parts]
    for owner, name in parts:
        setattr(owner, name, timed(name, getattr(owner, name)))
    step_ms = step_time_ms(engine, steps)
    for owner, name, original in saved:
        if original is None:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    lines = ["| phase | us per step |", "|---|---|"]
    lines += [f"| {name} | {1e6 * seconds / steps:.0f} |" for name, seconds in phases.items()]
    lines.append(f"| whole step | {1e3 * step_ms:.0f} |")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(30)
    return "\n".join(lines) + "\n" + stream.getvalue()


def profile(engine, shape: str, fmt: str, batch: int, bound_ms: float) -> str:
    ids = _fill_decoding(engine, batch, CONTEXT, "p")
    for _ in range(5):
        engine.step()
    step_ms = step_time_ms(engine, STEPS)
    replay_ms = _graph_replay_ms(engine, batch)
    graphs = engine.runner.graphs
    size = next(s for s in graphs._sizes if s >= batch)
    synced = []
    for _ in range(STEPS):  # each replay launched from an idle GPU, as a step's is: adds the launch latency
        start = time.perf_counter()
        graphs._graphs[size][0].replay()
        torch.cuda.synchronize()
        synced.append(time.perf_counter() - start)
    report = [(f"{shape} {fmt} batch {batch}, context ~{CONTEXT}: weights/bandwidth {bound_ms:.2f} ms; step "
              f"{step_ms:.2f} ms ({step_ms / bound_ms:.2f}x); graph replay {replay_ms:.2f} ms "
              f"({replay_ms / bound_ms:.2f}x) back to back, {1e3 * statistics.median(synced):.2f} ms launched "
              f"one at a time")]
    with torch.inference_mode():
        for label, run in (("graph replay", graphs._graphs[size][0].replay), ("eager forward",
                                                                            lambda: graphs._forward(size))):
            table, kernel_us, launches = kernel_table(run)
            report += [f"-- kernels of one {label}: {kernel_us / 1e3:.2f} ms in {launches} kernels --", table]
    report += ["-- host: phases of engine.step() over 30 steps, then cProfile (sorted by own time) --",
               host_phases(engine, 30)]
    _drain(engine, ids)
    return "\n".join(report)


def main() -> None:
    from engine.llm import LLM
    shape = sys.argv[1] if len(sys.argv) > 1 else "llama2-7b"
    batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1").split(",")]
    formats = (os.environ.get("LOW_BIT") or "bf16").split(",")
    bandwidth, _ = ceilings()
    name = torch.cuda.get_device_name()
    header = f"device {name} torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s"
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as model_dir:
        write_checkpoint(model_dir, shape)
        for fmt in formats:
            llm = LLM(model_dir, skip_tokenizer_init=True, device="cuda", dtype="bfloat16",
                      max_num_seqs=max(64, *batches), gpu_memory_utilization=0.85,
                      load_in_low_bit=None if fmt == "bf16" else fmt)
            engine = llm.engine
            weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
            for batch in batches:
                text = header + "\n" + profile(engine, shape, fmt, batch, weight_bytes / bandwidth * 1e3)
                print(text, flush=True)
                if os.environ.get("OUT"):
                    Path(os.environ["OUT"], f"decode_profile_{shape}_{fmt}_b{batch}.txt").write_text(text + "\n")
            del llm, engine
            gc.unfreeze()  # the engine froze the heap at start (engine/engine.py): let the collector reach it again
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    random.seed(0)
    main()
