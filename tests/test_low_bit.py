"""--load-in-low-bit on the CPU: every format with a CPU kernel loads the demo model, generates, and stays within
its stated error of float32; the kernels compute exactly what the stored weights say; a format without a kernel
on the device fails at start-up naming both; the worker and `inferq generate` take the flag.

Stated error bounds (CPU, demo model, float32 reference):
- the format's own error, ‖y - y_fp32‖ / ‖y_fp32‖ of layer 0's projections on random inputs: sym_int4 / asym_int4
  0.15 (4-bit grids on Gaussian weights give ~0.11), sym_int8 0.01, fp16 0.001, bf16 0.008;
- next-token logits after fixed prompts, worst prompt: sym_int4 / asym_int4 0.3, sym_int8 0.03, fp16 0.005,
  bf16 0.03 (the network adds to the projections' error).
"""
from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from engine.config import EngineConfig
from engine.llm import LLM
from engine.low_bit import (QuantizedLinear, from_fragments, pack_int4, quantize_int4, quantize_int8,
                             quantize_linears, to_fragments, unpack_int4, weight_bytes)
from engine.sampling_params import SamplingParams
from tests.checkpoints import ARCHITECTURES, write_checkpoint
from tests.service import MODEL, Service

PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "In the beginning"]
# format: (projection error bound, logits error bound, decoder-projection bytes / float32's at most)
BOUNDS = {"sym_int4": (0.15, 0.3, 0.2), "asym_int4": (0.15, 0.3, 0.2), "sym_int8": (0.01, 0.03, 0.27),
          "fp16": (0.001, 0.005, 0.5), "bf16": (0.008, 0.03, 0.5)}


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference.float()).norm() / reference.float().norm()).item()


@pytest.fixture(scope="module")
def reference(demo_model_dir):
    llm = LLM(str(demo_model_dir), device="cpu")
    return llm, [llm.engine.prompt_logits(p) for p in PROMPTS]


def projection_bytes(llm: LLM) -> int:
    return sum(weight_bytes(module) for layer in llm.engine.model.model.layers
               for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                              layer.mlp.down_proj))


@pytest.mark.parametrize("fmt", BOUNDS)
def test_format_loads_generates_and_stays_within_its_bound(fmt, demo_model_dir, reference):
    projection_bound, logits_bound, bytes_ratio = BOUNDS[fmt]
    ref_llm, ref_logits = reference
    llm = LLM(str(demo_model_dir), device="cpu", load_in_low_bit=fmt)
    assert llm.engine.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}.get(fmt, torch.float32)
    assert projection_bytes(llm) <= bytes_ratio * projection_bytes(ref_llm)

    # The format's own error: layer 0's projections against the checkpoint's float32 weights.
    weights = load_file(demo_model_dir / "model.safetensors")
    layer = llm.engine.model.model.layers[0]
    pairs = [(layer.self_attn.qkv_proj, ["q_proj", "k_proj", "v_proj"], "self_attn"),
             (layer.mlp.gate_up_proj, ["gate_proj", "up_proj"], "mlp"), (layer.mlp.down_proj, ["down_proj"], "mlp")]
    generator = torch.Generator().manual_seed(0)
    for module, names, block in pairs:
        weight = torch.cat([weights[f"model.layers.0.{block}.{n}.weight"] for n in names])
        x = torch.randn(8, weight.shape[1], generator=generator)
        error = relative_error(module(x.to(llm.engine.dtype)), x @ weight.t())
        assert error <= projection_bound, (fmt, names, error)

    logits_error = max(relative_error(llm.engine.prompt_logits(p), r) for p, r in zip(PROMPTS, ref_logits))
    assert logits_error <= logits_bound, (fmt, logits_error)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for output in llm.generate(PROMPTS, params):
        assert len(output.outputs[0].token_ids) == 12 and output.outputs[0].text
    stats = llm.engine.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


@pytest.mark.parametrize("fmt", ["sym_int4", "asym_int4", "sym_int8"])
def test_grid_rounds_to_nearest_and_the_cpu_kernel_multiplies_by_it(fmt):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    linear.weight.data = linear.weight.data * 0.5 + (0.02 if fmt == "asym_int4" else 0.0)
    layer = QuantizedLinear.from_linear(linear, fmt)
    assert layer.format == fmt and layer.scale.dtype == torch.float16
    q = unpack_int4(layer.qweight) if layer.bits == 4 else layer.qweight
    assert int(q.min()) >= (0 if layer.bits == 4 else -127) and int(q.max()) <= (15 if layer.bits == 4 else 127)
    dequantized = layer.dequantize()
    # Round to nearest: every weight within half a step of the grid (the range covers the group; a float16 scale
    # may fall short of the group's extreme by its rounding, 2^-11, which 7.5 steps turn into 0.004 of a step).
    step = layer.scale.float().repeat_interleave(layer.group_size, dim=1)
    assert bool(((dequantized - linear.weight).abs() <= step * 0.505 + 1e-6).all())
    if fmt == "asym_int4":  # 0 stays exact
        zero_point = -layer.offset.float() / layer.scale.float()
        assert torch.allclose(zero_point, zero_point.round(), atol=1e-2)
    # The CPU kernel multiplies by exactly these weights.
    x = torch.randn(5, 256)
    assert relative_error(layer(x), x @ dequantized.t() + linear.bias) < 1e-5


@pytest.mark.parametrize("fmt,layout,shape", [
    (fmt, "groups", (384 // 128, 48, 64)) for fmt in ("sym_int4", "asym_int4")] + [
    (fmt, "fragments", (384 // 128, 48 // 16, 256)) for fmt in ("sym_int4", "asym_int4")] + [
    ("sym_int8", "fragments", (384 // 64, 48 // 16, 256))])
def test_the_gpu_layouts_hold_the_same_weight(fmt, layout, shape):
    """A weight laid out for the GPU kernels (4-bit group by group, or 4- and 8-bit in fragments: the default off the
    CPU where they fit) stands for the same weight as the CPU's row-by-row one: the same rows back, the same
    dequantized weight and products, and a fused module of such parts keeps the layout."""
    torch.manual_seed(0)
    parts = [nn.Linear(384, n, bias=False) for n in (48, 32)]
    rows = [QuantizedLinear.from_linear(p, fmt) for p in parts]
    gpu = [QuantizedLinear(r.bits, r.group_size, r.qweight, r.scale, r.offset, layout=layout) for r in rows]
    assert rows[0].qweight.dim() == 2 and gpu[0].qweight.shape == shape
    assert torch.equal(gpu[0].rows_qweight, rows[0].qweight)
    assert torch.equal(gpu[0].dequantize(), rows[0].dequantize())
    x = torch.randn(3, 384)
    assert relative_error(gpu[0](x), rows[0](x)) < 1e-5  # the CPU computes it from the dequantized weight
    fused = QuantizedLinear.cat(gpu)
    assert fused.layout == layout and torch.equal(fused.rows_qweight, QuantizedLinear.cat(rows).qweight)


def test_a_4_bit_fragment_word_holds_the_mma_register_pairs():
    """to_fragments' 4-bit order: word (h, g, t, p) of row 16j + 8h + g holds at bits 4i and 16 + 4i the adjacent
    inputs 2t + 8·(p // 2) and + 1 of slice 4·(p % 2) + i, so one masked OR turns a shifted word into the tensor
    cores' register for two weights."""
    torch.manual_seed(0)
    n, k = 32, 256
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    words = to_fragments(pack_int4(q)).reshape(k // 128, n // 16, 2, 8, 4, 4)
    for b, j, h, g, t, p, i, e in itertools.product(range(k // 128), range(n // 16), range(2), range(8), range(4),
                                                    range(4), range(4), range(2)):
        nibble = (int(words[b, j, h, g, t, p]) >> (4 * i + 16 * e)) & 0xF
        assert nibble == q[16 * j + 8 * h + g, 128 * b + 16 * (4 * (p % 2) + i) + 8 * (p // 2) + 2 * t + e]
    assert torch.equal(from_fragments(to_fragments(pack_int4(q)), n), pack_int4(q))


@pytest.mark.parametrize("bits,n,group,layout", [(4, 48, 128, "fragments"), (4, 40, 128, "groups"),
                                                 (4, 48, 32, "groups"), (8, 48, 256, "fragments"),
                                                 (8, 48, 64, "fragments"), (8, 40, 256, "rows"), (8, 48, 32, "rows")])
def test_off_the_cpu_weights_take_fragments_where_they_fit(bits, n, group, layout):
    """The default layout off the CPU (a tensor on the meta device stands for a GPU's): fragments for groups of 128
    (4-bit) or 64 (8-bit, one scale a row included) and whole blocks of 16 rows; otherwise (odd N, GGUF Q4_0's and
    Q8_0's groups of 32) group by group for 4 bits, row by row for 8; rows on the CPU."""
    weight = torch.randn(n, 256)
    if bits == 4:
        qweight, scale, _ = quantize_int4(weight, group, symmetric=True)
    else:
        qweight, scale = quantize_int8(weight, group)
    assert QuantizedLinear(bits, group, qweight.to("meta"), scale.to("meta")).layout == layout
    assert QuantizedLinear(bits, group, qweight, scale).layout == "rows"


def test_a_layout_the_weight_cannot_take_is_refused():
    """Fragments need groups of 128 inputs (4-bit) or 64 (8-bit) and whole blocks of 16 rows; 8-bit weights are
    never group by group."""
    weight = QuantizedLinear.from_linear(nn.Linear(384, 40, bias=False), "sym_int4")
    with pytest.raises(ValueError, match="no 'fragments' layout for a 4-bit weight of 40 rows"):
        QuantizedLinear(4, 128, weight.qweight, weight.scale, layout="fragments")
    int8 = QuantizedLinear.from_linear(nn.Linear(384, 48, bias=False), "sym_int8")
    with pytest.raises(ValueError, match="no 'groups' layout for a 8-bit weight"):
        QuantizedLinear(8, int8.group_size, int8.qweight, int8.scale, layout="groups")
    q8_0 = quantize_int8(torch.randn(48, 384), 32)
    with pytest.raises(ValueError, match="no 'fragments' layout for a 8-bit weight of 48 rows in groups of 32"):
        QuantizedLinear(8, 32, *q8_0, layout="fragments")


def test_format_without_a_kernel_fails_at_start_up(demo_model_dir):
    with pytest.raises(ValueError, match=r"fp8 has no kernel on cpu"):
        LLM(str(demo_model_dir), device="cpu", load_in_low_bit="fp8")
    with pytest.raises(ValueError, match="load_in_low_bit must be one of sym_int4, asym_int4"):
        EngineConfig(model=str(demo_model_dir), load_in_low_bit="int3")
    with pytest.raises(ValueError, match="fp16 on cpu computes in float16, but dtype float32 was asked for"):
        LLM(str(demo_model_dir), device="cpu", load_in_low_bit="fp16", dtype="float32")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_cli_takes_the_flag(demo_model_dir):
    args = ["generate", "--model", str(demo_model_dir), "--device", "cpu", "--prompt", PROMPTS[0], "--max-tokens", "8"]
    result = run_cli(*args, "--load-in-low-bit", "sym_int8")
    assert result.returncode == 0, result.stderr
    expected = LLM(str(demo_model_dir), device="cpu", load_in_low_bit="sym_int8").generate(
        PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0].text
    assert result.stdout == expected + "\n"
    failed = run_cli(*args, "--load-in-low-bit", "fp8")
    assert failed.returncode == 2 and "fp8 has no kernel on cpu" in failed.stderr
    refused = run_cli(*args, "--load-in-low-bit", "int3")
    assert refused.returncode == 2 and "invalid choice: 'int3'" in refused.stderr


def test_worker_serves_a_low_bit_model_and_announces_it(redis_url, demo_model_dir, tmp_path):
    service = Service(redis_url, demo_model_dir, tmp_path)
    try:
        service.start_worker(extra_args=("--load-in-low-bit", "sym_int4"))
        service.start_api()
        with service.client() as client:
            models = client.get("/v1/models").json()["data"]
            assert [(m["id"], m["load_in_low_bit"]) for m in models] == [(MODEL, ["sym_int4"])]
            response = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 6,
                                                            "temperature": 0, "ignore_eos": True})
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 6
    finally:
        service.stop()


def test_worker_with_a_format_the_device_lacks_exits_at_start_up(redis_url, demo_model_dir, tmp_path):
    service = Service(redis_url, demo_model_dir, tmp_path)
    try:
        with pytest.raises(RuntimeError, match="process exited"):
            service.start_worker(extra_args=("--load-in-low-bit", "fp8"))
        assert service.worker.returncode == 2
        assert "fp8 has no kernel on cpu" in (tmp_path / "worker.log").read_text()
        assert not service.store.registry.workers(MODEL)
    finally:
        service.stop()


@pytest.mark.parametrize("fmt", ["sym_int4", "asym_int4", "sym_int8"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_computes_with_exactly_the_quantized_weights(arch, fmt, tmp_path):
    """Oracle: transformers on the same checkpoint with each decoder projection replaced by its dequantized
    weights (the format's stated scheme, recomputed here per projection, unfused). Biases (Qwen2's q/k/v), tied
    heads, GQA and sliding windows all pass through; fusing q/k/v and gate/up before quantizing changes nothing,
    since groups and scales never span two output rows."""
    reference = write_checkpoint(tmp_path, arch)
    for layer in reference.model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                       layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            linear.weight.data = dequantized(linear.weight.data, fmt)
    prompt = [5, 17, 42, 9, 100, 3]
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt])).logits[0, -1]
    llm = LLM(str(tmp_path), device="cpu", skip_tokenizer_init=True, load_in_low_bit=fmt)
    assert relative_error(llm.engine.prompt_logits(prompt), expected) < 1e-4
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5


def dequantized(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    return QuantizedLinear.from_linear(linear, fmt).dequantize(weight.dtype)
