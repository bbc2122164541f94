"""Automatic prefix caching on a GPU: a workload whose requests share a long system prompt, and W256 (nothing
shared), each with caching on and off, alternating in one process on one engine; one table.

Shared-prefix workload (the issue's): --requests (256) requests of one --system-tokens (1,536) token system prompt
plus 32-64 tokens of their own, outputs 64-192, greedy, EOS off. Its prefix-aware floor counts the shared prompt's
prefill once (bench/peers_gpu.py's floor otherwise: prefill FLOPs at the measured matmul rate, decode bytes at the
measured copy rate). W256 is bench/peers_gpu.py's workload, where caching can only cost (hashing, bookkeeping).
The cache is emptied before every run, so a run finds only what it computed itself; on and off swap places
every round.

    python bench/prefix_caching.py                      # Llama-3-8B shape, random weights, bf16, cuda
    python bench/prefix_caching.py --shape tiny --device cpu --requests 16 --system-tokens 64   # smoke test
"""
from __future__ import annotations

import argparse, random, statistics, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import bench.peers_gpu as peers  # its shapes, workload W256, ceilings and floor

def shared_prefix_workload(n: int, system_tokens: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    r = random.Random(seed)
    system = [r.randrange(3, vocab) for _ in range(system_tokens)]
    return [(system + [r.randrange(3, vocab) for _ in range(r.randint(32, 64))], r.randint(64, 192))
            for _ in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama3-8b", choices=peers.SHAPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--system-tokens", type=int, default=1536)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    peers.DEV = args.device
    cfg = LlamaConfig(**peers.SHAPES[args.shape], max_position_embeddings=4096)
    bw, fl = peers.ceilings()
    workloads = {"shared prefix": shared_prefix_workload(args.requests, args.system_tokens, cfg.vocab_size),
                 "W256": peers.workload(args.requests, vocab=cfg.vocab_size)}
    with tempfile.TemporaryDirectory(prefix="inferq-prefix-") as tmp:
        torch.manual_seed(0)
        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).to(dtype)
        nparam = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        floors = {name: peers.floor_seconds(reqs, cfg, nparam, bw, fl) for name, reqs in workloads.items()}
        shared_once = (args.requests - 1) * args.system_tokens * 2 * nparam / fl
        floors["shared prefix"] -= shared_once  # the prefix-aware floor: the system prompt's prefill counted once
        llm = LLM(tmp, skip_tokenizer_init=True, device=args.device, dtype=str(dtype).removeprefix("torch."),
                  max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.85)
        manager = llm.engine.scheduler.block_manager
        llm.generate([[5] * 40, [6] * 300], [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 2)
        times: dict[tuple[str, bool], list[float]] = {}
        hit_rates: dict[tuple[str, bool], float] = {}
        for round_ in range(args.rounds):
            for name, reqs in workloads.items():
                for caching in ((True, False) if round_ % 2 else (False, True)):  # neither always runs first
                    assert manager.reset_prefix_cache()
                    manager.enable_prefix_caching = caching
                    scheduler = llm.engine.scheduler
                    queried, hits = scheduler.prefix_queried_tokens, scheduler.prefix_hit_tokens
                    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    outs = llm.generate([p for p, _ in reqs], params)
                    seconds = time.perf_counter() - start
                    assert sum(len(o.outputs[0].token_ids) for o in outs) == sum(m for _, m in reqs)
                    times.setdefault((name, caching), []).append(seconds)
                    hit_rates[(name, caching)] = (scheduler.prefix_hit_tokens - hits) / max(
                        1, scheduler.prefix_queried_tokens - queried)
                    print(f"{name}, caching {'on' if caching else 'off'}: {seconds:.2f} s, "
                          f"hit rate {hit_rates[(name, caching)]:.3f}", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"\n== prefix caching, {device}, {args.shape} random weights, {args.requests} requests, "
          f"{args.rounds} rounds (median) ==")
    print("| workload | floor | caching | time | out tok/s | × floor | hit rate | on / off |")
    print("|---|---|---|---|---|---|---|---|")
    for name, reqs in workloads.items():
        tokens = sum(m for _, m in reqs)
        off = statistics.median(times[(name, False)])
        for caching in (True, False):
            t = statistics.median(times[(name, caching)])
            print(f"| {name} | {floors[name]:.2f} s | {'on' if caching else 'off'} | {t:.2f} s | {tokens / t:.0f} | "
                  f"{floors[name] / t:.3f} | {hit_rates[(name, caching)]:.3f} | {off / t:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
