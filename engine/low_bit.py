"""--load-in-low-bit: weights stored below 16 bits, quantized layer by layer while the checkpoint loads (or read
quantized from a pre-quantized checkpoint or a GGUF file).

- sym_int4: 4-bit, one scale per group of 128 inputs: w = (q - 8) * scale, q in 0..15 (the signed grid -8..7).
- asym_int4: 4-bit, a scale and an offset per group of 128: w = q * scale + offset (offset = -zero_point * scale,
  so 0 stays exact).
- sym_int8: 8-bit, one scale per output row: w = q * scale, q in -127..127.
- fp8: float8 e4m3 weights, one scale per output row; activations quantized to e4m3 per row on the fly, then
  torch._scaled_mm (torchao's float8 tensors). CUDA compute capability >= 8.9 and Intel GPUs only.
- fp16, bf16: the whole model in float16 / bfloat16.

The integer formats are one module, QuantizedLinear, whose tensors come in one layout, GGUF's: a 4-bit weight is
uint8 [N, K / 2] where, within each run of 32 inputs, byte j holds input j (low nibble) and input j + 16 (high
nibble); scales and offsets are float16 [N, K / group]. So GGUF's Q4_0, Q4_1 and Q8_0 blocks are our sym_int4,
asym_int4 and (grouped) sym_int8 as they lie in the file, and a pre-quantized checkpoint stores the tensors in that
layout. On a GPU a 4-bit qweight is held in one of two layouts the GPU kernels stream: in fragments where groups
are of 128 inputs (or a multiple) and N a multiple of 16 (to_fragments: int32 words in the order the tensor cores
take them), otherwise group by group ([K / group, N, group / 2], to_group_major); an 8-bit one in fragments too
where they fit, otherwise row by row. Kernels:
engine/low_bit_kernels.py (Triton) on GPUs, engine/cpu_low_bit.py on the CPU.

Only the decoder layers' projections are quantized; embeddings, norms and the LM head stay in the compute dtype
(they are ~4% of a 7B model's weights and the head drives every sampled token).
"""
from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import NamedTuple

import torch
from torch import nn

from engine.cpu_linear import PackedLinear

log = logging.getLogger(__name__)

_FLOAT_FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16}
INTEGER_FORMATS = ("sym_int4", "asym_int4", "sym_int8")
# Groups of 128 inputs share a scale, as in torchao and GPTQ; smaller groups where a width is not a multiple.
_GROUP_SIZES = (128, 64, 32)
# The 4-bit layout pairs input j with input j + 16 of each run of 32 (GGUF's blocks).
NIBBLE_RUN = 32


def compute_dtype(fmt: str, device: torch.device, dtype: torch.dtype, dtype_explicit: bool) -> torch.dtype:
    """The dtype activations (and unquantized weights) use with `fmt`, one of engine/config.py's LOW_BIT_FORMATS, on
    `device`. ValueError, naming the format and the device, where that device has no kernel for the format or the
    asked-for dtype contradicts it."""
    wanted = _FLOAT_FORMATS.get(fmt)
    if wanted is None and device.type != "cpu" and dtype == torch.float32:
        # The accelerator kernels multiply on tensor cores, which take 16-bit activations.
        wanted = torch.bfloat16
    if fmt == "fp8" and not _has_float8_kernel(device):
        raise ValueError(f"load_in_low_bit fp8 has no kernel on {device}: float8 matmuls need an NVIDIA GPU of "
                         "compute capability 8.9 or newer or an Intel GPU; use sym_int8 or sym_int4 there")
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
    """Replace every nn.Linear inside `module` (already on its device, in the compute dtype) by its `fmt` form;
    the 16-bit weight is freed as it is replaced. No-op for fp16 and bf16."""
    if fmt in _FLOAT_FORMATS:
        return
    if fmt == "fp8":
        _import_torchao()
        from torchao.quantization import quantize_

        quantize_(module, _float8_config())
        return
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                quantized = QuantizedLinear.from_linear(child, fmt)
                if quantized is not None:
                    setattr(parent, name, quantized)


class QuantizedLinear(nn.Module):
    """nn.Linear with an integer weight (the layouts are in the module docstring): y = x @ dequantize()ᵀ + bias.

    bits 4: qweight uint8 [N, K / 2], scale float16 [N, K / group_size], offset float16 like scale or None
    (symmetric: w = (q - 8) * scale; with offset: w = q * scale + offset). bits 8: qweight int8 [N, K], scale float16
    [N, K / group_size] (group_size K: one scale per row), w = q * scale.

    The constructor takes qweight in that layout and keeps it in `layout`: "rows" as given, "groups"
    (to_group_major, 4-bit weights only) or "fragments" (to_fragments); by default rows on the CPU and, off it,
    fragments where they fit (fits_fragments), else groups (4-bit) or rows (8-bit). rows_qweight gives the
    row-by-row layout back."""

    def __init__(self, bits: int, group_size: int, qweight: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 layout: str | None = None) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * (2 if bits == 4 else 1)
        groups = self.in_features // group_size
        expected = {4: torch.uint8, 8: torch.int8}.get(bits)
        if expected is None or qweight.dtype != expected or tuple(scale.shape) != (self.out_features, groups) or (
                offset is not None and (bits != 4 or offset.shape != scale.shape)) or (
                bits == 4 and group_size % NIBBLE_RUN) or self.in_features % group_size:
            raise ValueError(f"inconsistent {bits}-bit weight: qweight {qweight.dtype} {tuple(qweight.shape)}, "
                             f"scale {tuple(scale.shape)}, offset {None if offset is None else tuple(offset.shape)}, "
                             f"group size {group_size}")
        fits = fits_fragments(bits, group_size, self.out_features)
        if layout is None:  # the GPU kernels' layouts (engine/low_bit_kernels.py)
            layout = "rows" if qweight.device.type == "cpu" else "fragments" if fits else (
                "groups" if bits == 4 else "rows")
        if layout not in ("rows", "groups", "fragments") or (layout == "groups" and bits != 4) or (
                layout == "fragments" and not fits):
            raise ValueError(f"no {layout!r} layout for a {bits}-bit weight of {self.out_features} rows in groups "
                             f"of {group_size}")
        self.layout = layout
        if layout == "groups":
            qweight = to_group_major(qweight, group_size)
        elif layout == "fragments":
            qweight = to_fragments(qweight)
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.scale = nn.Parameter(scale.to(torch.float16), requires_grad=False)
        self.offset = None if offset is None else nn.Parameter(offset.to(torch.float16), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # Counters of the GPU kernels' split-K reduction (engine/low_bit_kernels.py), zero between calls.
        self.register_buffer("_locks", torch.zeros(0, dtype=torch.int32, device=qweight.device), persistent=False)

    def split_locks(self, count: int) -> torch.Tensor:
        """`count` zeroed int32 counters on the weight's device, kept with the module (each kernel call leaves them
        zero again), so a captured device graph reuses them and never allocates."""
        if self._locks.numel() < count:
            self._locks = torch.zeros(max(count, 256), dtype=torch.int32, device=self.qweight.device)
        return self._locks

    @property
    def format(self) -> str:
        return format_name(self.bits, self.offset is not None)

    @property
    def rows_qweight(self) -> torch.Tensor:
        """qweight in the module docstring's layout, row by row (a copy where it lies otherwise)."""
        q = self.qweight
        if self.layout == "fragments":
            return from_fragments(q, self.out_features, self.bits)
        return q.transpose(0, 1).reshape(self.out_features, -1) if self.layout == "groups" else q

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> "QuantizedLinear | None":
        """`linear` in `fmt` (an INTEGER_FORMATS name), or None (with a warning) where its width has no group size."""
        quantized = quantize_weight(linear.weight.detach(), fmt)
        if quantized is None:
            return None
        return cls(*quantized, bias=None if linear.bias is None else linear.bias.detach())

    @classmethod
    def cat(cls, parts: list["QuantizedLinear"]) -> "QuantizedLinear":
        """One module computing `parts` (same input, same format) with outputs concatenated: their rows stacked."""
        first = parts[0]
        if any((p.bits, p.group_size, p.in_features, p.offset is None) != (first.bits, first.group_size,
                                                                            first.in_features, first.offset is None)
               for p in parts):
            raise ValueError("projections fused into one must share their format and group size: "
                             + ", ".join(f"{p.format}/{p.group_size}" for p in parts))

        def stacked(name: str) -> torch.Tensor | None:
            tensors = [p.rows_qweight if name == "qweight" else getattr(p, name) for p in parts]
            return None if tensors[0] is None else torch.cat(tensors)

        return cls(first.bits, first.group_size, stacked("qweight"), stacked("scale"), stacked("offset"),
                   stacked("bias"), layout=first.layout)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] these tensors stand for, in `dtype` (computed in float32)."""
        n, groups = self.scale.shape
        q = unpack_int4(self.rows_qweight) if self.bits == 4 else self.rows_qweight
        q = q.float().reshape(n, groups, self.group_size)
        scale = self.scale.float()[..., None]
        if self.bits == 8:
            w = q * scale
        elif self.offset is None:
            w = (q - 8) * scale
        else:
            w = q * scale + self.offset.float()[..., None]
        return w.reshape(n, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = _matmul(flat, self)
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def _matmul(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """x [M, K] @ layer's weightᵀ, by the device's kernel; the dequantized weight where there is none."""
    if x.device.type == "cpu":
        kernels = _cpu_kernels()
        if kernels is not None and layer.layout == "rows":
            return kernels.quantized_matmul(x, layer)
    else:
        kernels = _gpu_kernels()
        if kernels is not None and x.dtype in (torch.float16, torch.bfloat16):
            return kernels.quantized_matmul(x, layer)
    return nn.functional.linear(x, layer.dequantize(x.dtype))


@functools.cache
def _gpu_kernels() -> ModuleType | None:
    try:  # imported on first use, as engine/fused_ops.py does: the engine runs without the triton package
        from engine import low_bit_kernels
    except ImportError:
        return None
    return low_bit_kernels


@functools.cache
def _cpu_kernels() -> ModuleType | None:
    try:
        from engine import cpu_low_bit
    except ImportError:
        return None
    return cpu_low_bit


def format_name(bits: int, has_offset: bool) -> str:
    return "sym_int8" if bits == 8 else "asym_int4" if has_offset else "sym_int4"


class QuantizedWeight(NamedTuple):
    """A weight [N, K] in an integer format, as QuantizedLinear holds it (QuantizedLinear(*weight, bias=...)): what
    quantize_weight makes, a pre-quantized checkpoint stores and a GGUF file's Q4_0/Q4_1/Q8_0 blocks are."""

    bits: int
    group_size: int
    qweight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, qweight: torch.Tensor, scale: torch.Tensor,
                     offset: torch.Tensor | None = None) -> "QuantizedWeight":
        """The tensors as stored, which imply the rest: uint8 packs two 4-bit values, int8 holds one 8-bit value,
        and K / the scale's width is the group size. QuantizedLinear checks that the shapes agree."""
        bits = 4 if qweight.dtype == torch.uint8 else 8
        groups = scale.shape[-1] if scale.dim() and scale.shape[-1] else 1
        return cls(bits, qweight.shape[-1] * (8 // bits) // groups, qweight, scale, offset)

    @property
    def shape(self) -> tuple[int, int]:
        """[N, K] of the weight it stands for."""
        return self.qweight.shape[0], self.qweight.shape[1] * (8 // self.bits)

    @property
    def format(self) -> str:
        return format_name(self.bits, self.offset is not None)


def quantize_weight(weight: torch.Tensor, fmt: str, group_size: int | None = None) -> QuantizedWeight | None:
    """weight [N, K] in `fmt` (an INTEGER_FORMATS name): what every path quantizes with (a 16-bit checkpoint as it
    loads, `inferq quantize`, GGUF tensors brought to their file's format). `group_size` defaults to the format's:
    one scale per row for sym_int8, else the largest of _GROUP_SIZES dividing K. None (with a warning) where K has
    no 4-bit group size: the projection stays unquantized."""
    k = weight.shape[1]
    if fmt == "sym_int8":
        group_size = group_size or k
        return QuantizedWeight(8, group_size, *quantize_int8(weight, group_size))
    group_size = group_size or next((g for g in _GROUP_SIZES if k % g == 0), None)
    if group_size is None:
        log.warning("%s: %d inputs is not a multiple of %d, so this projection stays in %s",
                    fmt, k, _GROUP_SIZES[-1], weight.dtype)
        return None
    return QuantizedWeight(4, group_size, *quantize_int4(weight, group_size, symmetric=fmt == "sym_int4"))


def quantize_int8(weight: torch.Tensor, group_size: int,
                  amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int8 [N, K], scale float16 [N, K / group_size]): symmetric, max|w| of a group -> 127.
    amax [N, K / group_size]: the groups' max|w| where they reach beyond `weight` (a tensor-parallel slice)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    if amax is None:
        amax = groups.abs().amax(dim=-1)
    scale = (amax.clamp(min=1e-6) / 127).to(torch.float16)
    q = torch.round(groups / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k), scale


def quantize_row_parallel(linear: nn.Linear, fmt: str, size: int, reduce_max) -> QuantizedLinear | None:
    """A tensor-parallel rank's slice of a row-parallel projection (1/size of its inputs, --tensor-parallel-size) in
    `fmt`, an INTEGER_FORMATS name, quantized exactly as the whole projection is on one rank, so that the ranks'
    shards together hold the one-rank weights: 4-bit groups of the whole width's group size (ValueError where a
    slice does not hold whole groups), sym_int8's one scale per row from the whole row's max|w| (reduce_max: the
    element-wise maximum over the ranks, a collective every rank calls). None where the whole width has no group."""
    weight = linear.weight.detach()
    k = weight.shape[1]
    full = k * size
    bias = None if linear.bias is None else linear.bias.detach()
    if fmt == "sym_int8":
        amax = reduce_max(weight.float().abs().amax(dim=1, keepdim=True))
        return QuantizedLinear(8, k, *quantize_int8(weight, k, amax), bias=bias)
    group_size = next((g for g in _GROUP_SIZES if full % g == 0), None)
    if group_size is None:
        return QuantizedLinear.from_linear(linear, fmt)  # as on one rank: stays unquantized, with its warning
    if k % group_size:
        raise ValueError(f"--tensor-parallel-size {size} leaves {k} of a row-parallel projection's {full} inputs "
                         f"on each rank, not whole {fmt} groups of {group_size}: use a size that keeps "
                         f"{full} / size a multiple of {group_size}, or another format")
    return QuantizedLinear(*quantize_weight(weight, fmt, group_size), bias=bias)


def quantize_int4(weight: torch.Tensor, group_size: int, symmetric: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight [N, K] -> (qweight uint8 [N, K / 2], scale float16 [N, K / group_size], offset like scale or None).
    Symmetric: scale max|w| / 7.5 on the grid -8..7 (q - 8). Asymmetric: the group's range, widened to hold 0,
    spread over 0..15 with an integer zero point, so 0 stays exact. Scales are rounded to float16 before q is
    computed, so q is the best grid point for the scale that is stored."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    if symmetric:
        scale = (groups.abs().amax(dim=-1).clamp(min=1e-6) / 7.5).to(torch.float16).float()
        q = torch.round(groups / scale[..., None]) + 8
        offset = None
    else:
        low, high = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)
        scale = ((high - low) / 15).clamp(min=1e-6).to(torch.float16).float()
        zero_point = torch.round(-low / scale).clamp(0, 15)
        q = torch.round(groups / scale[..., None]) + zero_point[..., None]
        offset = (-zero_point * scale).to(torch.float16)
    q = q.clamp(0, 15).to(torch.uint8).reshape(n, k)
    return pack_int4(q), scale.to(torch.float16), offset


def to_group_major(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """A 4-bit qweight [N, K / 2] rearranged group by group, [K / group_size, N, group_size / 2]: what the GPU
    kernels read. Their tiles span many output rows and one group of inputs, and laid out row by row such a tile is
    a few dozen bytes from each of many rows thousands of bytes apart; group by group it is one contiguous block,
    which the memory streams at a far higher rate."""
    n, half = qweight.shape
    return qweight.reshape(n, half // (group_size // 2), group_size // 2).transpose(0, 1).contiguous()


# Output rows of one block of to_fragments' words, and its inputs by bits (a block is 1 KB either way).
FRAGMENT_N = 16
FRAGMENT_K = {4: 128, 8: 64}


def fits_fragments(bits: int, group_size: int, n: int) -> bool:
    """Whether a `bits`-bit weight of `n` output rows in groups of `group_size` can lie in fragments: each block of
    inputs within one group (one scale per row and block), and whole blocks of 16 rows."""
    return group_size % FRAGMENT_K[bits] == 0 and n % FRAGMENT_N == 0


def to_fragments(qweight: torch.Tensor) -> torch.Tensor:
    """A qweight (4-bit: uint8 [N, K / 2], GGUF pairing; 8-bit: int8 [N, K]) as int32 words [K / FRAGMENT_K,
    N / 16, 256] in the order Hopper's tensor cores take a weight tile from registers (the A operand of a 16-row
    MMA), so that the tiled GEMM's loads land in that layout with no trip through shared memory or shuffle between
    them (engine/low_bit_kernels.py).

    Block (b, j) holds output rows 16j..16j+15 and inputs FRAGMENT_K·b on; its 256 words are [2 h][8 g][4 t][4 p],
    word (h, g, t, p) of row 16j + 8h + g, so that thread (g, t) of a warp holds, in each 16-input slice of the
    block, columns 2t, 2t + 1, 2t + 8 and 2t + 9 of rows g and g + 8: the MMA's fragment. 4 bits: word p holds
    the column pair 2t + 8·(p // 2), + 1 of slices 4·(p % 2) to 4·(p % 2) + 3: slice 4·(p % 2) + i's pair at bits
    4i and 16 + 4i, so one shift and mask give two 16-bit halves that are the MMA's register for that pair (the
    exponent trick makes both floats in one operation). 8 bits: byte n of word p (bits 8n) is input 16n + c,
    c = 8·(p // 2) + 2t + p % 2, two's complement kept. Each row's 16 words of a block are contiguous (64 bytes),
    as a GEMV wants them."""
    bits = 8 if qweight.dtype == torch.int8 else 4
    q = (unpack_int4(qweight) if bits == 4 else qweight.view(torch.uint8)).to(torch.int32)
    n, k = q.shape
    values, block_k = 32 // bits, FRAGMENT_K[bits]
    if bits == 4:  # [j, h, g, b, half a, slice i, p_hi, t, e] -> [b, j, h, g, t, p_hi, a, e, i]: value 4e + i
        q = q.reshape(n // FRAGMENT_N, 2, 8, k // block_k, 2, 4, 2, 4, 2).permute(3, 0, 1, 2, 7, 6, 4, 8, 5)
    else:  # [j, h, g, b, value n, p_hi, t, p_lo] -> [b, j, h, g, t, p_hi, p_lo, n]
        q = q.reshape(n // FRAGMENT_N, 2, 8, k // block_k, values, 2, 4, 2).permute(3, 0, 1, 2, 6, 5, 7, 4)
    q = q.reshape(k // block_k, n // FRAGMENT_N, 2, 8, 4, 2, 2, values)
    words = q[..., 0]
    for value in range(1, values):
        words = words | (q[..., value] << (bits * value))
    return words.reshape(k // block_k, n // FRAGMENT_N, 256).contiguous()


def from_fragments(words: torch.Tensor, n: int, bits: int = 4) -> torch.Tensor:
    """to_fragments' inverse: uint8 [N, K / 2] in the GGUF pairing (4-bit) or int8 [N, K]."""
    blocks = words.shape[0]
    w = words.reshape(blocks, n // FRAGMENT_N, 2, 8, 4, 2, 2)
    mask = (1 << bits) - 1
    q = torch.stack([(w >> (bits * value)) & mask for value in range(32 // bits)], dim=-1)  # [b, j, h, g, t, p_hi,
    if bits == 4:  # p_lo = a, e, i] -> [j, h, g, b, a, i, p_hi, t, e]
        q = q.reshape(blocks, n // FRAGMENT_N, 2, 8, 4, 2, 2, 2, 4).permute(1, 2, 3, 0, 6, 8, 5, 4, 7)
    else:  # p_lo, n] -> [j, h, g, b, n, p_hi, t, p_lo]
        q = q.permute(1, 2, 3, 0, 7, 5, 4, 6)
    q = q.reshape(n, blocks * FRAGMENT_K[bits]).to(torch.uint8)
    return pack_int4(q) if bits == 4 else q.view(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 -> uint8 [N, K / 2] in the GGUF pairing (input j with j + 16 of each run of 32)."""
    n, k = q.shape
    runs = q.reshape(n, k // NIBBLE_RUN, 2, NIBBLE_RUN // 2)
    return (runs[:, :, 0] | runs[:, :, 1] << 4).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse: uint8 [N, K / 2] -> uint8 [N, K] of values 0..15."""
    n, half = packed.shape
    runs = packed.reshape(n, half // (NIBBLE_RUN // 2), 1, NIBBLE_RUN // 2)
    return torch.cat([runs & 0xF, runs >> 4], dim=2).reshape(n, half * 2)


def _import_torchao() -> None:
    """torchao warns at import about optional compiled extensions (MX formats, CUTLASS kernels) built for another
    torch release; fp8 does not use them, so keep those warnings out of the logs."""
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


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take on the device, counting the packed data of quantized tensors."""
    total = sum(m.packed.numel() * m.packed.element_size() for m in model.modules() if isinstance(m, PackedLinear))
    for param in model.parameters():
        names = getattr(param, "tensor_data_names", None)
        parts = [getattr(param, n) for n in names] if names else [param]
        parts += [getattr(param, n, None) for n in getattr(param, "optional_tensor_data_names", [])]
        total += sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
    return total
