"""EngineConfig: every knob of the engine, validated once at construction."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# --load-in-low-bit formats (engine/low_bit.py); here so that the command line can offer them without torch.
LOW_BIT_FORMATS = ("sym_int4", "asym_int4", "sym_int8", "fp8", "fp16", "bf16")


def inferq_home() -> Path:
    """Where inferq keeps what it builds once (the demo model, Redis' data, compiled kernels): $INFERQ_HOME."""
    return Path(os.environ.get("INFERQ_HOME", Path.home() / ".cache" / "inferq"))


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Each field's metadata is its command-line flag (worker/cli.py builds the engine flags of `generate`, `worker`
    and `serve` from it): `help`, and where needed `choices`, `flag` (another name than `--field-name`) or `no_flag`
    (why the command line has none)."""

    model: str = field(metadata={"help": "HF checkpoint directory or GGUF file (default: the demo model, written "
                                         "to $INFERQ_HOME/demo-model on first use)"})
    device: str = field(default="auto", metadata={"help": "auto (xpu, then cuda, then cpu) | cpu | cuda[:i] | xpu[:i]"})
    dtype: str = field(default="auto", metadata={
        "help": "auto (the checkpoint's on GPUs, float32 on the CPU) | bfloat16 | float16 | float32"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    max_num_seqs: int = field(default=256, metadata={"help": "requests in the running batch at most"})
    max_num_batched_tokens: int = field(default=4096, metadata={
        "help": "tokens per engine step; longer prompts are prefilled in chunks"})
    # None: the checkpoint's max_position_embeddings.
    max_model_len: int | None = field(default=None, metadata={
        "help": "prompt + output limit (default: the checkpoint's, capped by the KV cache)"})
    # KV cache size. Explicit block count wins; else this engine's share of the accelerator's memory for weights +
    # KV cache (like vLLM's gpu_memory_utilization: other processes' memory is not counted, free memory caps it);
    # on the CPU a fixed byte budget.
    num_kv_blocks: int | None = field(default=None, metadata={
        "help": "KV-cache size in blocks, overriding the memory budget"})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "this engine's share of the accelerator's memory for weights + KV cache (two engines of 0.4 share "
                "one device)"})
    cpu_kv_cache_bytes: int = field(default=1 << 30, metadata={"help": "KV-cache budget on the CPU, in bytes"})
    attention_backend: str = field(default="auto", metadata={
        "help": "auto (Triton kernels on GPUs when triton imports, else torch)",
        "choices": ("auto", "torch", "triton")})
    # Weights below 16 bits (engine/low_bit.py): sym_int4, asym_int4, sym_int8, fp8, fp16 or bf16; None keeps the
    # checkpoint's precision (in `dtype`).
    load_in_low_bit: str | None = field(default=None, metadata={
        "help": "weight format, applied while the checkpoint loads (fp8: e4m3; default: the checkpoint's own)",
        "choices": LOW_BIT_FORMATS})
    # Run every step eagerly; otherwise decode steps replay captured device graphs where the device and the
    # attention backend allow it (CUDA with the Triton backend).
    enforce_eager: bool = field(default=False, metadata={"help": "never replay decode steps from device graphs"})
    # Queue each decode step before the previous one's tokens reach the host, so that host work overlaps device
    # work (as vLLM's async scheduling). None: on for accelerators, off on the CPU.
    async_scheduling: bool | None = field(default=None, metadata={
        "help": "queue each decode step before the previous step's tokens reach the host (default: on GPUs, not "
                "on the CPU)"})
    # Reuse the KV of full blocks whose tokens (and every token before them) a request shares with an earlier one
    # (automatic prefix caching, engine/block_manager.py).
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV of prompt prefixes already computed (a shared system prompt is computed once)"})
    # `inferq generate --seed` is the requests' seed (SamplingParams.seed): the engine's is --engine-seed.
    seed: int = field(default=0, metadata={
        "help": "seed of the engine's generator, for requests without a seed of their own", "flag": "--engine-seed"})
    # Tokenizer directory when it differs from the model directory.
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer directory, when it is not the model's"})
    # Split the model across this many devices of one host (engine/tensor_parallel.py): consecutive cards from
    # `device`, or N processes on the CPU.
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "split the model across this many devices of one host, consecutive from --device (cuda:2 with 2: "
                "cuda:2 and cuda:3; cpu: that many CPU processes)"})
    # Token ids in, token ids out: no tokenizer is loaded and no text is produced (as vLLM's option).
    skip_tokenizer_init: bool = field(default=False, metadata={
        "help": "token ids in, token ids out: no tokenizer, no text",
        "no_flag": "the command line's prompts and the service's requests are text: they need the tokenizer"})

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "cpu_kv_cache_bytes",
                     "tensor_parallel_size"):
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
