"""The Llama family over the paged KV cache: Llama 2/3 (MHA, GQA, rope scaling), Mistral, Qwen2 (q/k/v bias).

Parameter names equal the Hugging Face checkpoint names, so loading is a name-for-name copy.

Tensor parallelism (--tensor-parallel-size N, engine/tensor_parallel.py), Megatron's split: q/k/v and gate/up are
column parallel (each rank holds 1/N of the heads and of the intermediate units, whole), o_proj and down_proj row
parallel (1/N of their inputs; the partial outputs are summed over the ranks, then the bias is added once).
Embeddings, norms and the LM head are replicated: exact, and small beside the layers. `shard_dim` says which
dimension of each checkpoint tensor a rank holds a slice of (engine/loader.py slices as it reads).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.fused_ops import linear, project, rms_norm, silu_and_mul_project
from engine.low_bit import QuantizedLinear
from engine.models.rope import RotaryEmbedding

if TYPE_CHECKING:
    from engine.tensor_parallel import TensorParallel

# The projections split by their outputs (dim 0 of the weight and bias) and by their inputs (dim 1 of the weight).
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
ROW_PARALLEL_MODULES = ("self_attn.o_proj", "mlp.down_proj")  # within a DecoderLayer, once fused


def shard_dim(name: str) -> int | None:
    """The dimension of checkpoint tensor `name` that tensor parallelism splits, None for a replicated one (a
    row-parallel bias is added whole, once, after the sum)."""
    module, _, kind = name.rpartition(".")
    module = module.rpartition(".")[2]
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL and kind == "weight":
        return 1
    return None


def check_tensor_parallel(config, size: int) -> None:
    """ValueError naming the flag where `size` ranks cannot split the model's heads and MLP evenly."""
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    for what, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                        ("intermediate_size", config.intermediate_size)):
        if value % size:
            raise ValueError(f"--tensor-parallel-size {size} does not divide the model's {what} ({value}): "
                             f"use a size that divides {heads} attention heads, {kv_heads} KV heads and "
                             f"{config.intermediate_size} MLP units")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """normalised x; with a residual, (normalised x + residual, x + residual), and on a GPU `residual` is
        overwritten with x + residual (engine/fused_ops.py)."""
        return rms_norm(x, self.weight, self.eps, residual)


def fuse_linears(parts: list[nn.Module]) -> nn.Module:
    """One Linear that computes several projections of the same input: one GEMM (one launch, one read of the
    input) instead of one per part. The outputs come concatenated in the order of `parts`. Parts read quantized
    from a checkpoint (engine/low_bit.py) fuse into one quantized module."""
    if isinstance(parts[0], QuantizedLinear):
        return QuantizedLinear.cat(parts)
    weight = torch.cat([part.weight for part in parts])
    has_bias = parts[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([part.bias for part in parts]), requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool, sliding_window: int | None,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        size = tp.size if tp is not None else 1
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads = config.num_attention_heads // size
        self.num_kv_heads = (config.num_key_value_heads or config.num_attention_heads) // size
        self.scale = self.head_dim ** -0.5
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)
        self.qkv_proj: nn.Linear | None = None  # set by fuse(), which the loader calls
        # Tensor parallel: the sum of o_proj's partial outputs over the ranks, then its bias (fuse() moves it here).
        self.all_reduce = tp.all_reduce if size > 1 else None
        self.register_parameter("o_bias", None)

    def fuse(self) -> None:
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj
        if self.all_reduce is not None:
            self.o_bias = _take_bias(self.o_proj)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        num_tokens = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # Views into the one qkv output; the backend rotates q and k (on a GPU in place there) as it stores k, v.
        q, k, v = project(x, self.qkv_proj).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache, meta, self.scale, self.sliding_window, cos_sin)
        out = project(out.reshape(num_tokens, -1), self.o_proj)
        if self.all_reduce is not None:
            out = _reduced(self.all_reduce(out), self.o_bias)
        return out


def _take_bias(layer: nn.Module) -> nn.Parameter | None:
    """A row-parallel projection's bias, taken out of it: added once after the sum over ranks, not N times."""
    bias = layer.bias
    layer.bias = None
    return bias


def _reduced(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias


class MLP(nn.Module):
    def __init__(self, config, bias: bool = False, tp: TensorParallel | None = None) -> None:
        super().__init__()
        size = tp.size if tp is not None else 1
        inter = config.intermediate_size // size  # this rank's units
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=bias)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=bias)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse(), which the loader calls
        self.all_reduce = tp.all_reduce if size > 1 else None  # as Attention's
        self.register_parameter("down_bias", None)

    def fuse(self) -> None:
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj
        if self.all_reduce is not None:
            self.down_bias = _take_bias(self.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = silu_and_mul_project(project(x, self.gate_up_proj), self.down_proj)
        if self.all_reduce is not None:
            out = _reduced(self.all_reduce(out), self.down_bias)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
                 sliding_window: int | None, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, qkv_bias, o_bias, sliding_window, tp)
        self.mlp = MLP(config, mlp_bias, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def fuse(self) -> None:
        """Once the layer's checkpoint tensors are in (they name q/k/v and gate/up apart): one GEMM for q, k and
        v, one for gate and up. Peak memory grows by the projections while each is concatenated."""
        self.self_attn.fuse()
        self.mlp.fuse()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(previous layer's MLP output, residual stream before it) -> the same pair for this layer; layer 0 gets
        (embeddings, None). Their sum, in the model dtype, is the reference's hidden state after the layer: each
        residual add is left to the next norm, which on a GPU does it in the same kernel."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos_sin, kv_cache, meta, backend)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Serves LlamaForCausalLM and MistralForCausalLM checkpoints; subclasses change only the knobs below."""

    qkv_bias_default = False
    # Tensor parallelism's contract with the loader and the engine (see the module docstring).
    shard_dim = staticmethod(shard_dim)
    check_tensor_parallel = staticmethod(check_tensor_parallel)
    row_parallel_modules = ROW_PARALLEL_MODULES

    def __init__(self, config, tp: TensorParallel | None = None) -> None:
        """tp: this rank's tensor-parallel group, whose shard of the layers to build (None: the whole model)."""
        super().__init__()
        self.config = config
        o_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = o_bias or self.qkv_bias_default
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        layers = [DecoderLayer(config, i, qkv_bias, o_bias, mlp_bias, self.sliding_window(config, i), tp)
                  for i in range(config.num_hidden_layers)]
        self.model = LlamaModel(config, layers)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rope = RotaryEmbedding(config, head_dim)

    @staticmethod
    def sliding_window(config, layer_idx: int) -> int | None:
        """Mistral-style windows apply to every layer; configs with layer_types name the windowed layers."""
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is None or (layer_types and layer_types[layer_idx] != "sliding_attention"):
            return None
        if getattr(config, "use_sliding_window", True) is False:
            return None
        return int(window)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> final hidden states [num_tokens, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rope.cos_sin(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, cos_sin, kv_cache, meta, backend)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = getattr(self, "lm_head", None)  # a tied model has none, unless engine/cpu_linear.py packed a copy
        return linear(hidden, self.model.embed_tokens.weight) if head is None else project(hidden, head)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 is Llama with biases on the q, k and v projections (not on o)."""

    qkv_bias_default = True
