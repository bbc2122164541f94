"""prompt_logprobs: each prompt token's log-prob given the tokens before it, and the top alternatives, equal to
transformers' full-sequence log-softmax, under chunked prefill, preemption and batching; the prefix cache is
bypassed for such requests (every row must be computed)."""
from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.test_engine import GREEDY, assert_all_blocks_free, drain, engine_for, tiny  # noqa: F401 (fixture)

PROMPTS = {"short": [5, 6, 7], "long": [3 + (i * 7) % 50 for i in range(41)], "one": [9]}


def transformers_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row j: the distribution of token j + 1


@pytest.mark.parametrize("options", [dict(), dict(max_num_batched_tokens=8), dict(num_kv_blocks=7, max_num_seqs=3)],
                         ids=["default", "chunked-prefill", "preemption"])
def test_prompt_logprobs_equal_transformers(tiny, options):
    directory, model = tiny
    engine = engine_for(directory, block_size=8, **options) if "num_kv_blocks" in options else \
        engine_for(directory, **options)
    for request_id, prompt in PROMPTS.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=12, prompt_logprobs=3, **GREEDY))
    engine.add_request("plain", PROMPTS["long"], SamplingParams(max_tokens=12, **GREEDY))  # beside: no scores
    finished = drain(engine)
    if "num_kv_blocks" in options:
        assert sum(o.num_preemptions for o in finished.values()) > 0
    assert finished["plain"].prompt_logprobs is None
    for request_id, prompt in PROMPTS.items():
        scores = finished[request_id].prompt_logprobs
        assert len(scores) == len(prompt) and scores[0] is None
        expected = transformers_prompt_logprobs(model, prompt)
        for position in range(1, len(prompt)):
            entry, row = scores[position], expected[position - 1]
            top = row.topk(3).indices.tolist()
            assert set(entry) == set(top) | {prompt[position]}
            for token, value in entry.items():
                assert value == pytest.approx(row[token].item(), abs=1e-4)
    assert_all_blocks_free(engine)


def test_prompt_logprobs_skip_the_prefix_cache(tiny):
    directory, model = tiny
    engine = engine_for(directory)
    prompt = PROMPTS["long"]
    engine.add_request("warm", prompt, SamplingParams(max_tokens=2, **GREEDY))
    drain(engine)
    engine.add_request("scored", prompt, SamplingParams(max_tokens=2, prompt_logprobs=0, **GREEDY))
    scored = drain(engine)["scored"]
    assert scored.num_cached_tokens == 0
    expected = transformers_prompt_logprobs(model, prompt)
    assert [list(e) for e in scored.prompt_logprobs[1:]] == [[t] for t in prompt[1:]]
    assert [e[t] for e, t in zip(scored.prompt_logprobs[1:], prompt[1:])] == pytest.approx(
        [expected[i, t].item() for i, t in enumerate(prompt[1:])], abs=1e-4)


@pytest.mark.parametrize("value", [-1, 21, 1.5, "2"])
def test_bad_prompt_logprobs(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
