"""QuantizedLinear's matmul on the CPU (engine/low_bit.py): cpu_low_bit.cpp, compiled on first use for this CPU and
cached under $INFERQ_HOME (engine/cpu_build.py). It reads the weights in their stored layout (GGUF's), so the model
keeps one copy of them.

Importing this module builds (or loads) the kernel; where it cannot be built, or INFERQ_CPU_KERNELS=0, the import
raises ImportError and engine/low_bit.py multiplies by the dequantized weight instead (same results up to rounding,
several times slower than float32).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.cpu_build import build_cpu_extension

if TYPE_CHECKING:
    from engine.low_bit import QuantizedLinear

SOURCE = Path(__file__).with_name("cpu_low_bit.cpp")

_kernel = build_cpu_extension(SOURCE, "cpu_low_bit",
                              fallback="low-bit projections multiply by their dequantized weights instead (slow)")
if _kernel is None:
    raise ImportError("the CPU low-bit kernel is off (INFERQ_CPU_KERNELS=0) or could not be built")


def quantized_matmul(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """x [M, K] (float32, or another float dtype converted to it) @ layer's weightᵀ -> [M, N] in x's dtype; no bias."""
    return _kernel.quantized_matmul(x, layer.qweight, layer.scale, layer.offset, layer.bits, layer.group_size)
