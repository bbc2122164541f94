"""The demo checkpoint is a genuine Hugging Face Llama checkpoint: transformers loads it offline."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.demo_model import (DEMO_SIZES, LLAMA2_CHAT_TEMPLATE, llama_config, random_llama_weights,
                               save_hf_checkpoint, write_tokenizer_files)

TEXTS = [
    "Hello world",
    "def f(x):\n    return x * 12345\n",
    "Größe, café, naïve",
    "日本語のテキスト 中文 한국어",
    "Emoji: 😀🚀 👍🏽 and ❤️",
    "tabs\tand  double  spaces\n\n",
]


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def test_config_and_files(demo_model_dir: Path):
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["num_key_value_heads"] == 2 and config["hidden_size"] == 64
    assert config["tie_word_embeddings"] is False and config["bos_token_id"] == 1 and config["eos_token_id"] == 2
    generation = json.loads((demo_model_dir / "generation_config.json").read_text())
    assert generation["temperature"] == 0.6 and generation["top_p"] == 0.9
    tok_config = json.loads((demo_model_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "LlamaTokenizer" and tok_config["add_bos_token"] is True
    assert (demo_model_dir / "model.safetensors").is_file() and (demo_model_dir / "tokenizer.model").is_file()


def test_transformers_loads_model_and_tokenizer(demo_model_dir: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(demo_model_dir, local_files_only=True).eval()
    tok = _tokenizer(demo_model_dir)
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert len(tok) == config["vocab_size"] == model.config.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    weights = load_file(demo_model_dir / "model.safetensors")
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, weights["model.layers.1.self_attn.k_proj.weight"])
    ids = tok("Hello world").input_ids
    assert ids[0] == 1
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config["vocab_size"]) and torch.isfinite(logits).all()


def test_tokenizer_round_trip(demo_model_dir: Path):
    tok = _tokenizer(demo_model_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Characters outside the vocabulary become UTF-8 byte pieces (byte fallback), never <unk>.
    pieces = tok.convert_ids_to_tokens(tok.encode("😀", add_special_tokens=False))
    assert ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"] == pieces[-4:]


def test_tokenizer_json_matches_sentencepiece_model(demo_model_dir: Path, tmp_path: Path):
    for name in ("tokenizer.model", "config.json"):
        shutil.copy(demo_model_dir / name, tmp_path / name)
    write_tokenizer_files(tmp_path, tokenizer_json=True)
    assert (tmp_path / "tokenizer.json").is_file()
    from_model, from_json = _tokenizer(demo_model_dir), _tokenizer(tmp_path)
    for text in TEXTS + ["  leading spaces", "a\n b"]:
        assert from_json.encode(text) == from_model.encode(text)
        ids = from_model.encode(text)
        assert from_json.decode(ids) == from_model.decode(ids)


def test_sharded_checkpoint_loads_with_transformers(tmp_path: Path):
    from transformers import LlamaForCausalLM

    config = llama_config("tiny", vocab_size=320, max_position_embeddings=128)
    tensors = random_llama_weights(config, seed=3)
    save_hf_checkpoint(tmp_path, config, tensors, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not (tmp_path / "model.safetensors").exists()
    model = LlamaForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    state = model.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name


def test_weights_are_seeded_and_scaled():
    config = llama_config("tiny", vocab_size=320)
    a, b = random_llama_weights(config, seed=1), random_llama_weights(config, seed=1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["lm_head.weight"], random_llama_weights(config, seed=2)["lm_head.weight"])
    assert a["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert a["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads of 16
    assert a["model.layers.0.mlp.down_proj.weight"].shape == (64, 192)
    assert abs(a["model.layers.0.mlp.down_proj.weight"].std().item() - 192 ** -0.5) < 0.01
    assert torch.equal(a["model.norm.weight"], torch.ones(64))
    with pytest.raises(ValueError, match="size"):
        llama_config("huge", vocab_size=320)


def test_100m_size_is_about_100m_parameters():
    config = llama_config("100m", vocab_size=8000)
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    params = layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * config["vocab_size"] * h + h
    assert 90e6 < params < 110e6
    assert set(DEMO_SIZES) >= {"tiny", "small", "100m"}


def test_chat_template_renders_llama2_format(demo_model_dir: Path):
    tok = _tokenizer(demo_model_dir)
    assert tok.chat_template == LLAMA2_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": " Hi there "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    # As in the original, strip() applies to the system-prefixed content as a whole: the user's leading space stays.
    assert rendered == ("<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\n Hi there [/INST] Hello. </s>"
                        "<s>[INST] Bye [/INST]")
    assert tok.apply_chat_template(messages[1:2], tokenize=False) == "<s>[INST] Hi there [/INST]"
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                tokenize=False)
