"""GGUF files (llama.cpp's format) as checkpoints: `--model file.gguf`, as vLLM and llama.cpp take them.

The file holds everything: the config and the tokenizer in its metadata, the weights as tensors. Tensors come out
under our (Hugging Face) names, for engine/loader.py to assign like a safetensors checkpoint's:

- Q4_0, Q4_1 and Q8_0 blocks are sym_int4, asym_int4 and sym_int8 with groups of 32 as they lie in the file
  (engine/low_bit.py's layout is GGUF's): their bytes become QuantizedWeight tensors through numpy views, with no
  16-bit copy on the way.
- F32, F16 and BF16 tensors, and every non-projection tensor (embeddings, norms, the head), come as float32, which
  the loader casts to the compute dtype.
- Projections of any other type (K-quants, IQ types, Q5_0, ...) are dequantized and quantized again into the
  file's format (the mapped format most projection weights are in); in a file with none they stay in floats.
  Projections fused into one GEMM (q, k, v; gate, up) must share a format: where theirs differ, they are all
  brought to the file's format.

llama.cpp's converter permutes the rows of Llama's q and k projections for its RoPE layout; they are permuted back
here, as transformers does (its reverse permute in the GGUF Llama tensor processor). A permutation of output rows,
so it applies to a quantized tensor's rows of blocks as it does to a float weight.
"""
from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from engine.low_bit import QuantizedWeight, quantize_weight
from engine.models.rope import rope_parameters

log = logging.getLogger(__name__)

QUANT_METHOD = "gguf"  # quantization_config["quant_method"] of a config read from a GGUF file
BLOCK = 32  # inputs per block of Q4_0, Q4_1 and Q8_0: their group size

# general.architecture -> (transformers model type, our architecture name). llama.cpp files Mistral models as
# llama too and runs them without a sliding window, as we then do.
_ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}
# Architectures whose q and k rows llama.cpp's converter permuted (its LlamaModel; Qwen2 keeps the HF order).
_PERMUTED_QK = ("llama",)

_LAYER_TENSORS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                  "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj",
                  "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_FUSED = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))  # engine/models/llama.py's fuse()
_MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's rope scaling, as per-frequency divisors


def _types():
    import gguf

    return gguf.GGMLQuantizationType


def _mapped_formats() -> dict:
    """Block types whose bytes are one of our formats as they lie."""
    t = _types()
    return {t.Q4_0: "sym_int4", t.Q4_1: "asym_int4", t.Q8_0: "sym_int8"}


def is_gguf(model: str | Path) -> bool:
    return str(model).endswith(".gguf")


@functools.lru_cache(maxsize=1)
def _open(path: str, mtime_ns: int, size: int):
    """One reader for load_config and load_model: parsing the metadata takes seconds with a large vocabulary (each
    token is a field part: ~3 s for 49k tokens on 2 cores)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - the reader fails with whatever the corrupt bytes lead to
        raise ValueError(f"{path} is not a readable GGUF file: {type(exc).__name__}: {exc}") from exc


def open_gguf(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    stat = os.stat(path)
    return _open(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def load_config(path: str | Path):
    """The transformers config the file's metadata describes (transformers' own GGUF key mapping), with
    quantization_config {"quant_method": "gguf", "format": the file's format or None}. ValueError for an
    architecture we do not run."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCHITECTURES)}")
    model_type, architecture = _ARCHITECTURES[arch]
    params: dict = {}
    for prefix, mapping in ((arch, GGUF_CONFIG_MAPPING[arch]), ("tokenizer", GGUF_CONFIG_MAPPING["tokenizer"])):
        for key, name in mapping.items():
            value = _field(reader, f"{prefix}.{key}")
            if name and value is not None:
                params[name] = value
    names = {t.name for t in reader.tensors}
    params["tie_word_embeddings"] = "output.weight" not in names
    params.setdefault("vocab_size", len(_field(reader, "tokenizer.ggml.tokens", ())))
    params.update(_rope_scaling(reader, arch, params))
    # llama.cpp ends a generation at any end-of-generation token: EOS, and EOT / EOM where the file names them
    # (Llama 3's <|eot_id|>, <|eom_id|>).
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    if eos:
        params["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    config = AutoConfig.for_model(model_type, **params)
    config.architectures = [architecture]
    config.dtype = _float_dtype(reader)
    config.quantization_config = {"quant_method": QUANT_METHOD, "format": file_format(reader)}
    return config


def _rope_scaling(reader, arch: str, params: dict) -> dict:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return {}
    if kind == "linear":
        return {"rope_parameters": {"rope_type": "linear", "rope_theta": params.get("rope_theta", 10000.0),
                                    "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}}
    raise ValueError(f"GGUF rope scaling {kind!r} is not supported (linear is)")


def _float_dtype(reader) -> str:
    """The checkpoint dtype for `--dtype auto` on accelerators: a 16-bit file's own, else bfloat16 (the weights of a
    quantized file are in no float dtype; its norms are F32)."""
    t = _types()
    kinds = {tensor.tensor_type for tensor in reader.tensors}
    return "float16" if t.F16 in kinds and t.BF16 not in kinds else "bfloat16"


def file_format(reader) -> str | None:
    """The mapped format most projection weights (by elements) are stored in, None where none is."""
    mapped = _mapped_formats()
    counts = Counter()
    for tensor in reader.tensors:
        if _projection(tensor.name) and tensor.tensor_type in mapped:
            counts[mapped[tensor.tensor_type]] += int(tensor.n_elements)
    return counts.most_common(1)[0][0] if counts else None


def _projection(gguf_name: str) -> str | None:
    """'attn_q' for 'blk.3.attn_q.weight', None for anything but a decoder projection's weight."""
    parts = gguf_name.split(".")
    return parts[2] if len(parts) == 4 and parts[0] == "blk" and parts[2] in _PROJECTIONS \
        and parts[3] == "weight" else None


def hf_name(gguf_name: str) -> str | None:
    """Our parameter name for a GGUF tensor name, None where there is none."""
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in _MODEL_TENSORS:
        return f"{_MODEL_TENSORS[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def _targets(reader, fmt: str | None) -> dict[str, str | None]:
    """GGUF projection name -> the format it is loaded in (None: floats). Kept as stored where its type is a mapped
    one (or a float) agreeing with its fused siblings'; otherwise brought to the file's format `fmt`."""
    mapped = _mapped_formats()
    t = _types()
    floats = (t.F32, t.F16, t.BF16)
    by_name = {tensor.name: tensor.tensor_type for tensor in reader.tensors if _projection(tensor.name)}

    def as_stored(kind):
        return mapped.get(kind, None if kind in floats else fmt)

    targets = {name: as_stored(kind) for name, kind in by_name.items()}
    for name in by_name:
        block = name.split(".")[1]
        for group in _FUSED:
            if _projection(name) not in group:
                continue
            siblings = [f"blk.{block}.{p}.weight" for p in group if f"blk.{block}.{p}.weight" in targets]
            if len({targets[s] for s in siblings}) > 1:
                targets.update({s: fmt for s in siblings})
    return targets


def tensors(path: str | Path, config) -> Iterator[tuple[str, str, Callable[[], torch.Tensor | QuantizedWeight]]]:
    """(our name, where, read) for every tensor of the file, in file order (engine/loader.py's tensor source).
    A tensor with no name of ours comes under its GGUF name, which the loader reports as unexpected."""
    reader = open_gguf(path)
    fmt = config.quantization_config["format"]
    targets = _targets(reader, fmt)
    arch = _field(reader, "general.architecture")
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads or config.num_attention_heads}
    mapped = _mapped_formats()
    where = Path(path).name
    requantized = Counter()
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            yield "rope.inv_freq", where, functools.partial(_inv_freq, tensor, config)
            continue
        parts = tensor.name.split(".")
        permute = heads.get(parts[2]) if arch in _PERMUTED_QK and len(parts) == 4 and parts[0] == "blk" else None
        target = targets.get(tensor.name)
        if target is not None and mapped.get(tensor.tensor_type) != target:
            requantized[tensor.tensor_type.name] += 1
        yield hf_name(tensor.name) or tensor.name, where, functools.partial(_read, tensor, target, permute)
    if requantized:
        log.warning("%s: %s projections were dequantized and quantized again into %s (groups of %d): %s has no "
                    "direct mapping, or fused projections came in different formats", Path(path).name,
                    sum(requantized.values()), fmt, BLOCK, ", ".join(sorted(requantized)))
    _open.cache_clear()  # loaded: let the file's memory map go


def _read(tensor, target: str | None, heads: int | None) -> torch.Tensor | QuantizedWeight:
    from gguf.quants import dequantize

    rows = tensor.data  # [rows, bytes of a row] for block types, [rows, K] (or [K]) for floats
    if heads:
        rows = _unpermute(rows, heads)
    if target is not None and _mapped_formats().get(tensor.tensor_type) == target:
        return _blocks(np.asarray(rows), tensor.tensor_type)
    weight = torch.from_numpy(np.array(dequantize(rows, tensor.tensor_type), dtype=np.float32))
    return weight if target is None else quantize_weight(weight, target, BLOCK)


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's permute(w, n_head, n_head_kv) of q or k (transformers' _reverse_permute_weights): within each
    head, rows that llama.cpp interleaved (pairs of rotary halves) go back to the HF order."""
    dim = rows.shape[0] // heads // 2
    return rows.reshape(heads, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def _blocks(rows: np.ndarray, kind) -> QuantizedWeight:
    """Q4_0 (d, qs[16]), Q4_1 (d, m, qs[16]) or Q8_0 (d, qs[32]) blocks, [rows, blocks * block bytes] -> our
    tensors: the float16 d are the scales, Q4_1's m the offsets, the qs bytes the qweight (4-bit: input j in the low
    nibble, j + 16 in the high one, as ours)."""
    from gguf import GGML_QUANT_SIZES

    t = _types()
    n = rows.shape[0]
    blocks = rows.reshape(n, -1, GGML_QUANT_SIZES[kind][1])

    def halves(start: int) -> torch.Tensor:  # a float16 field of every block, [rows, blocks]
        return torch.from_numpy(np.ascontiguousarray(blocks[:, :, start:start + 2]).view(np.float16).reshape(n, -1))

    quants_at = 4 if kind == t.Q4_1 else 2
    qs = np.ascontiguousarray(blocks[:, :, quants_at:]).reshape(n, -1)
    qweight = torch.from_numpy(qs.view(np.int8) if kind == t.Q8_0 else qs)
    return QuantizedWeight(8 if kind == t.Q8_0 else 4, BLOCK, qweight, halves(0),
                           halves(2) if kind == t.Q4_1 else None)


def _inv_freq(tensor, config) -> torch.Tensor:
    """Rotary frequencies with llama.cpp's frequency factors (Llama 3.1's rope scaling): it rotates by
    pos * base^(-2i / d) / factor_i."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = rope_parameters(config)["rope_theta"]
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (base / torch.from_numpy(np.array(tensor.data, dtype=np.float64))).float()


def load_tokenizer(path: str | Path):
    """transformers' tokenizer built from the file's metadata (vocabulary, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
