"""Logits [num_rows, vocab] -> one token per row: penalties, suppression, greedy or temperature/top-k/top-p/min-p.

Everything is vectorised over the batch; the only per-row Python work is building small index tensors and drawing
the noise of seeded rows from their own generators. One device->host transfer at the end, which `launch` only
starts: the engine can queue more device work before `finish` waits for the tokens (engine.py, async scheduling).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams

# Temperatures below this are clamped before dividing, so tiny (but valid) temperatures cannot overflow to inf/NaN.
_MIN_TEMPERATURE = 1e-5


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Per-request generator, set when params.seed is not None; must live on the logits' device.
    generator: torch.Generator | None
    # Tokens that must not be picked at this step (EOS and stop_token_ids while under min_tokens).
    suppressed_token_ids: list[int]


@dataclass(slots=True)
class SampledToken:
    token_id: int
    # Log-prob of the chosen token, when params.logprobs is not None.
    logprob: float | None
    # Top-`params.logprobs` tokens -> log-prob (the chosen one is not forced in; the caller adds it).
    top_logprobs: dict[int, float] | None


def uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


class PendingSample:
    """Tokens sampled on the device whose copy to the host is under way."""

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor, params: list[SamplingParams],
                 max_top: int) -> None:
        self.token_ids = token_ids  # [num_rows] int64 on the device: what a next step can take as its input ids
        # packed: token_ids itself (plain greedy), or [num_rows, columns] of token id, log-prob, top values, top ids
        self._params = params
        self._max_top = max_top
        # Non-blocking into pinned memory, then an event: finish() waits for this copy, not for work queued later.
        self._host = packed.to("cpu", non_blocking=True)
        self._copied = None
        if packed.device.type != "cpu":
            self._copied = getattr(torch, packed.device.type).Event()
            self._copied.record()

    def finish(self) -> list[SampledToken]:
        if self._copied is not None:
            self._copied.synchronize()
        host = self._host.tolist()
        if self._host.dim() == 1:  # token ids alone
            return [SampledToken(token_id, None, None) for token_id in host]
        out: list[SampledToken] = []
        max_top = self._max_top
        for p, line in zip(self._params, host):
            token_id = int(line[0])
            if p.logprobs is None:
                out.append(SampledToken(token_id, None, None))
                continue
            values, ids = line[2:2 + p.logprobs], line[2 + max_top:2 + max_top + p.logprobs]
            out.append(SampledToken(token_id, line[1], {int(t): v for t, v in zip(ids, values)}))
        return out


class Sampler:
    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Noise source for unseeded rows (None: torch's default generator of the logits' device).
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        return self.launch(logits, rows).finish() if rows else []

    def launch(self, logits: torch.Tensor, rows: list[SamplingRow]) -> PendingSample:
        """Queue the sampling of one token per row on the logits' device and the copy of the result to the host."""
        num_rows, vocab = logits.shape
        assert num_rows == len(rows), f"{num_rows} logits rows for {len(rows)} sampling rows"
        device = logits.device
        params = [r.params for r in rows]
        if all(p.greedy and p.logprobs is None and not uses_penalties(p) and not p.logit_bias for p in params) \
                and not any(r.suppressed_token_ids for r in rows):
            # Plain greedy batch (the common case of benchmarks and batch jobs): argmax, nothing else.
            tokens = logits.argmax(dim=-1)
            return PendingSample(tokens, tokens, params, max_top=0)

        # 1. Log-probs of the raw model output, before penalties/temperature/truncation: vLLM v1's default
        # ("raw_logprobs"). Computed only when some row asks. [num_rows, vocab] float32.
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if want_logprobs else None

        # Working copy in float32 (a copy even when logits already are float32: the caller's tensor stays intact).
        x = logits.to(torch.float32, copy=True)  # [num_rows, vocab]

        # Per-row parameters in one host->device copy. Greedy rows get neutral values: their sampled token is
        # discarded, but they must not produce NaNs. Disabled top-k is vocab; disabled top-p is inf (see 5b).
        table = torch.tensor(
            [[1.0 if p.greedy else max(p.temperature, _MIN_TEMPERATURE),
              float(vocab if p.greedy or p.top_k is None else min(p.top_k, vocab)),
              float("inf") if p.greedy or p.top_p >= 1.0 else p.top_p,
              0.0 if p.greedy else p.min_p,
              p.repetition_penalty, p.frequency_penalty, p.presence_penalty,
              1.0 if p.greedy else 0.0] for p in params],
            dtype=torch.float32, device=device)  # [num_rows, 8]
        temperature, top_k, top_p, min_p = (table[:, i:i + 1] for i in range(4))  # each [num_rows, 1]
        repetition, frequency, presence = (table[:, i:i + 1] for i in range(4, 7))
        greedy = table[:, 7] > 0  # [num_rows]

        # 2. Penalties, skipped entirely when no row uses them.
        if any(uses_penalties(p) for p in params):
            self._apply_penalties(x, rows, repetition, frequency, presence)

        # 2b. logit_bias (OpenAI's): added to the logits; ids outside the vocab are ignored.
        if any(p.logit_bias for p in params):
            biased = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items() if t < vocab]
            if biased:
                index = torch.tensor([[i for i, _, _ in biased], [t for _, t, _ in biased]], dtype=torch.long,
                                     device=device)
                x.index_put_((index[0], index[1]), torch.tensor([b for _, _, b in biased], device=device),
                             accumulate=True)

        # 3. Suppressed tokens (ids outside the vocab are ignored: nothing to suppress there).
        sup_rows = [i for i, r in enumerate(rows) for t in r.suppressed_token_ids if t < vocab]
        sup_toks = [t for r in rows for t in r.suppressed_token_ids if t < vocab]
        if sup_toks:
            index = torch.tensor([sup_rows, sup_toks], dtype=torch.long, device=device)  # [2, n]
            x[index[0], index[1]] = float("-inf")

        # 4. Greedy: argmax of the (penalised, suppressed) logits; with neither this is argmax of the raw logits.
        tokens = x.argmax(dim=-1)  # [num_rows]

        # 5. Sampled rows.
        if not all(p.greedy for p in params):
            x.div_(temperature)
            # 5a/5b. top-k and top-p on one descending sort. Top-p keeps a token while the mass *before* it is < p,
            # so the most likely token always survives; rows without top-p have p = inf, which float rounding of
            # the cumulative sum can never reach.
            if any(not p.greedy and (p.top_k is not None or p.top_p < 1.0) for p in params):
                sorted_x, order = x.sort(dim=-1, descending=True)  # [num_rows, vocab] each
                rank = torch.arange(vocab, device=device).unsqueeze(0)  # [1, vocab]
                sorted_x.masked_fill_(rank >= top_k, float("-inf"))
                sorted_probs = sorted_x.softmax(dim=-1)
                mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
                sorted_x.masked_fill_(mass_before >= top_p, float("-inf"))
                x = torch.empty_like(x).scatter_(-1, order, sorted_x)  # back to vocab order
            # 5c. min-p: drop tokens with prob < min_p * (max prob); min_p = 0 drops nothing.
            if any(not p.greedy and p.min_p > 0.0 for p in params):
                probs = x.softmax(dim=-1)
                x.masked_fill_(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
            probs = x.softmax(dim=-1)  # [num_rows, vocab]
            # 5d. Exponential race: argmax(probs / q), q ~ Exp(1), is a draw from probs. Unseeded rows share one
            # call on the sampler's generator; each seeded row draws exactly `vocab` values from its own generator,
            # so its token does not depend on the other rows or on its position.
            q = torch.empty_like(probs).exponential_(generator=self.generator)
            for i, r in enumerate(rows):
                if r.generator is not None and not r.params.greedy:
                    q[i] = torch.empty(vocab, dtype=torch.float32, device=device).exponential_(generator=r.generator)
            # A zero draw would turn a masked token's 0/0 into NaN, which argmax would pick.
            q.clamp_min_(torch.finfo(torch.float32).tiny)
            tokens = torch.where(greedy, tokens, (probs / q).argmax(dim=-1))

        # 6. One device->host transfer: token ids ride along as float64 (exact below 2**53) with the log-probs.
        columns = [tokens.unsqueeze(1).double()]
        max_top = max((p.logprobs or 0 for p in params), default=0)
        if raw_logprobs is not None:
            columns.append(raw_logprobs.gather(1, tokens.unsqueeze(1)).double())  # [num_rows, 1]
            if max_top > 0:
                top_values, top_ids = raw_logprobs.topk(max_top, dim=-1)  # [num_rows, max_top] each, descending
                columns += [top_values.double(), top_ids.double()]
        return PendingSample(tokens, torch.cat(columns, dim=1), params, max_top)

    @staticmethod
    def _apply_penalties(x: torch.Tensor, rows: list[SamplingRow], repetition: torch.Tensor,
                         frequency: torch.Tensor, presence: torch.Tensor) -> None:
        """In place on x [num_rows, vocab]. repetition/frequency/presence: [num_rows, 1].

        Repetition (HF/CTRL) covers prompt + output tokens; frequency and presence (OpenAI) cover output tokens.
        """
        num_rows, vocab = x.shape
        device = x.device
        seen_rows: list[int] = []
        seen_toks: list[int] = []
        out_rows: list[int] = []
        out_toks: list[int] = []
        for i, r in enumerate(rows):
            p = r.params
            if p.repetition_penalty != 1.0:
                seen_rows += [i] * (len(r.prompt_token_ids) + len(r.output_token_ids))
                seen_toks += r.prompt_token_ids
                seen_toks += r.output_token_ids
            if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                out_rows += [i] * len(r.output_token_ids)
                out_toks += r.output_token_ids
        # Ids outside the model's vocab go to a spare column `vocab` that is sliced off: no host-side filtering,
        # no data-dependent shapes.
        if seen_toks:
            index = torch.tensor([seen_rows, seen_toks], dtype=torch.long, device=device)  # [2, n]
            seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=device)
            seen[index[0], index[1].clamp(max=vocab)] = True
            seen = seen[:, :vocab]
            penalised = torch.where(x > 0, x / repetition, x * repetition)
            x.copy_(torch.where(seen, penalised, x))
        if out_toks:
            index = torch.tensor([out_rows, out_toks], dtype=torch.long, device=device)  # [2, n]
            counts = torch.zeros(num_rows, vocab + 1, dtype=torch.float32, device=device)
            counts.index_put_((index[0], index[1].clamp(max=vocab)),
                              torch.ones(index.shape[1], device=device), accumulate=True)
            counts = counts[:, :vocab]
            x.sub_(frequency * counts + presence * (counts > 0))
