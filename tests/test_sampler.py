"""Sampler semantics on CPU: greedy, penalties, suppression, truncation, seeded determinism, log-probs."""
from __future__ import annotations

import pytest
import torch

from engine.sampler import SampledToken, Sampler, SamplingRow
from engine.sampling_params import SamplingParams


def row(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None,
        suppressed: list[int] | None = None, generator: torch.Generator | None = None) -> SamplingRow:
    return SamplingRow(params, prompt or [], output or [], generator, suppressed or [])


def ids(tokens: list[SampledToken]) -> list[int]:
    return [t.token_id for t in tokens]


def sampler(seed: int = 0) -> Sampler:
    return Sampler(torch.Generator().manual_seed(seed))


def random_logits(num_rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ---- greedy ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_of_raw_logits(dtype):
    logits = random_logits(16, 5000, seed=1).to(dtype)
    before = logits.clone()
    tokens = sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(16)])
    assert ids(tokens) == logits.argmax(dim=-1).tolist()
    assert torch.equal(logits, before), "the caller's logits must not be modified"


def test_greedy_rows_unaffected_by_sampled_rows():
    logits = random_logits(6, 300, seed=2)
    params = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=1.3, top_k=7) for i in range(6)]
    tokens = ids(sampler()(logits, [row(p) for p in params]))
    expected = logits.argmax(dim=-1).tolist()
    assert [tokens[i] for i in (1, 3, 5)] == [expected[i] for i in (1, 3, 5)]


def test_greedy_with_penalties_changes_pick():
    greedy = dict(temperature=0.0)
    logits = torch.tensor([[3.0, 2.0, 0.0], [-1.0, -1.5, -9.0], [-1.0, -1.5, -9.0], [3.0, 2.0, 0.0],
                           [3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [1.0, 2.0, 0.0]])
    rows = [
        row(SamplingParams(repetition_penalty=2.0, **greedy), prompt=[0]),          # 3/2 = 1.5 < 2
        row(SamplingParams(repetition_penalty=2.0, **greedy), output=[0]),          # -1*2 = -2 < -1.5
        row(SamplingParams(repetition_penalty=1.4, **greedy), output=[0]),          # -1.4 > -1.5: keeps 0
        row(SamplingParams(frequency_penalty=0.5, **greedy), output=[0, 0, 0]),     # 3 - 1.5 = 1.5 < 2
        row(SamplingParams(frequency_penalty=0.3, **greedy), output=[0, 0, 0]),     # 3 - 0.9 = 2.1: keeps 0
        row(SamplingParams(presence_penalty=0.5, **greedy), output=[0, 0, 0]),      # 3 - 0.5 = 2.5: keeps 0
        row(SamplingParams(presence_penalty=1.5, **greedy), output=[0, 0, 0]),      # 3 - 1.5 = 1.5 < 2
        row(SamplingParams(frequency_penalty=2.0, presence_penalty=2.0, **greedy), prompt=[0, 0, 0]),  # prompt only
        row(SamplingParams(frequency_penalty=-1.0, **greedy), output=[0, 0]),       # 1 + 2 = 3 > 2: encourages
    ]
    assert ids(sampler()(logits, rows)) == [1, 1, 0, 1, 0, 0, 1, 0, 0]


# ---- penalty values ----

def penalised(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The penalised logits, through the sampler's own penalty code."""
    table = torch.tensor([[r.params.repetition_penalty, r.params.frequency_penalty, r.params.presence_penalty]
                          for r in rows])
    x = logits.clone()
    Sampler._apply_penalties(x, rows, table[:, 0:1], table[:, 1:2], table[:, 2:3])
    return x


def test_repetition_penalty_values():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -0.5]])
    # Prompt and output both count, once each however often a token repeats; 99 is out of vocab and ignored.
    x = penalised(logits, [row(SamplingParams(repetition_penalty=2.0), prompt=[0, 0, 99], output=[1, 1])])
    assert torch.equal(x, torch.tensor([[1.0, -4.0, 1.0, 0.5, -0.5]]))
    # A penalty below 1 rewards repeats.
    x = penalised(logits, [row(SamplingParams(repetition_penalty=0.5), prompt=[0], output=[4])])
    assert torch.equal(x, torch.tensor([[4.0, -2.0, 1.0, 0.5, -0.25]]))


def test_frequency_and_presence_penalty_values():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -0.5]]).repeat(3, 1)
    rows = [
        # Output counts only: the prompt's token 2 is not penalised.
        row(SamplingParams(frequency_penalty=0.5), prompt=[2, 2], output=[0, 0, 0, 1]),
        row(SamplingParams(presence_penalty=0.75), prompt=[2], output=[0, 0, 0, 1]),
        row(SamplingParams(frequency_penalty=0.5, presence_penalty=-1.0), output=[3, 3]),
    ]
    x = penalised(logits, rows)
    assert torch.equal(x[0], torch.tensor([0.5, -2.5, 1.0, 0.5, -0.5]))
    assert torch.equal(x[1], torch.tensor([1.25, -2.75, 1.0, 0.5, -0.5]))
    assert torch.equal(x[2], torch.tensor([2.0, -2.0, 1.0, 0.5, -0.5]))  # 0.5 - 2 * 0.5 + 1 = 0.5


def test_penalty_rows_do_not_leak_into_other_rows():
    logits = random_logits(3, 50, seed=3)
    rows = [row(SamplingParams(temperature=0.0), output=list(range(50))),
            row(SamplingParams(temperature=0.0, repetition_penalty=3.0, frequency_penalty=2.0), output=[1, 2]),
            row(SamplingParams(temperature=0.0), prompt=list(range(50)))]
    x = penalised(logits, rows)
    assert torch.equal(x[0], logits[0]) and torch.equal(x[2], logits[2])
    assert not torch.equal(x[1], logits[1])


# ---- suppression ----

def test_suppressed_tokens_never_chosen():
    vocab = 20
    logits = random_logits(64, vocab, seed=4)
    logits[:, 7] = 50.0  # the overwhelming favourite, suppressed below
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=2.0), SamplingParams(top_k=3),
              SamplingParams(top_p=0.5), SamplingParams(min_p=0.2, temperature=5.0)]
    rows = [row(params[i % len(params)], suppressed=[7, 3, 11, vocab + 5]) for i in range(64)]
    s = sampler()
    for _ in range(30):
        chosen = set(ids(s(logits, rows)))
        assert not chosen & {7, 3, 11}
    # The same rows without suppression pick the favourite.
    assert set(ids(s(logits[:2], [row(params[0]), row(params[2])]))) == {7}


# ---- truncation reduces to greedy ----

@pytest.mark.parametrize("params", [SamplingParams(temperature=1.5, top_k=1),
                                    SamplingParams(temperature=1.5, top_p=1e-6),
                                    SamplingParams(temperature=1.5, min_p=1.0),
                                    SamplingParams(temperature=1.0, top_k=5, top_p=1e-6, min_p=0.5)],
                         ids=["top_k=1", "top_p=tiny", "min_p=1", "all"])
def test_truncation_to_one_token_equals_greedy(params):
    logits = random_logits(32, 1000, seed=5)
    s = sampler()
    for _ in range(5):
        assert ids(s(logits, [row(params) for _ in range(32)])) == logits.argmax(dim=-1).tolist()


# ---- distributions ----

def frequencies(params: SamplingParams, logits: torch.Tensor, draws: int) -> torch.Tensor:
    """Empirical token frequencies over `draws` rows that all share one logits vector [vocab]."""
    s = sampler(seed=123)
    tokens = ids(s(logits.unsqueeze(0).repeat(draws, 1), [row(params) for _ in range(draws)]))
    return torch.bincount(torch.tensor(tokens), minlength=logits.numel()).float() / draws


LOGITS = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -3.0])


def test_temperature_sampling_matches_softmax():
    # 40000 draws: the standard error of a frequency is at most 0.0025, the bound is ~6 of them.
    expected = torch.softmax(LOGITS / 0.7, dim=-1)
    assert (frequencies(SamplingParams(temperature=0.7), LOGITS, 40000) - expected).abs().max() < 0.015
    expected = torch.softmax(LOGITS / 2.0, dim=-1)
    assert (frequencies(SamplingParams(temperature=2.0), LOGITS, 40000) - expected).abs().max() < 0.015


def test_top_k_top_p_min_p_distributions():
    probs = torch.softmax(LOGITS, dim=-1)  # order: 3 (.569), 0 (.209), 1 (.094), 4 (.077), 2 (.047), 5 (.004)

    def renormalised(keep: list[int]) -> torch.Tensor:
        out = torch.zeros_like(probs)
        out[keep] = probs[keep] / probs[keep].sum()
        return out

    cases = [(SamplingParams(top_k=2), [3, 0]),
             (SamplingParams(top_p=0.8), [3, 0, 1]),       # mass before token 1 is .778 < .8; before 4 it is .872
             (SamplingParams(top_p=0.75), [3, 0]),
             (SamplingParams(min_p=0.1), [3, 0, 1, 4]),    # keep p >= .0569
             (SamplingParams(min_p=0.15), [3, 0, 1]),      # keep p >= .0854
             (SamplingParams(top_k=3, top_p=0.7), [3, 0])]  # top-3 renormalised: 3 (.653), 0 (.240), 1 (.107)
    for params, keep in cases:
        freq = frequencies(params, LOGITS, 40000)
        assert (freq - renormalised(keep)).abs().max() < 0.015, params


# ---- seeded rows ----

def test_seeded_row_is_independent_of_the_batch():
    vocab, steps = 1000, 8
    seeded = SamplingParams(temperature=0.9, top_k=200, top_p=0.95, repetition_penalty=1.3, seed=42)
    step_logits = [random_logits(1, vocab, seed=100 + i)[0] for i in range(steps)]
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0, frequency_penalty=1.0),
              SamplingParams(temperature=0.5, min_p=0.1, seed=7), SamplingParams(top_p=0.5, presence_penalty=-1.0)]

    def run(layout: list[int | None], sampler_seed: int) -> list[int]:
        """layout: None is the seeded row, an int is others[int]. Returns the seeded row's tokens over the steps."""
        s = sampler(sampler_seed)
        gen = torch.Generator().manual_seed(seeded.seed)
        other_gens = {j: torch.Generator().manual_seed(others[j].seed) for j in range(len(others))
                      if others[j].seed is not None}
        outputs: dict[int | None, list[int]] = {slot: [] for slot in layout}
        noise = torch.Generator().manual_seed(sampler_seed + 1)
        for step in range(steps):
            logits = torch.randn(len(layout), vocab, generator=noise) * 3.0
            rows = []
            for i, slot in enumerate(layout):
                if slot is None:
                    logits[i] = step_logits[step]
                    rows.append(row(seeded, prompt=[1, 2, 3], output=outputs[slot], generator=gen))
                else:
                    rows.append(row(others[slot], prompt=[4, 5], output=outputs[slot], generator=other_gens.get(slot)))
            for slot, token in zip(layout, s(logits, rows)):
                outputs[slot].append(token.token_id)
        return outputs[None]

    alone = run([None], sampler_seed=1)
    assert len(set(alone)) > 1, "a sampled row should not repeat one token"
    assert run([0, None, 1], sampler_seed=2) == alone
    assert run([3, 2, 1, 0, None], sampler_seed=3) == alone
    assert run([None, 2, 2, 0], sampler_seed=4) == alone


def test_different_seeds_differ_and_unseeded_rows_vary():
    logits = torch.zeros(1, 1000)  # uniform
    a = [sampler()(logits, [row(SamplingParams(seed=1), generator=torch.Generator().manual_seed(1))]) for _ in range(2)]
    b = sampler()(logits, [row(SamplingParams(seed=2), generator=torch.Generator().manual_seed(2))])
    assert ids(a[0]) == ids(a[1]) and ids(a[0]) != ids(b)
    s = sampler()
    assert len({ids(s(logits, [row(SamplingParams())]))[0] for _ in range(10)}) > 1


# ---- log-probs ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax(dtype):
    vocab = 500
    logits = random_logits(4, vocab, seed=6).to(dtype)
    reference = torch.log_softmax(logits.float(), dim=-1)
    params = [SamplingParams(temperature=0.0, logprobs=5),
              SamplingParams(temperature=0.7, top_k=10, repetition_penalty=1.5, logprobs=3),
              SamplingParams(temperature=1.0, logprobs=0),
              SamplingParams(temperature=1.0)]
    tokens = sampler()(logits, [row(p, prompt=[0, 1, 2], output=[3]) for p in params])
    for i, (p, token) in enumerate(zip(params, tokens)):
        if p.logprobs is None:
            assert token.logprob is None and token.top_logprobs is None
            continue
        assert token.logprob == pytest.approx(reference[i, token.token_id].item(), abs=1e-6)
        top_values, top_ids = reference[i].topk(p.logprobs)
        assert list(token.top_logprobs) == top_ids.tolist()
        assert list(token.top_logprobs.values()) == pytest.approx(top_values.tolist(), abs=1e-6)
        assert all(isinstance(t, int) for t in token.top_logprobs)
    assert tokens[0].token_id == max(tokens[0].top_logprobs, key=tokens[0].top_logprobs.get)


def test_empty_batch():
    assert sampler()(torch.zeros(0, 10), []) == []
