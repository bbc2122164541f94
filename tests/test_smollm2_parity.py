"""The demo path on a real trained chat model: SmolLM2-135M-Instruct's greedy chat answers equal transformers'
token for token, EOS included, with the prompts batched together and the prefix cache on (its chat template gives
every prompt the same system prompt) and off."""
from __future__ import annotations

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.smollm2 import smollm2_checkpoint

QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea.",
             "What is 12 times 7?", "Say hello in Spanish.", "Who wrote Hamlet?",
             "Give one tip for sleeping well.", "What is a prime number?"]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def checkpoint():
    return smollm2_checkpoint()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' greedy answers (one prompt at a time, float32): (prompt ids, answer ids) per question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    answers = []
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        answers.append((list(ids), out[0, len(ids):].tolist()))
    return answers, tokenizer.eos_token_id


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache-on", "prefix-cache-off"])
def test_greedy_chat_answers_equal_transformers(checkpoint, reference, caching):
    answers, eos = reference
    llm = LLM(str(checkpoint), device="cpu", dtype="float32", enable_prefix_caching=caching)
    outputs = llm.generate([ids for ids, _ in answers], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    for (_, expected), output in zip(answers, outputs):
        assert output.outputs[0].token_ids == expected
    assert any(expected[-1] == eos for _, expected in answers)  # some answers end by EOS within MAX_TOKENS
    if caching:
        assert llm.engine.scheduler.prefix_hit_tokens > 0
