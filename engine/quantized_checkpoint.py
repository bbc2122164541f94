"""Pre-quantized checkpoints: a Hugging Face directory whose decoder projections are stored in an integer format
(`inferq quantize`), so that a worker starts without the 16-bit weights on disk and without quantizing them.

Each projection `<prefix>.weight` [N, K] is stored as QuantizedLinear holds it in memory (engine/low_bit.py):
`<prefix>.qweight`, `<prefix>.scale` and, for asym_int4, `<prefix>.offset`. The bits follow from qweight's dtype
(uint8: two 4-bit values a byte; int8) and each projection's group size from its shapes (K / the scale's width),
so config.json only names the format:

    "quantization_config": {"quant_method": "inferq", "format": "sym_int4", "group_size": 128}

(group_size: what the format uses where the width allows, -1 for one scale per row; informative). Every other
tensor, biases included, is kept as the source stores it, and so is a projection whose width has no group size
(as the loader leaves it when it quantizes a 16-bit checkpoint).
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.low_bit import INTEGER_FORMATS, quantize_weight

QUANT_METHOD = "inferq"
PARTS = ("qweight", "scale", "offset")
SHARD_BYTES = 2_000_000_000
_PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
# What a checkpoint directory holds besides its weights and config.json, all copied (tokenizer files,
# generation_config.json, chat templates, ...); these are not.
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "config.json")


def save_quantized(src_dir: str | Path, dst_dir: str | Path, fmt: str, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `src_dir` (a 16-bit or float32 HF checkpoint) to `dst_dir` with its decoder projections in `fmt`.
    Tensors are read one at a time, and written in shards of about `shard_bytes`: memory holds one shard at most.
    The directory appears whole or not at all (written as <dst>.partial, then renamed)."""
    from engine.loader import check_model_dir, read_json, safetensors_files
    from engine.models import model_class

    if fmt not in INTEGER_FORMATS:
        raise ValueError(f"inferq quantize writes {', '.join(INTEGER_FORMATS)}; {fmt} is applied at load time "
                         "(--load-in-low-bit) instead")
    src, dst = check_model_dir(src_dir), Path(dst_dir)
    config = read_json(src / "config.json")
    model_class(config.get("architectures"))
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} exists and is not empty")
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    group_sizes: set[int] = set()
    shards = _ShardWriter(partial, shard_bytes)
    for file in safetensors_files(src):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                quantized = quantize_weight(tensor, fmt) if _PROJECTION.fullmatch(name) else None
                if quantized is None:
                    shards.add(name, tensor)
                    continue
                group_sizes.add(quantized.group_size)
                prefix = name.removesuffix(".weight")
                for part, value in zip(PARTS, (quantized.qweight, quantized.scale, quantized.offset)):
                    if value is not None:
                        shards.add(f"{prefix}.{part}", value)
    shards.close()

    group_size = -1 if fmt == "sym_int8" else max(group_sizes, default=-1)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "format": fmt, "group_size": group_size}
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for item in src.iterdir():
        if item.is_file() and not any(item.match(pattern) for pattern in _WEIGHT_FILES):
            shutil.copy2(item, partial / item.name)
    if dst.exists():
        dst.rmdir()
    partial.rename(dst)
    return dst


class _ShardWriter:
    """Tensors in, safetensors shards out (HF's names and index): a shard is written once it would pass the size."""

    def __init__(self, directory: Path, shard_bytes: int) -> None:
        self.directory, self.shard_bytes = directory, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self.written):05d}.tmp"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards as HF does: one is model.safetensors; several get model.safetensors.index.json."""
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.directory / "model.safetensors")
            return
        count, weight_map = len(self.written), {}
        for i, (path, names) in enumerate(self.written, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n",
                                                                      encoding="utf-8")


def grouped(names: Iterable[str], fmt: str) -> Iterator[tuple[str, tuple[str, str, str | None] | None]]:
    """A pre-quantized checkpoint's tensor names -> (name to load, None) for a plain tensor, or (<prefix>.weight,
    (qweight, scale, offset or None) names) for a quantized projection, at its qweight's place. ValueError where a
    projection lacks a part `fmt` needs, or has one it does not."""
    names = list(names)
    present = set(names)
    for name in names:
        prefix, _, part = name.rpartition(".")
        if part not in PARTS:
            yield name, None
            continue
        parts = {p: f"{prefix}.{p}" for p in PARTS if f"{prefix}.{p}" in present}
        wanted = {"qweight", "scale"} | ({"offset"} if fmt == "asym_int4" else set())
        if set(parts) != wanted:
            missing, extra = sorted(wanted - set(parts)), sorted(set(parts) - wanted)
            raise ValueError(f"quantized weight {prefix} ({fmt}) is incomplete: "
                             + "; ".join(filter(None, [missing and f"no {', '.join(missing)} tensor",
                                                       extra and f"an unexpected {', '.join(extra)} tensor"])))
        if part == "qweight":
            yield f"{prefix}.weight", (parts["qweight"], parts["scale"], parts.get("offset"))
