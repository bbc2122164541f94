"""SchedulerOutput -> flat input tensors -> one forward pass -> logits of the rows that sample a token."""
from __future__ import annotations

import torch

from engine.attention import AttentionBackend, AttentionMetadata
from engine.decode_graphs import DecodeGraphs
from engine.scheduler import ScheduledChunk, SchedulerOutput


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 backend: AttentionBackend, block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.graphs: DecodeGraphs | None = None  # set by the engine where graph capture is possible

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

        def tensor(values, dtype=torch.long) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        width = max((len(t) for t in decode_tables), default=0)
        meta = AttentionMetadata(
            slot_mapping=tensor(slots),
            # int32 as in the captured decode graphs: kernels compile per argument dtype.
            decode_block_tables=tensor([t + [0] * (width - len(t)) for t in decode_tables], torch.int32).view(
                len(decode_tables), width),
            decode_context_lens=tensor(decode_lens, torch.int32),
            decode_context_lens_host=decode_lens,
            prefills=[(first, n, ctx, tensor(table, torch.int32)) for first, n, ctx, table in prefill_spans],
        )
        input_ids = self._inputs(input_ids, token_ids)
        hidden = self.model(input_ids, tensor(positions), self.kv_caches, meta, self.backend)
        for first, chunk in scored:
            logits = self.model.compute_logits(hidden[first:first + chunk.num_tokens]).float()
            prompt_logprobs.append((chunk, torch.log_softmax(logits, dim=-1)))
        return self.model.compute_logits(hidden[tensor(sample_rows)]).float()

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
        token_ids = host if input_ids is None else self._inputs(input_ids, host)
        logits = self.graphs.run(token_ids=token_ids, positions=positions,
                                 slots=[t[-1] * bs + p % bs for t, p in zip(tables, positions)],
                                 block_tables=tables, context_lens=[p + 1 for p in positions])
        if all(c.sample for c in chunks):
            return logits
        # A one-token chunk in the middle of a chunked prompt samples nothing.
        return logits[torch.tensor([i for i, c in enumerate(chunks) if c.sample], device=self.device)]


def _scores_prompt(chunk: ScheduledChunk) -> bool:
    return chunk.request.params.prompt_logprobs is not None and chunk.start < len(chunk.request.prompt_token_ids)


def _is_decode(chunk: ScheduledChunk) -> bool:
    """One new token after a cached context: a plain decode, or the last token of a chunked prompt (same maths)."""
    return chunk.num_tokens == 1 and chunk.start > 0
