"""Hugging Face checkpoint directory (or GGUF file) -> our model on a device, plus its tokenizer and generation
defaults.

The model is built on the meta device (no memory), then every tensor from the safetensors files is copied to the
target device in the target dtype and assigned by name: peak memory is the model once, never a second copy. Each
decoder layer is finished as soon as its last tensor arrives: its projections fused and, with a low-bit format,
quantized, so a low-bit model never holds more than a layer or two in 16 bits.

Quantized checkpoints (engine/quantized_checkpoint.py's pre-quantized directories, GGUF files through
engine/gguf_checkpoint.py) deliver a projection's weight already quantized, as a QuantizedWeight under the
projection's weight name: it replaces the meta nn.Linear by a QuantizedLinear, and fusing then concatenates those.

Under tensor parallelism (`tp`, engine/tensor_parallel.py) the model is built as one rank's shard and every split
tensor arrives as that rank's slice (engine/sharding.py); a low-bit format quantizes the slices, the row-parallel
ones as the whole projection would be quantized (low_bit.quantize_row_parallel), so each rank holds exactly its
part of the one-rank model.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from engine import gguf_checkpoint, quantized_checkpoint, sharding
from engine.cpu_linear import pack_linears, packs
from engine.low_bit import INTEGER_FORMATS, QuantizedLinear, QuantizedWeight, quantize_linears, quantize_row_parallel
from engine.models import model_class

if TYPE_CHECKING:
    from engine.tensor_parallel import TensorParallel

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that we recompute instead.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# How a checkpoint's tensors arrive: (our name, the file it is in, a call that reads it).
TensorSource = Iterator[tuple[str, str, Callable[[], "torch.Tensor | QuantizedWeight"]]]


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
    so an unknown one fails with our message rather than transformers'. A GGUF file's from its metadata."""
    from transformers import AutoConfig

    if gguf_checkpoint.is_gguf(model_dir):
        return gguf_checkpoint.load_config(model_dir)
    path = check_model_dir(model_dir)
    model_class(read_json(path / "config.json").get("architectures"))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    checkpoint_format(config)  # a quantization we cannot read fails here, not half-way through the weights
    return config


def checkpoint_format(config) -> str | None:
    """The integer format the checkpoint stores its decoder projections in (a pre-quantized directory, a GGUF file);
    None for one stored in floats. ValueError for another tool's quantization (GPTQ, AWQ, ...)."""
    quantization = getattr(config, "quantization_config", None)
    if not quantization:
        return None
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    method = quantization.get("quant_method")
    if method not in (quantized_checkpoint.QUANT_METHOD, gguf_checkpoint.QUANT_METHOD):
        raise ValueError(f"the checkpoint is quantized with {method!r}, which inferq does not read: use its 16-bit "
                         "weights (with --load-in-low-bit), a GGUF file, or `inferq quantize`")
    return quantization.get("format")


def effective_low_bit(config, asked: str | None) -> str | None:
    """The format the model runs in: a quantized checkpoint's own (what `asked` may only repeat), else `asked`."""
    stored = checkpoint_format(config)
    if stored is None or asked in (None, stored):
        return asked or stored
    raise ValueError(f"checkpoint is pre-quantized as {stored}; load_in_low_bit {asked} was asked for "
                     f"(leave it unset, or start from a 16-bit checkpoint)")


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
               low_bit: str | None = None, tp: TensorParallel | None = None) -> nn.Module:
    """The model of `config` (load_config's) with the directory's (or GGUF file's) weights. ValueError for missing,
    unexpected or mis-shaped weights, naming the tensors. `low_bit`: a format of engine/low_bit.py for the decoder
    layers' projections (effective_low_bit's: a quantized checkpoint's projections are used as stored). `tp`: this
    rank's tensor-parallel group: the model is its shard (every rank calls this at once: a low-bit format's
    row-parallel scales are agreed on between them)."""
    stored = checkpoint_format(config)
    cls = model_class(config.architectures)
    split = (cls.shard_dim, tp.rank, tp.size) if tp is not None else None
    if gguf_checkpoint.is_gguf(model_dir):
        path = Path(model_dir)
        source = gguf_checkpoint.tensors(path, config)
        if split is not None:
            source = _sliced(source, *split)
    else:
        path = check_model_dir(model_dir)
        source = _safetensors_tensors(path, stored, split)
    quantize = None if stored else low_bit  # only a checkpoint stored in floats is quantized as it loads
    with torch.device("meta"):
        model = cls(config) if tp is None else cls(config, tp)
    expected = dict(model.named_parameters())
    buffers = dict(model.named_buffers())  # a checkpoint may set them (a GGUF file's rotary frequencies)
    layers = model.model.layers
    row_parallel = cls.row_parallel_modules if tp is not None else ()
    unfinished = {i: {n for n in expected if _layer_index(n) == i} for i in range(len(layers))}
    loaded: set[str] = set()
    unexpected: list[str] = []
    with contextlib.closing(source):
        for name, where, read in source:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
                continue  # tied: the embedding is the head (some checkpoints still store a copy)
            if name in buffers:
                _assign_buffer(model, name, _checked(name, where, read(), buffers[name].shape))
                continue
            if name not in expected:
                unexpected.append(name)
                continue
            value = _checked(name, where, read(), expected[name].shape)
            if isinstance(value, QuantizedWeight):
                _assign_quantized(model, name, where, value, device)
            else:
                _assign(model, name, value.to(device=device, dtype=dtype))
            loaded.add(name)
            index = _layer_index(name)
            if index is not None:
                unfinished[index].discard(name)
                if not unfinished[index]:
                    _finish_layer(layers[index], quantize, tp, row_parallel)
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
             f", decoder projections in {low_bit}{' (as stored)' if stored else ''}" if low_bit else "")
    return model


def _safetensors_tensors(path: Path, stored_format: str | None,
                         split: tuple[Callable[[str], int | None], int, int] | None = None) -> TensorSource:
    """The directory's tensors; a pre-quantized one's projection parts come as one QuantizedWeight each. `split`:
    (the model's shard_dim, rank, size): a split tensor comes as the rank's slice, a float one read as that only."""
    with contextlib.ExitStack() as stack:
        handles = {}  # tensor name -> (file, its open handle)
        for file in safetensors_files(path):
            f = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            handles.update(dict.fromkeys(f.keys(), (file, f)))

        def read(name: str) -> torch.Tensor:
            return handles[name][1].get_tensor(name)

        def read_quantized(parts: tuple[str, str, str | None]) -> QuantizedWeight:
            return QuantizedWeight.from_tensors(*(None if part is None else read(part) for part in parts))

        def read_part(name: str, dim: int) -> torch.Tensor:
            return sharding.read_slice(name, handles[name][1], dim, *split[1:])

        def read_quantized_part(name: str, parts: tuple[str, str, str | None], dim: int) -> QuantizedWeight:
            return sharding.shard(name, read_quantized(parts), dim, *split[1:])

        entries = (quantized_checkpoint.grouped(handles, stored_format) if stored_format
                   else ((name, None) for name in handles))
        for name, parts in entries:
            where = handles[parts[0] if parts else name][0].name
            dim = split[0](name) if split is not None else None
            if dim is not None:
                yield name, where, (functools.partial(read_part, name, dim) if parts is None
                                    else functools.partial(read_quantized_part, name, parts, dim))
                continue
            yield name, where, (functools.partial(read, name) if parts is None
                                else functools.partial(read_quantized, parts))


def _sliced(source: TensorSource, shard_dim: Callable[[str], int | None], rank: int, size: int) -> TensorSource:
    """`source` with every split tensor read whole on the host, then sliced to the rank's part (GGUF files)."""
    with contextlib.closing(source):
        for name, where, read in source:
            dim = shard_dim(name)
            if dim is None:
                yield name, where, read
            else:
                yield name, where, functools.partial(lambda n, r, d: sharding.shard(n, r(), d, rank, size),
                                                     name, read, dim)


def _checked(name: str, where: str, value, want: torch.Size):
    """`value` if it has the shape the config implies for `name` (a QuantizedWeight: the weight's it stands for)."""
    if tuple(value.shape) != tuple(want):
        raise ValueError(f"weight {name} in {where} has shape {tuple(value.shape)}, the config implies {tuple(want)}")
    return value


def _layer_index(name: str) -> int | None:
    """The decoder layer a parameter belongs to (names are model.layers.<i>.…), None outside the layers."""
    parts = name.split(".", 3)
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def _finish_layer(layer: nn.Module, low_bit: str | None, tp: TensorParallel | None = None,
                  row_parallel: tuple[str, ...] = ()) -> None:
    layer.fuse()
    if low_bit and tp is not None and low_bit in INTEGER_FORMATS:
        # A row-parallel slice is quantized as a part of the whole row (its groups, its sym_int8 scale); the
        # column-parallel ones need nothing: their rows are whole.
        for module_name in row_parallel:
            parent_name, _, child_name = module_name.rpartition(".")
            parent = layer.get_submodule(parent_name)
            quantized = quantize_row_parallel(getattr(parent, child_name), low_bit, tp.size, tp.all_reduce_max)
            if quantized is not None:
                setattr(parent, child_name, quantized)
    if low_bit:
        quantize_linears(layer, low_bit)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, param_name, nn.Parameter(tensor, requires_grad=False))


def _assign_buffer(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, buffer_name = name.rpartition(".")
    buffer = model.get_buffer(name)
    model.get_submodule(module_name).register_buffer(buffer_name, tensor.to(buffer.dtype), persistent=False)


def _assign_quantized(model: nn.Module, name: str, where: str, weight: QuantizedWeight,
                      device: torch.device) -> None:
    """The projection `name` names the weight of becomes a QuantizedLinear of `weight` (its bias, loaded or still
    to come, carried over)."""
    module_name, _, _ = name.rpartition(".")
    parent_name, _, child_name = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, child_name)
    if type(linear) is not nn.Linear or _layer_index(name) is None:
        raise ValueError(f"weight {name} in {where} is quantized, but only decoder projections can be")
    offset = None if weight.offset is None else weight.offset.to(device)
    try:
        quantized = QuantizedLinear(weight.bits, weight.group_size, weight.qweight.to(device),
                                    weight.scale.to(device), offset, linear.bias)
    except ValueError as exc:
        raise ValueError(f"weight {name} in {where}: {exc}") from exc
    setattr(parent, child_name, quantized)


def load_tokenizer(tokenizer_dir: str | Path):
    """Fast tokenizer from tokenizer.json, or converted from a SentencePiece tokenizer.model, or a GGUF file's."""
    from transformers import AutoTokenizer

    if gguf_checkpoint.is_gguf(tokenizer_dir):
        return gguf_checkpoint.load_tokenizer(tokenizer_dir)
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
