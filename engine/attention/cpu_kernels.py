"""The CPU's decode attention kernel (cpu_paged_attention.cpp), compiled on first use for this CPU and cached under
$INFERQ_HOME (engine/cpu_build.py).

Where it cannot be built (no compiler, no ninja, no Python headers), `cpu_kernels()` returns None and the torch
backend gathers the blocks instead: slower, same results up to rounding.
"""
from __future__ import annotations

import functools
from pathlib import Path

from engine.cpu_build import build_cpu_extension

SOURCE = Path(__file__).with_name("cpu_paged_attention.cpp")


@functools.cache
def cpu_kernels():
    """The compiled module (paged_decode_attention), or None where it cannot be built."""
    return build_cpu_extension(SOURCE, "cpu_paged_attention", fallback="gathering KV blocks instead")
