"""SchedulerOutput -> flat input tensors -> one forward pass -> logits of the rows that sample a token.

With tensor parallelism (engine/tensor_parallel.py) the leader's runner hands each step's flat inputs (a FlatBatch,
or a DecodeBatch for a graph replay) to the followers before it runs them; a follower's runner runs the same
forward pass on its shard (run_flat, run_decode) and leaves the logits to the leader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.attention import AttentionBackend, AttentionMetadata
from engine.decode_graphs import DecodeGraphs
from engine.scheduler import ScheduledChunk, SchedulerOutput

if TYPE_CHECKING:
    from engine.tensor_parallel import TensorParallel


@dataclass(slots=True)
class FlatBatch:
    """One eager step's inputs as host lists: what every rank's forward pass needs, and nothing of the requests."""

    token_ids: list[int]  # the input tokens after the first num_on_device ones (those are a device tensor)
    num_on_device: int
    positions: list[int]
    slots: list[int]
    decode_tables: list[list[int]]
    decode_lens: list[int]
    prefill_spans: list[tuple[int, int, int, list[int]]]  # (first row, tokens, context length, block table)


@dataclass(slots=True)
class DecodeBatch:
    """One graph-replayed decode step's inputs (DecodeGraphs.run's arguments), tokens as in FlatBatch."""

    token_ids: list[int]
    num_on_device: int
    positions: list[int]
    slots: list[int]
    block_tables: list[list[int]]
    context_lens: list[int]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 backend: AttentionBackend, block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.graphs: DecodeGraphs | None = None  # set by the engine where graph capture is possible
        # The leader's group when tensor parallel: each step's inputs go to the followers first. None: one device.
        self.tensor_parallel: TensorParallel | None = None

    def order(self, out: SchedulerOutput) -> list[ScheduledChunk]:
        """Decodes first (one batch for the attention backend), then prefill chunks; logits come back in this order."""
        decodes = [c for c in out.chunks if _is_decode(c)]
        prefills = [c for c in out.chunks if not _is_decode(c)]
        decodes.sort(key=lambda c: c.start, reverse=True)  # longest context first: backends group by length
        return decodes + prefills

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], input_ids: torch.Tensor | None = None,
                prompt_logprobs: list | None = None) -> torch.Tensor:
        """chunks in `order()` order -> logits [number of chunks with sample=True, vocab] in float32.

        input_ids: the input tokens of the first len(input_ids) chunks, which are decodes, as a device tensor (the
        previous step's sampled tokens, not yet on the host); the other chunks' tokens are read from their
        requests. prompt_logprobs: where to append (chunk, log-probs [chunk.num_tokens, vocab] float32) for each
        prompt chunk whose request asked for prompt_logprobs (row j: the distribution after token start + j)."""
        on_device = 0 if input_ids is None else len(input_ids)
        # Not from a graph when prompt rows are scored: a graph computes the logits of sampled rows only.
        scores = prompt_logprobs is not None and any(_scores_prompt(c) for c in chunks)
        scored: list[tuple[int, ScheduledChunk]] = []  # the prompt chunks scored, with the row each starts at
        if not scores and self.graphs is not None and all(_is_decode(c) for c in chunks) \
                and self.graphs.fits(len(chunks)):
            return self._replay(chunks, input_ids, on_device)
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefill_spans: list[tuple[int, int, int, list[int]]] = []
        for i, chunk in enumerate(chunks):
            request = chunk.request
            first = len(positions)
            end = chunk.start + chunk.num_tokens
            if i >= on_device:
                token_ids.extend(request.token_ids[chunk.start:end])
            positions.extend(range(chunk.start, end))
            table = request.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(chunk.start, end))
            if _is_decode(chunk):
                decode_tables.append(table[:-(-end // bs)])
                decode_lens.append(end)
            else:
                prefill_spans.append((first, chunk.num_tokens, end, table[:-(-end // bs)]))
            if chunk.sample:
                sample_rows.append(len(positions) - 1)
            if scores and _scores_prompt(chunk):
                scored.append((first, chunk))

        batch = FlatBatch(token_ids, on_device, positions, slots, decode_tables, decode_lens, prefill_spans)
        if self.tensor_parallel is not None:
            self.tensor_parallel.send(batch, input_ids)
        hidden = self.run_flat(batch, input_ids)
        for first, chunk in scored:
            logits = self.model.compute_logits(hidden[first:first + chunk.num_tokens]).float()
            prompt_logprobs.append((chunk, torch.log_softmax(logits, dim=-1)))
        return self.model.compute_logits(hidden[self._tensor(sample_rows)]).float()

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def run_flat(self, batch: FlatBatch, input_ids: torch.Tensor | None) -> torch.Tensor:
        """One eager forward pass -> hidden states [tokens, hidden]. input_ids: the first batch.num_on_device input
        tokens, on the device."""
        tensor = self._tensor
        decode_tables = batch.decode_tables
        width = max((len(t) for t in decode_tables), default=0)
        meta = AttentionMetadata(
            slot_mapping=tensor(batch.slots),
            # int32 as in the captured decode graphs: kernels compile per argument dtype.
            decode_block_tables=tensor([t + [0] * (width - len(t)) for t in decode_tables], torch.int32).view(
                len(decode_tables), width),
            decode_context_lens=tensor(batch.decode_lens, torch.int32),
            decode_context_lens_host=batch.decode_lens,
            prefills=[(first, n, ctx, tensor(table, torch.int32)) for first, n, ctx, table in batch.prefill_spans],
        )
        input_ids = self._inputs(input_ids, batch.token_ids)
        return self.model(input_ids, tensor(batch.positions), self.kv_caches, meta, self.backend)

    def _inputs(self, on_device: torch.Tensor | None, host: list[int]) -> torch.Tensor:
        """The step's input ids: those already on the device (the sampler's int64 tokens), then those from the
        host."""
        if on_device is not None and not host:
            return on_device
        from_host = torch.tensor(host, dtype=torch.long, device=self.device)
        return from_host if on_device is None else torch.cat([on_device, from_host])

    def _replay(self, chunks: list[ScheduledChunk], input_ids: torch.Tensor | None, on_device: int) -> torch.Tensor:
        bs = self.block_size
        positions = [c.start for c in chunks]
        tables = [c.request.block_ids[:p // bs + 1] for c, p in zip(chunks, positions)]
        host = [c.request.token_ids[c.start] for c in chunks[on_device:]]
        batch = DecodeBatch(host, on_device, positions, [t[-1] * bs + p % bs for t, p in zip(tables, positions)],
                            tables, [p + 1 for p in positions])
        if self.tensor_parallel is not None:
            self.tensor_parallel.send(batch, input_ids)
        logits = self.run_decode(batch, input_ids)
        if all(c.sample for c in chunks):
            return logits
        # A one-token chunk in the middle of a chunked prompt samples nothing.
        return logits[torch.tensor([i for i, c in enumerate(chunks) if c.sample], device=self.device)]

    def run_decode(self, batch: DecodeBatch, input_ids: torch.Tensor | None) -> torch.Tensor:
        """One decode step replayed from the graphs -> logits [n, vocab] (valid until the next replay)."""
        token_ids = batch.token_ids if input_ids is None else self._inputs(input_ids, batch.token_ids)
        return self.graphs.run(token_ids=token_ids, positions=batch.positions, slots=batch.slots,
                               block_tables=batch.block_tables, context_lens=batch.context_lens)


def _scores_prompt(chunk: ScheduledChunk) -> bool:
    return chunk.request.params.prompt_logprobs is not None and chunk.start < len(chunk.request.prompt_token_ids)


def _is_decode(chunk: ScheduledChunk) -> bool:
    """One new token after a cached context: a plain decode, or the last token of a chunked prompt (same maths)."""
    return chunk.num_tokens == 1 and chunk.start > 0
