"""Hugging Face checkpoint directory -> our model on a device, plus its tokenizer and generation defaults.

The model is built on the meta device (no memory), then every tensor from the safetensors files is copied to the
target device in the target dtype and assigned by name: peak memory is the model once, never a second copy. Each
decoder layer is finished as soon as its last tensor arrives: its projections fused and, with a low-bit format,
quantized, so a low-bit model never holds more than a layer or two in 16 bits.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.cpu_linear import pack_linears, packs
from engine.low_bit import quantize_linears
from engine.models import model_class

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that we recompute instead.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model directory: it has no config.json")
    return path


def load_config(model_dir: str | Path):
    """The HF config object (it normalises rope settings across transformers versions); architecture checked first
    so an unknown one fails with our message rather than transformers'."""
    from transformers import AutoConfig

    path = check_model_dir(model_dir)
    model_class(read_json(path / "config.json").get("architectures"))
    return AutoConfig.from_pretrained(path, local_files_only=True)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index)["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ValueError(f"{path}: shards named in model.safetensors.index.json are missing: {missing}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no *.safetensors weights")
    return files


def load_model(model_dir: str | Path, config, device: torch.device, dtype: torch.dtype,
               low_bit: str | None = None) -> nn.Module:
    """The model of `config` (load_config's) with the directory's weights. ValueError for missing, unexpected or
    mis-shaped weights, naming the tensors. `low_bit`: a format of engine/low_bit.py for the decoder layers'
    projections."""
    path = check_model_dir(model_dir)
    cls = model_class(config.architectures)
    with torch.device("meta"):
        model = cls(config)
    expected = dict(model.named_parameters())
    layers = model.model.layers
    unfinished = {i: {n for n in expected if _layer_index(n) == i} for i in range(len(layers))}
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
                    continue  # tied: the embedding is the head (some checkpoints still store a copy)
                if name not in expected:
                    unexpected.append(name)
                    continue
                tensor = f.get_tensor(name)
                want = tuple(expected[name].shape)
                if tuple(tensor.shape) != want:
                    raise ValueError(f"weight {name} in {file.name} has shape {tuple(tensor.shape)}, "
                                     f"the config implies {want}")
                _assign(model, name, tensor.to(device=device, dtype=dtype))
                loaded.add(name)
                index = _layer_index(name)
                if index is not None:
                    unfinished[index].discard(name)
                    if not unfinished[index]:
                        _finish_layer(layers[index], low_bit)
    if unexpected:
        raise ValueError(f"{path}: weights the {cls.__name__} architecture does not have: {sorted(unexpected)[:8]}")
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"{path}: weights missing from the checkpoint: {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    model.to(device)  # moves the buffers (rotary frequencies, computed on the CPU); weights are there already
    model.eval().requires_grad_(False)
    if packs(device, dtype):
        pack_linears(model)
    log.info("loaded %s (%s) on %s as %s%s", path, cls.__name__, device, dtype,
             f", decoder projections in {low_bit}" if low_bit else "")
    return model


def _layer_index(name: str) -> int | None:
    """The decoder layer a parameter belongs to (names are model.layers.<i>.…), None outside the layers."""
    parts = name.split(".", 3)
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def _finish_layer(layer: nn.Module, low_bit: str | None) -> None:
    layer.fuse()
    if low_bit:
        quantize_linears(layer, low_bit)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, param_name, nn.Parameter(tensor, requires_grad=False))


def load_tokenizer(tokenizer_dir: str | Path):
    """Fast tokenizer from tokenizer.json, or converted from a SentencePiece tokenizer.model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(check_model_dir(tokenizer_dir) if Path(tokenizer_dir, "config.json").exists()
                                         else tokenizer_dir, local_files_only=True)


def eos_token_ids(model_dir: str | Path, config) -> frozenset[int]:
    """generation_config.json's eos ids (Llama 3 lists several), else config.json's."""
    gen = Path(model_dir) / "generation_config.json"
    eos = read_json(gen).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, list) else [eos])
