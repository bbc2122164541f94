"""Small random checkpoints of every supported architecture, written by transformers itself (its save_pretrained
format is what a downloaded checkpoint looks like), and greedy references computed by transformers."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

VOCAB = 512
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               # A wide init makes logits peaky, so greedy picks are far from ties and comparisons are exact.
               initializer_range=0.2)

ARCHITECTURES = {
    "llama2-mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    "llama2-linear-rope": (LlamaConfig, LlamaForCausalLM,
                           dict(num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama3-gqa-tied": (LlamaConfig, LlamaForCausalLM, dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 128})),
    "mistral-sliding": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=24)),
    "qwen2-bias": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def write_checkpoint(directory: Path, arch: str, seed: int = 0, max_shard_size: str | None = None):
    """Save a random model of `arch` to directory; return the transformers model (the reference)."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**_COMMON, **extra)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    model.generation_config.eos_token_id = None  # references run to max_tokens unless a test sets EOS
    return model


def common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens that agree before the first divergence (after it, greedy continuations legitimately differ)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.inference_mode()
def greedy_reference(model, prompt: list[int], max_tokens: int, eos: int | None = None) -> list[int]:
    """transformers' own greedy decoding of one unpadded prompt."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    if eos is not None and eos in tokens:
        tokens = tokens[:tokens.index(eos) + 1]
    return tokens
