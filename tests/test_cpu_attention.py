"""The CPU's decode kernel, which reads the paged cache in place (engine/attention/cpu_kernels.py), against the
torch backend's gather-then-SDPA path on the same steps: every case of the Triton kernel tests (GQA, head sizes,
block sizes, sliding windows, mixed steps), float32 and bfloat16."""
from __future__ import annotations

import pytest
import torch

from engine.attention.cpu_kernels import cpu_kernels
from engine.attention.torch_backend import TorchAttentionBackend
from tests.test_triton_attention import CASES, forward, make_steps

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernel could not be built here")

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_cpu_kernel_matches_the_gather_path(name: str, dtype: torch.dtype) -> None:
    case = CASES[name]
    gathered, in_place = make_steps(case, dtype, CPU)[0], make_steps(case, dtype, CPU)[0]
    expected = forward(TorchAttentionBackend(CPU, use_cpu_kernel=False), gathered, case.sliding_window)
    kernel = TorchAttentionBackend(CPU)
    assert kernel.cpu_kernels is not None
    out = forward(kernel, in_place, case.sliding_window)
    tolerance = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance)
    for cache, expected_cache in zip(in_place.kv_cache, gathered.kv_cache):
        assert torch.equal(cache, expected_cache)


def test_padded_rows_come_out_as_zeros() -> None:
    q = torch.randn(3, 4, 64)
    cache = torch.randn(6, 16, 2, 64)
    tables = torch.tensor([[1, 2], [3, 0], [0, 0]], dtype=torch.int32)
    out = cpu_kernels().paged_decode_attention(q, cache, cache, tables, torch.tensor([20, 5, 0], dtype=torch.int32),
                                               0.125, 0)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and out[:2].abs().sum() > 0
