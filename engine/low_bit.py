"""--load-in-low-bit: weights stored below 16 bits, quantized layer by layer while the checkpoint loads.

- sym_int4: 4-bit, one scale per group of 128 inputs, zero point fixed at 8 (a signed grid -8..7 around 0);
  asym_int4: 4-bit, a scale and an integer zero point per group. Kernels: aten's int4 matmuls through torchao's
  tensors, tile-packed on CUDA (tensor cores, compute capability >= 8.0), plain int32 on XPU, the CPU int4 matmul.
- sym_int8: 8-bit, one scale per output row. Kernels: engine/low_bit_kernels.py (Triton) on GPUs, aten's int8
  weight-only matmul on the CPU.
- fp8: float8 e4m3 weights, one scale per output row; activations quantized to e4m3 per row on the fly, then
  torch._scaled_mm (torchao's float8 tensors). CUDA compute capability >= 8.9 and Intel GPUs only.
- fp16, bf16: the whole model in float16 / bfloat16.

Only the decoder layers' projections are quantized; embeddings, norms and the LM head stay in the compute dtype
(they are ~4% of a 7B model's weights and the head drives every sampled token). The int4 and fp8 tensors are
torchao's (their linear dispatch calls the aten kernels); int4 quantization parameters are computed here, one
scheme on every device (torchao builds only asymmetric ones, with float zeros on CUDA and the CPU but integer zero
points on XPU). sym_int8 is our own module: torchao's int8 weight-only linear widens
the whole weight to 16 bits on every call unless torch.compile fuses it (engine/low_bit_kernels.py says more).
"""
from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
from torch import nn

from engine.cpu_linear import PackedLinear

log = logging.getLogger(__name__)

_FLOAT_FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Groups of 128 inputs share a scale, as in torchao and GPTQ; smaller groups where a width is not a multiple.
_GROUP_SIZES = (128, 64, 32)


def compute_dtype(fmt: str, device: torch.device, dtype: torch.dtype, dtype_explicit: bool) -> torch.dtype:
    """The dtype activations (and unquantized weights) use with `fmt`, one of engine/config.py's LOW_BIT_FORMATS, on
    `device`. ValueError, naming the format and the device, where that device has no kernel for the format or the
    asked-for dtype contradicts it."""
    wanted = _FLOAT_FORMATS.get(fmt)
    if wanted is None and fmt in ("sym_int4", "asym_int4", "fp8") and device.type != "cpu":
        # The accelerator kernels take 16-bit activations (tinygemm on CUDA: bfloat16 only).
        wanted = torch.bfloat16 if device.type == "cuda" or dtype == torch.float32 else dtype
    if fmt == "fp8" and not _has_float8_kernel(device):
        raise ValueError(f"load_in_low_bit fp8 has no kernel on {device}: float8 matmuls need an NVIDIA GPU of "
                         "compute capability 8.9 or newer or an Intel GPU; use sym_int8 or sym_int4 there")
    if fmt in ("sym_int4", "asym_int4") and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        raise ValueError(f"load_in_low_bit {fmt} has no kernel on {device}: the int4 matmul needs an NVIDIA GPU of "
                         "compute capability 8.0 or newer; use sym_int8 there")
    if wanted is None:
        return dtype
    if dtype_explicit and dtype != wanted:
        raise ValueError(f"load_in_low_bit {fmt} on {device} computes in {str(wanted).removeprefix('torch.')}, "
                         f"but dtype {str(dtype).removeprefix('torch.')} was asked for: leave dtype auto")
    return wanted


def _has_float8_kernel(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "xpu"


def quantize_linears(module: nn.Module, fmt: str) -> None:
    """Replace the weight of every nn.Linear inside `module` (already on its device, in the compute dtype) by its
    `fmt` form; the 16-bit weight is freed as it is replaced. No-op for fp16 and bf16."""
    if fmt in _FLOAT_FORMATS:
        return
    if fmt == "sym_int8":
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(child))
        return
    _import_torchao()
    if fmt == "fp8":
        from torchao.quantization import quantize_

        quantize_(module, _float8_config())
        return
    for linear in [m for m in module.modules() if isinstance(m, nn.Linear)]:
        group_size = next((g for g in _GROUP_SIZES if linear.in_features % g == 0), None)
        if group_size is None:
            log.warning("%s: %d inputs is not a multiple of %d, so this projection stays in %s",
                        fmt, linear.in_features, _GROUP_SIZES[-1], linear.weight.dtype)
            continue
        weight = int4_weight(linear.weight.detach(), group_size, symmetric=fmt == "sym_int4")
        linear.weight = nn.Parameter(weight, requires_grad=False)


class Int8Linear(nn.Module):
    """sym_int8: weight = int8 [out, in] * scale [out] (symmetric, one scale per output row, max|w| -> 127).
    Kernels: engine/low_bit_kernels.py on GPUs for decode-sized inputs, aten's int8 weight-only matmul on the CPU;
    elsewhere the weight is widened once per call (prefill, where the matmul's own cost dominates)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.detach()
        scale = weight.float().abs().amax(dim=1).clamp(min=1e-8) / 127
        quantized = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(quantized, scale.to(weight.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = self._matmul(flat)
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        kernels = _int8_kernels() if x.device.type in ("cuda", "xpu") else None
        if kernels is not None and x.dtype != torch.float32 and x.shape[0] <= kernels.MAX_ROWS:
            return kernels.int8_matmul_triton(x, self.weight, self.scale)
        if x.device.type == "cpu":
            return torch._weight_int8pack_mm(x, self.weight, self.scale.to(x.dtype))
        return nn.functional.linear(x, self.weight.to(x.dtype)) * self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@functools.cache
def _int8_kernels() -> ModuleType | None:
    try:  # imported on first use, as engine/fused_ops.py does: the engine runs without the triton package
        from engine import low_bit_kernels
    except ImportError:
        return None
    return low_bit_kernels


def _import_torchao() -> None:
    """torchao warns at import about optional compiled extensions (MX formats, CUTLASS kernels) built for another
    torch release; none of our formats use them, so keep those warnings out of the logs."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
    finally:
        logger.setLevel(level)


def _float8_config():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    from torchao.quantization.quantize_.common import KernelPreference

    # KernelPreference.TORCH: torch._scaled_mm, present in every torch build (the alternative needs mslk).
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), kernel_preference=KernelPreference.TORCH,
                                                     set_inductor_config=False)


def int4_groups(weight: torch.Tensor, group_size: int, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q, scale, zero_point): q int32 [N, K] in [0, 15]; scale [N, K / group_size] in weight's
    dtype; zero_point int32 like scale; weight ≈ (q - zero_point) * scale. Symmetric: zero_point 8 and
    scale max|w| / 7.5, the signed grid [-8, 7] around 0. Asymmetric: the group's range (widened to hold 0, which
    stays exact) spread over [0, 15]. One scheme on every device, so a format's numerics do not depend on it."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    if symmetric:
        scale = groups.abs().amax(dim=-1).clamp(min=1e-6) / 7.5
        zero_point = torch.full_like(scale, 8)
    else:
        low, high = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)
        scale = ((high - low) / 15).clamp(min=1e-6)
        zero_point = torch.round(-low / scale).clamp(0, 15)
    q = (torch.round(groups / scale[..., None]) + zero_point[..., None]).clamp(0, 15)
    return q.to(torch.int32).reshape(n, k), scale.to(weight.dtype), zero_point.to(torch.int32)


def int4_weight(weight: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
    """The torchao int4 tensor for `weight` [N, K] in the packing its device's kernel reads."""
    shape, device = weight.shape, weight.device.type
    block_size = [1, group_size]
    if device == "cuda":
        from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (
            Int4TilePackedTo4dTensor)

        # The tile layout needs N a multiple of 8 and K of 1024 (the linear pads activations to match).
        n, k = shape
        padded = nn.functional.pad(weight, (0, -k % 1024, 0, -n % 8))
        q, scale, zero_point = int4_groups(padded, group_size, symmetric)
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        return Int4TilePackedTo4dTensor(packed, _tinygemm_scale_and_zero(scale, zero_point), block_size, shape)
    q, scale, zero_point = int4_groups(weight, group_size, symmetric)
    if device == "cpu":
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor

        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return Int4OpaqueTensor(packed, _tinygemm_scale_and_zero(scale, zero_point), block_size, shape)
    if device == "xpu":
        from torchao.quantization.quantize_.workflows.int4.int4_plain_int32_tensor import Int4PlainInt32Tensor

        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, 1::2] << 4 | q[:, ::2]).to(torch.uint8), 8)
        return Int4PlainInt32Tensor(packed, scale.t().contiguous(), zero_point.t().contiguous().to(torch.int8),
                                    block_size, shape)
    raise ValueError(f"int4 weights have no kernel on {device}")


def _tinygemm_scale_and_zero(scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The [G, N, 2] table of scales and zeros the tinygemm kernels read; they compute (q - 8) * scale + zero, so
    zero = (8 - zero_point) * scale."""
    zero = ((8 - zero_point) * scale.float()).to(scale.dtype)
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take on the device, counting the packed data of quantized tensors."""
    total = sum(m.packed.numel() * m.packed.element_size() for m in model.modules() if isinstance(m, PackedLinear))
    for param in model.parameters():
        names = getattr(param, "tensor_data_names", None)
        parts = [getattr(param, n) for n in names] if names else [param]
        parts += [getattr(param, n, None) for n in getattr(param, "optional_tensor_data_names", [])]
        total += sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
    return total
