"""A tensor-parallel follower (rank 1..N-1): `python -m engine.tp_follower`, started by the leader
(engine/tensor_parallel.py start_leader), never by hand.

It joins the leader's process groups, loads its shard of the model as the leader's spec says, reports its KV-cache
budget and builds the cache the leader decided on (and the same device graphs), then runs the leader's every step
on its shard: the same forward pass, whose all-reduces pair with the leader's; the logits are the leader's alone.
It ends on the leader's stop message, or when the leader is gone (its parent process changes), so that a leader
killed outright never leaves a follower holding a device.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import threading
import time

import torch

from engine import tensor_parallel
from engine.attention import select_backend
from engine.decode_graphs import DecodeGraphs
from engine.device import use_device
from engine.kv_cache import KVCacheSpec, allocate_kv_cache, num_blocks_for_budget
from engine.loader import load_config, load_model
from engine.model_runner import DecodeBatch, ModelRunner

log = logging.getLogger(__name__)


def _watch_parent(parent: int) -> None:
    """Exit as soon as the leader is gone (re-parented: getppid changes), even while blocked in a collective."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(tensor_parallel.WATCH_INTERVAL_S)
        os._exit(0)

    if os.getppid() != parent:
        os._exit(0)
    threading.Thread(target=watch, name="inferq-tp-parent", daemon=True).start()


def run(rank: int, size: int, port: int, device: torch.device, backend: str) -> None:
    store = torch.distributed.TCPStore("127.0.0.1", port, size, is_master=False,
                                       timeout=datetime.timedelta(seconds=tensor_parallel.START_TIMEOUT_S))
    tp = tensor_parallel.join(rank, size, device, backend, store)
    spec = tp.broadcast()
    if spec is None:
        return
    config = spec["config"]
    use_device(device)
    hf_config = load_config(config.model)
    model = load_model(config.model, hf_config, device, spec["dtype"], spec["low_bit"], tp)
    attention = model.model.layers[0].self_attn
    cache = KVCacheSpec(len(model.model.layers), attention.num_kv_heads, attention.head_dim, config.block_size,
                        spec["dtype"])
    try:
        budget = num_blocks_for_budget(cache, device, num_blocks=config.num_kv_blocks,
                                       gpu_memory_utilization=config.gpu_memory_utilization,
                                       cpu_bytes=config.cpu_kv_cache_bytes,
                                       activation_reserve=spec["activation_reserve"])
    except ValueError as exc:
        budget = str(exc)  # the leader raises it
    tp.gather(budget)
    setup = tp.broadcast()
    if setup is None:
        return
    kv_caches = allocate_kv_cache(cache, setup["num_blocks"], device)
    attention_backend = select_backend(config.attention_backend, device)
    runner = ModelRunner(model, kv_caches, attention_backend, config.block_size, device)
    if setup["graph_sizes"]:
        runner.graphs = DecodeGraphs(model, kv_caches, attention_backend, device, setup["max_blocks_per_seq"],
                                     collectives=True)
        runner.graphs.capture(setup["graph_sizes"])
    gc.freeze()  # as the leader's engine: what lives now lives as long as the process
    log.info("tensor-parallel rank %d/%d ready on %s", rank, size, device)
    with torch.inference_mode():
        while True:
            message, tokens = tp.receive()
            if message is None:
                break
            if isinstance(message, DecodeBatch):
                runner.run_decode(message, tokens)
            else:
                runner.run_flat(message, tokens)
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.tp_follower")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.WARNING)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s [tp rank {args.rank}]: %(message)s")
    _watch_parent(args.parent)
    tensor_parallel.disable_multicast()
    run(args.rank, args.size, args.port, torch.device(args.device), args.backend)


if __name__ == "__main__":
    main()
