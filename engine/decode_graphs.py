"""Decode steps replayed from captured device graphs, one graph per batch size.

A decode step of a small batch launches hundreds of small kernels; launching them from Python costs more than
running them. A captured graph replays the whole forward pass (embedding to logits) with one launch. Graphs need
fixed shapes and fixed addresses, so the inputs live in static buffers sized for the largest batch; a step of n
requests runs the graph of the smallest captured size >= n, with the rows past n padded (cache slot -1: nothing is
written; context length 0: nothing is read). The attention backend must therefore need no host data in a decode
step (`AttentionBackend.supports_graphs`).

CUDA graphs on NVIDIA cards; XPU graphs on Intel cards where the installed torch has them (torch.xpu.XPUGraph,
same interface; that path has not run on Intel hardware yet). Off on the CPU.
"""
from __future__ import annotations

import logging
import time

import torch

from engine.attention import AttentionBackend, AttentionMetadata

log = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (and max_num_seqs itself): padding wastes at most 15 rows."""
    sizes = {s for s in (1, 2, 4, 8) if s <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    return sorted(sizes)


_GRAPH_CLASSES = {"cuda": "CUDAGraph", "xpu": "XPUGraph"}


def graphs_supported(device: torch.device, backend: AttentionBackend) -> bool:
    module = getattr(torch, device.type, None)
    return backend.supports_graphs and hasattr(module, _GRAPH_CLASSES.get(device.type, "-"))


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 backend: AttentionBackend, device: torch.device, max_blocks_per_seq: int,
                 collectives: bool = False) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.device = device
        self.max_blocks_per_seq = max_blocks_per_seq
        # A tensor-parallel model's graphs hold its all-reduces (NCCL allows that). Captured in thread-local mode:
        # the collective library's watchdog thread queries its earlier work's events meanwhile, which a global
        # capture would refuse.
        self._capture_options = {"capture_error_mode": "thread_local"} if collectives and device.type == "cuda" else {}
        # torch.cuda or torch.xpu: the same graph interface (Graph class, graph() capture context, synchronize).
        self._api = getattr(torch, device.type)
        self._graphs: dict[int, tuple[object, torch.Tensor]] = {}
        self._sizes: list[int] = []

    @property
    def max_batch_size(self) -> int:
        return self._sizes[-1] if self._sizes else 0

    @torch.inference_mode()
    def capture(self, sizes: list[int]) -> None:
        start = time.perf_counter()
        largest = max(sizes)
        # Per-token inputs in one device buffer (rows: token id, position, cache slot, context length) and the
        # block tables in another, each filled by one host-to-device copy per step from a pinned twin.
        self._inputs = torch.zeros((4, largest), dtype=torch.long, device=self.device)
        self._tables = torch.zeros((largest, self.max_blocks_per_seq), dtype=torch.int32, device=self.device)
        pin = self.device.type == "cuda"  # pinned memory is CUDA's; other devices copy from pageable memory
        self._host_inputs = torch.zeros(self._inputs.shape, dtype=torch.long, pin_memory=pin)
        self._host_tables = torch.zeros(self._tables.shape, dtype=torch.int32, pin_memory=pin)
        self._copied = self._api.Event()  # after the last step's copies: the host buffers are reused only after it
        self._input_ids, self._positions, self._slots, self._context_lens = self._inputs
        self._slots.fill_(-1)
        pool = None
        for size in sorted(sizes, reverse=True):  # largest first: the smaller graphs reuse its memory pool
            for _ in range(2):  # compile and autotune every kernel before capture
                self._forward(size)
            self._api.synchronize(self.device)
            graph = getattr(self._api, _GRAPH_CLASSES[self.device.type])()
            with self._api.graph(graph, pool=pool, **self._capture_options):
                logits = self._forward(size)
            pool = graph.pool()
            self._graphs[size] = (graph, logits)
        self._sizes = sorted(sizes)
        log.info("captured decode graphs for %d batch sizes up to %d in %.1f s", len(sizes), largest,
                 time.perf_counter() - start)

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=self._slots[:size], decode_block_tables=self._tables[:size],
                                 decode_context_lens=self._context_lens[:size],
                                 decode_context_lens_host=[0] * size, prefills=[])
        hidden = self.model(self._input_ids[:size], self._positions[:size], self.kv_caches, meta, self.backend)
        return self.model.compute_logits(hidden).float()

    def fits(self, num_decodes: int) -> bool:
        return 0 < num_decodes <= self.max_batch_size

    @torch.inference_mode()
    def run(self, token_ids: list[int] | torch.Tensor, positions: list[int], slots: list[int],
            block_tables: list[list[int]], context_lens: list[int]) -> torch.Tensor:
        """One decode step of n = len(positions) requests -> logits [n, vocab] (float32; valid until the next run).
        token_ids: a list, or a tensor on the device (copied there, device to device)."""
        n = len(positions)
        on_device = isinstance(token_ids, torch.Tensor)
        size = next(s for s in self._sizes if s >= n)
        graph, logits = self._graphs[size]
        width = max(len(t) for t in block_tables)
        self._copied.synchronize()
        # Rows past n pad the graph's batch: slot -1 writes nothing, context length 0 reads nothing.
        pad = size - n
        self._host_inputs[:, :size] = torch.tensor(
            [[0] * size if on_device else token_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad,
             context_lens + [0] * pad])
        # Columns past `width` keep stale block ids: the kernels never read past a row's context length.
        self._host_tables[:n, :width] = torch.tensor([t + [0] * (width - len(t)) for t in block_tables],
                                                     dtype=torch.int32)
        self._inputs[:, :size].copy_(self._host_inputs[:, :size], non_blocking=True)
        self._tables[:n].copy_(self._host_tables[:n], non_blocking=True)
        self._copied.record()
        if on_device:
            self._input_ids[:n].copy_(token_ids)
        graph.replay()
        return logits[:n]
