"""Pre-quantized checkpoints (`inferq quantize`, engine/quantized_checkpoint.py): written from the demo model in each
integer format, they hold no 16-bit projection and load to exactly the model that quantizing at load time builds;
the format they store is the engine's; a different one asked for, or a damaged checkpoint, fails clearly."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.llm import LLM
from engine.low_bit import QuantizedLinear
from engine.quantized_checkpoint import save_quantized
from engine.sampling_params import SamplingParams

FORMATS = ("sym_int4", "asym_int4", "sym_int8")
PROMPTS = ["The quick brown fox", "Once upon a time", "def main():"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def tensor_names(directory: Path) -> set[str]:
    names = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names.update(f.keys())
    return names


@pytest.fixture(scope="module")
def saved(demo_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {fmt: save_quantized(demo_model_dir, root / fmt, fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_saved_checkpoint_loads_as_the_16_bit_one_quantized_at_load(fmt, demo_model_dir, saved):
    directory = saved[fmt]
    names = tensor_names(directory)
    assert not [n for n in names if n.endswith("_proj.weight")]
    assert {n.rpartition(".")[2] for n in names if "_proj." in n} == (
        {"qweight", "scale", "offset"} if fmt == "asym_int4" else {"qweight", "scale"})
    assert weight_bytes(directory) < weight_bytes(demo_model_dir)
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "inferq", "format": fmt,
                                             "group_size": -1 if fmt == "sym_int8" else 64}
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (directory / name).is_file()

    expected = LLM(str(demo_model_dir), device="cpu", load_in_low_bit=fmt)
    loaded = LLM(str(directory), device="cpu")
    assert loaded.engine.load_in_low_bit == fmt
    layer = loaded.engine.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantizedLinear) and layer.self_attn.qkv_proj.format == fmt
    for prompt in PROMPTS:
        want = expected.engine.prompt_logits(prompt)
        assert ((loaded.engine.prompt_logits(prompt) - want).norm() / want.norm()).item() < 1e-5
    assert ([o.outputs[0].token_ids for o in loaded.generate(PROMPTS, GREEDY)]
            == [o.outputs[0].token_ids for o in expected.generate(PROMPTS, GREEDY)])
    assert LLM(str(directory), device="cpu", load_in_low_bit=fmt).engine.load_in_low_bit == fmt  # its own: fine


def test_sharded_checkpoint_has_an_index_and_loads(demo_model_dir, saved, tmp_path):
    directory = save_quantized(demo_model_dir, tmp_path / "sharded", "sym_int4", shard_bytes=200_000)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == tensor_names(saved["sym_int4"])
    ids = LLM(str(directory), device="cpu").engine.prompt_logits(PROMPTS[0])
    assert torch.equal(ids, LLM(str(saved["sym_int4"]), device="cpu").engine.prompt_logits(PROMPTS[0]))


def test_a_format_other_than_the_checkpoints_is_refused(saved):
    for asked in ("asym_int4", "sym_int8", "fp16", "bf16"):
        with pytest.raises(ValueError, match=f"checkpoint is pre-quantized as sym_int4; load_in_low_bit {asked} "
                                             "was asked for"):
            LLM(str(saved["sym_int4"]), device="cpu", load_in_low_bit=asked)


def damaged_copy(source: Path, target: Path, damage) -> Path:
    """A copy of `source` whose tensors `damage` edited (a dict of name -> tensor, changed in place)."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    damage(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_a_damaged_checkpoint_fails_naming_the_tensor(saved, tmp_path):
    prefix = "model.layers.0.self_attn.q_proj"

    def truncate(tensors):
        tensors[f"{prefix}.scale"] = tensors[f"{prefix}.scale"][:-1].clone()

    truncated = damaged_copy(saved["sym_int4"], tmp_path / "truncated", truncate)
    with pytest.raises(ValueError, match=rf"weight {prefix}\.weight in model\.safetensors: inconsistent 4-bit weight"):
        LLM(str(truncated), device="cpu")

    missing = damaged_copy(saved["sym_int4"], tmp_path / "missing", lambda t: t.pop(f"{prefix}.scale"))
    with pytest.raises(ValueError, match=rf"quantized weight {prefix} \(sym_int4\) is incomplete: no scale tensor"):
        LLM(str(missing), device="cpu")

    no_offset = damaged_copy(saved["asym_int4"], tmp_path / "no-offset", lambda t: t.pop(f"{prefix}.offset"))
    with pytest.raises(ValueError, match=rf"quantized weight {prefix} \(asym_int4\) is incomplete: no offset tensor"):
        LLM(str(no_offset), device="cpu")

    no_layer = damaged_copy(saved["sym_int8"], tmp_path / "no-layer",
                            lambda t: [t.pop(n) for n in list(t) if n.startswith("model.layers.1.mlp.down_proj")])
    with pytest.raises(ValueError, match=r"weights missing from the checkpoint: \['model.layers.1.mlp.down_proj"):
        LLM(str(no_layer), device="cpu")


def test_save_refuses_what_it_cannot_write(demo_model_dir, saved, tmp_path):
    with pytest.raises(ValueError, match="fp8 is applied at load time"):
        save_quantized(demo_model_dir, tmp_path / "fp8", "fp8")
    with pytest.raises(ValueError, match="is already quantized"):
        save_quantized(saved["sym_int8"], tmp_path / "twice", "sym_int4")
    with pytest.raises(ValueError, match="exists and is not empty"):
        save_quantized(demo_model_dir, saved["sym_int8"], "sym_int4")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=300)


def test_quantize_command(demo_model_dir, saved, tmp_path):
    output = tmp_path / "cli"
    result = run_cli("quantize", "--model", str(demo_model_dir), "--load-in-low-bit", "asym_int4",
                     "--output", str(output))
    assert result.returncode == 0, result.stderr
    line, = result.stdout.splitlines()
    assert line.startswith(f"{output}: asym_int4, weights ") and line.endswith(" MB")
    assert tensor_names(output) == tensor_names(saved["asym_int4"])
    refused = run_cli("quantize", "--model", str(demo_model_dir), "--load-in-low-bit", "fp16", "--output",
                      str(tmp_path / "fp16"))
    assert refused.returncode == 2 and "fp16 is applied at load time" in refused.stderr
