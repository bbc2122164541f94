"""The CPU's decode attention kernel (cpu_paged_attention.cpp), compiled on first use with the machine's C++
compiler through torch's extension builder, for this CPU (-march=native), and cached under $INFERQ_HOME.

Where it cannot be built (no compiler, no ninja, no Python headers), `cpu_kernels()` returns None and the torch
backend gathers the blocks instead: slower, same results up to rounding.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

from engine.config import inferq_home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_paged_attention.cpp")


@functools.cache
def cpu_kernels():
    """The compiled module (paged_decode_attention), or None where it cannot be built."""
    if os.environ.get("INFERQ_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        # Named by the source and the CPU: a cache shared between machines never hands one a build for another.
        digest = hashlib.sha256(SOURCE.read_bytes() + _cpu_identity().encode()).hexdigest()[:12]
        directory = inferq_home() / "torch_extensions" / f"cpu_paged_attention_{digest}"
        directory.mkdir(parents=True, exist_ok=True)
        log.info("loading the CPU attention kernel from %s (built there first if it is not: about a minute)", directory)
        return load(name=f"inferq_cpu_paged_attention_{digest}", sources=[str(SOURCE)], build_directory=str(directory),
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure: the portable path serves
        log.warning("the CPU attention kernel could not be built (%s: %s); gathering KV blocks instead",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)
