"""A small random-weight Llama checkpoint in Hugging Face format, made offline.

The tokenizer is a real SentencePiece BPE model (Llama-2 settings, byte fallback) trained in-process on text that
is already on this machine, so the checkpoint exercises the same tokenizer code paths as a downloaded Llama-2.
The weights are random: the output is gibberish, but deterministic for a seed, and it loads with transformers.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sysconfig
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Seen by the tokenizer trainer so accents, CJK and emoji occur at least a little (most still end as byte tokens).
_MULTILINGUAL = """Größe, café, naïve, déjà vu, señor, smörgåsbord, Ærø, żółć, Dvořák.
Привет, как дела? Γειά σου κόσμε. שלום עולם. مرحبا بالعالم. नमस्ते दुनिया.
日本語のテキスト、東京で会いましょう。中文文本，你好世界。한국어 텍스트, 안녕하세요.
Emoji: 😀 🚀 🎉 👍 ❤️ 🙂 — “quotes” ‘single’ … € £ ¥ ° ± × ÷
"""

# Llama-2-chat's template (meta-llama/Llama-2-7b-chat-hf tokenizer_config.json), unchanged in behaviour.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

DEMO_SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=192),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=704),
    # ~85M parameters in the layers; ~100M in all with a vocabulary of ~8000.
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048),
}

# byte_fallback reserves 256 byte pieces, plus <unk>, <s>, </s>: the vocabulary must leave room for merges.
_MIN_VOCAB = 300
_EXTRA_TEXT_DIRS = ("/usr/share/common-licenses",)


def collect_local_text(max_bytes: int = 4_000_000) -> str:
    """Text found on this machine (the Python standard library, license texts), deterministic for a machine."""
    parts = [_MULTILINGUAL]
    budget = max_bytes - len(_MULTILINGUAL.encode())
    # License texts are prose, unlike the code: take them first but let them use at most a quarter of the budget.
    prose_budget = budget // 4
    for directory in _EXTRA_TEXT_DIRS:
        for path in sorted(Path(directory).glob("*")) if Path(directory).is_dir() else []:
            prose_budget, budget = _take(path, parts, prose_budget, budget)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _python_files(stdlib):
        if budget <= 0:
            break
        _, budget = _take(path, parts, budget, budget)
    return "\n".join(parts)


def _python_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Installed packages differ from machine to machine and are huge: only the standard library itself.
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def _take(path: Path, parts: list[str], limit: int, budget: int) -> tuple[int, int]:
    """Append the file's text (up to `limit` bytes) to parts; returns the limit and budget left."""
    if limit <= 0 or not path.is_file():
        return limit, budget
    try:
        text = path.read_bytes()[:limit].decode("utf-8", errors="ignore")
    except OSError:
        return limit, budget
    parts.append(text)
    size = len(text.encode())
    return limit - size, budget - size


def train_sentencepiece(out_dir: str | Path, vocab_size: int, text: str) -> Path:
    """Train a Llama-2-style SentencePiece BPE model on text; writes and returns out_dir/tokenizer.model."""
    import sentencepiece as spm

    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB} (256 byte-fallback pieces are reserved)")
    lines = [line for line in text.splitlines() if line.strip()]
    # A fixed, evenly spread subset instead of SentencePiece's random sampling: same text, same tokenizer.
    limit = 150_000
    if len(lines) > limit:
        lines = lines[::-(-len(lines) // limit)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, unk_piece="<unk>", bos_id=1, bos_piece="<s>", eos_id=2, eos_piece="</s>",
        pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        input_sentence_size=limit, shuffle_input_sentence=False, max_sentence_length=8192, num_threads=2,
        minloglevel=2)
    path = Path(out_dir) / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def write_tokenizer_files(out_dir: str | Path, model_max_length: int = 2048, tokenizer_json: bool = False) -> None:
    """tokenizer_config.json and special_tokens_map.json as Llama-2-7b-chat-hf has them, next to tokenizer.model;
    with tokenizer_json also the fast tokenizer's tokenizer.json (as converted by transformers)."""
    out = Path(out_dir)
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length, "padding_side": "right",
        "sp_model_kwargs": {}, "chat_template": LLAMA2_CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    if tokenizer_json:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
        # Only the backend file: save_pretrained would also rewrite tokenizer_config.json in its own way.
        tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))


def save_hf_checkpoint(out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor],
                       max_shard_bytes: int | None = None) -> None:
    """config.json plus model.safetensors, or HF-named shards and model.safetensors.index.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    # Last: a directory with config.json is taken as complete (worker.cli.ensure_demo_model).
    _write_json(out / "config.json", config)


def llama_config(size: str, vocab_size: int, max_position_embeddings: int = 2048) -> dict:
    if size not in DEMO_SIZES:
        raise ValueError(f"unknown demo model size {size!r}; choose one of {sorted(DEMO_SIZES)}")
    dims = DEMO_SIZES[size]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **dims,
        "head_dim": dims["hidden_size"] // dims["num_attention_heads"], "vocab_size": vocab_size,
        "hidden_act": "silu", "max_position_embeddings": max_position_embeddings, "initializer_range": 0.02,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": None, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
    }


def random_llama_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named Llama weights. Linear weights ~ N(0, 1/in_features) and N(0, 1) embeddings keep activations at unit
    scale, so the logits are peaky and greedy picks are far from ties (token-exact comparisons stay stable)."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5

    tensors = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], hidden, generator=gen)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = linear(q_out, hidden)
        tensors[p + "self_attn.k_proj.weight"] = linear(kv_out, hidden)
        tensors[p + "self_attn.v_proj.weight"] = linear(kv_out, hidden)
        tensors[p + "self_attn.o_proj.weight"] = linear(hidden, q_out)
        tensors[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = linear(hidden, inter)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = linear(config["vocab_size"], hidden)
    return tensors


def write_demo_model(out_dir: str | Path, size: str = "tiny", vocab_size: int = 2000, seed: int = 0,
                     max_position_embeddings: int = 2048, tokenizer_json: bool = False,
                     max_shard_bytes: int | None = None) -> Path:
    """Train the tokenizer and write a random LlamaForCausalLM checkpoint to out_dir; returns out_dir as a Path."""
    import sentencepiece as spm

    if size not in DEMO_SIZES:
        raise ValueError(f"unknown demo model size {size!r}; choose one of {sorted(DEMO_SIZES)}")
    out = Path(out_dir)
    model_file = train_sentencepiece(out, vocab_size, collect_local_text())
    actual_vocab = spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
    write_tokenizer_files(out, model_max_length=max_position_embeddings, tokenizer_json=tokenizer_json)
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
                                                 "do_sample": True, "temperature": 0.6, "top_p": 0.9})
    config = llama_config(size, actual_vocab, max_position_embeddings)
    save_hf_checkpoint(out, config, random_llama_weights(config, seed), max_shard_bytes)
    log.info("wrote the %s demo model (vocab %d) to %s", size, actual_vocab, out)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
