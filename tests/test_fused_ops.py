"""The fused Triton kernels (engine/fused_kernels.py) against the torch implementations in engine/fused_ops.py,
which carry transformers' exact maths; and greedy outputs of the engine with the kernels forced on, against
transformers.

Without a GPU the kernels run in Triton's CPU interpreter (conftest.py switches it on), so shapes stay small in the
token dimension; half precision needs a GPU.
"""
from __future__ import annotations

import pytest
import torch

from engine import fused_ops
from engine.device import resolve_device

DEVICE = resolve_device("auto")
ON_GPU = DEVICE.type != "cpu"
pytest.importorskip("triton")  # on the CPU, conftest.py has switched Triton to its interpreter

from engine import fused_kernels  # noqa: E402

# float32 differs from torch only in summation order and fused multiply-adds; half precision also in rounding once
# (the kernels) instead of after each op (torch).
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if ON_GPU else [])
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
              torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """For long dot products: the absolute tolerance scales with the largest output, since summation order alone
    moves a float32 sum of thousands of terms by more than 1e-5."""
    tolerance = TOLERANCES[expected.dtype]["rtol"]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance,
                               atol=tolerance * expected.float().abs().max().item())


def random(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[expected.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100, 2048, 4096])
def test_rms_norm(hidden: int, dtype: torch.dtype):
    x, weight = random(3, hidden, dtype=dtype, seed=0), random(hidden, dtype=dtype, seed=1)
    assert_close(fused_kernels.rms_norm_triton(x, weight, 1e-5), fused_ops.rms_norm_torch(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100, 2048, 4096])
def test_rms_norm_with_residual_writes_the_sum_into_residual(hidden: int, dtype: torch.dtype):
    x, weight = random(3, hidden, dtype=dtype, seed=0), random(hidden, dtype=dtype, seed=1)
    residual = random(3, hidden, dtype=dtype, seed=2)
    expected_out, expected_sum = fused_ops.rms_norm_torch(x, weight, 1e-6, residual)
    x_before = x.clone()
    out, summed = fused_kernels.rms_norm_triton(x, weight, 1e-6, residual)
    assert summed is residual
    assert torch.equal(summed, expected_sum), "the sum is one rounding in either implementation"
    assert torch.equal(x, x_before)
    assert_close(out, expected_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 96, 5632, 11008])
def test_silu_and_mul(inter: int, dtype: torch.dtype):
    gate_up = random(3, 2 * inter, dtype=dtype, seed=0) * 4
    assert_close(fused_kernels.silu_and_mul_triton(gate_up), fused_ops.silu_and_mul_torch(gate_up))


def positions_cos_sin(num_tokens: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin as RotaryEmbedding.cos_sin builds them: the frequencies repeated in both halves."""
    positions = torch.tensor([0, 1, 7, 300, 4095][:num_tokens], device=DEVICE).float()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (6, 1, 80), (3, 3, 16)])
def test_apply_rotary_on_views_of_a_fused_qkv(num_heads: int, num_kv_heads: int, head_dim: int,
                                             dtype: torch.dtype):
    num_tokens = 5
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = random(num_tokens, q_size + 2 * kv_size, dtype=dtype, seed=0)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    cos, sin = positions_cos_sin(num_tokens, head_dim, dtype)
    expected_q, expected_k = fused_ops.apply_rotary_torch(q, k, cos, sin)
    v_before = v.clone()
    out_q, out_k = fused_kernels.apply_rotary_triton(q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr(), "rotated in place"
    assert_close(out_q, expected_q)
    assert_close(out_k, expected_k)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features,in_features", [(40, 64), (33, 100), (8, 1536), (130, 4096)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv(out_features: int, in_features: int, bias: bool, dtype: torch.dtype):
    """One row through the GEMV against F.linear: K a multiple of the tile or not, N a multiple of the rows a
    program takes or not."""
    x, weight = random(1, in_features, dtype=dtype, seed=0), random(out_features, in_features, dtype=dtype, seed=1)
    b = random(out_features, dtype=dtype, seed=2) if bias else None
    assert_close_to_scale(fused_kernels.gemv_triton(x, weight, b), torch.nn.functional.linear(x, weight, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features,inter", [(40, 64), (33, 100), (16, 11008)])
def test_gemv_of_silu_and_mul(out_features: int, inter: int, dtype: torch.dtype):
    """The down projection of one row with SiLU-and-mul in its input loads equals the two ops one after the other,
    the intermediate rounded to the dtype in both."""
    gate_up, weight = random(1, 2 * inter, dtype=dtype, seed=0) * 4, random(out_features, inter, dtype=dtype, seed=1)
    expected = torch.nn.functional.linear(fused_ops.silu_and_mul_torch(gate_up), weight)
    assert_close_to_scale(fused_kernels.gemv_triton(gate_up, weight, silu_mul=True), expected)


def test_gemv_takes_only_single_rows_of_plain_float_weights(monkeypatch):
    """Batches, int8 weights and mismatched dtypes keep their own paths; a GPU tensor is faked by routing every
    device to the kernels."""
    monkeypatch.setattr(fused_ops, "_triton_for", lambda x: fused_kernels)
    weight = torch.randn(8, 16)
    assert fused_ops._gemv_kernels_for(torch.randn(1, 16), weight) is fused_kernels
    assert fused_ops._gemv_kernels_for(torch.randn(2, 16), weight) is None
    assert fused_ops._gemv_kernels_for(torch.randn(1, 16), weight.to(torch.int8)) is None
    assert fused_ops._gemv_kernels_for(torch.randn(1, 16, dtype=torch.float64), weight) is None
    assert fused_ops._gemv_kernels_for(torch.randn(1, 16), weight.t().contiguous().t()) is None


def test_empty_batches():
    x = torch.empty(0, 64, device=DEVICE)
    assert fused_kernels.rms_norm_triton(x, torch.ones(64, device=DEVICE), 1e-5).shape == (0, 64)
    assert fused_kernels.silu_and_mul_triton(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)


def test_cpu_tensors_take_the_torch_path():
    """The default dispatch on the CPU is torch, bit for bit, and leaves the residual alone."""
    x, weight, residual = torch.randn(2, 64), torch.randn(64), torch.randn(2, 64)
    residual_before = residual.clone()
    out, summed = fused_ops.rms_norm(x, weight, 1e-5, residual)
    expected_out, expected_sum = fused_ops.rms_norm_torch(x, weight, 1e-5, residual)
    assert torch.equal(out, expected_out) and torch.equal(summed, expected_sum)
    assert torch.equal(residual, residual_before)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the engine takes the Triton path anyway (tests/test_parity.py)")
def test_engine_with_triton_kernels_matches_transformers(tmp_path, monkeypatch):
    """The model's forward with every fused op on its Triton kernel (interpreted, on the CPU): the residual
    threading, the in-place writes and the kernels together still give transformers' greedy tokens."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.checkpoints import greedy_reference, write_checkpoint

    monkeypatch.setattr(fused_ops, "_triton_for", lambda x: fused_kernels)
    reference_model = write_checkpoint(tmp_path, "llama3-gqa-tied")
    prompts = [[5, 17, 300, 42, 8, 99, 123], [7], [400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411]]
    references = [greedy_reference(reference_model, prompt, 8) for prompt in prompts]
    llm = LLM(str(tmp_path), skip_tokenizer_init=True)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert [output.outputs[0].token_ids for output in outputs] == references
    # One request at a time: every decode step is a single row, so the projections run as GEMVs.
    alone = [llm.generate([prompt], params)[0] for prompt in prompts]
    assert [output.outputs[0].token_ids for output in alone] == references
