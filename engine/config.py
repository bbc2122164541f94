"""EngineConfig: every knob of the engine, validated once at construction."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# --load-in-low-bit formats (engine/low_bit.py); here so that the command line can offer them without torch.
LOW_BIT_FORMATS = ("sym_int4", "asym_int4", "sym_int8", "fp8", "fp16", "bf16")


def inferq_home() -> Path:
    """Where inferq keeps what it builds once (the demo model, Redis' data, compiled kernels): $INFERQ_HOME."""
    return Path(os.environ.get("INFERQ_HOME", Path.home() / ".cache" / "inferq"))


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    # None: the checkpoint's max_position_embeddings.
    max_model_len: int | None = None
    # KV cache size. Explicit block count wins; else this engine's share of the accelerator's memory for weights +
    # KV cache (like vLLM's gpu_memory_utilization: other processes' memory is not counted, free memory caps it);
    # on the CPU a fixed byte budget.
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 1 << 30
    attention_backend: str = "auto"
    # Weights below 16 bits (engine/low_bit.py): sym_int4, asym_int4, sym_int8, fp8, fp16 or bf16; None keeps the
    # checkpoint's precision (in `dtype`).
    load_in_low_bit: str | None = None
    # Run every step eagerly; otherwise decode steps replay captured device graphs where the device and the
    # attention backend allow it (CUDA with the Triton backend).
    enforce_eager: bool = False
    # Queue each decode step before the previous one's tokens reach the host, so that host work overlaps device
    # work (as vLLM's async scheduling). None: on for accelerators, off on the CPU.
    async_scheduling: bool | None = None
    # Reuse the KV of full blocks whose tokens (and every token before them) a request shares with an earlier one
    # (automatic prefix caching, engine/block_manager.py).
    enable_prefix_caching: bool = True
    seed: int = 0
    # Tokenizer directory when it differs from the model directory.
    tokenizer: str | None = None
    # Token ids in, token ids out: no tokenizer is loaded and no text is produced (as vLLM's option).
    skip_tokenizer_init: bool = False

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "cpu_kv_cache_bytes"):
            positive(name)
        for name in ("max_model_len", "num_kv_blocks"):
            if getattr(self, name) is not None:
                positive(name)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.load_in_low_bit is not None and self.load_in_low_bit not in LOW_BIT_FORMATS:
            raise ValueError(f"load_in_low_bit must be one of {', '.join(LOW_BIT_FORMATS)}, "
                             f"got {self.load_in_low_bit!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
