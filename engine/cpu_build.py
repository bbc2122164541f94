"""C++ CPU kernels compiled on first use with the machine's C++ compiler through torch's extension builder, for this
CPU (-march=native, OpenMP), and cached under $INFERQ_HOME/torch_extensions.

INFERQ_CPU_MARCH (default `native`) replaces native in -march=: INFERQ_CPU_MARCH=haswell builds for AVX2 + FMA +
F16C without AVX-512, which is how the kernels' AVX2 paths are built and tested on an AVX-512 machine (and how a
build is made for an older CPU than this one).

A build is named by a hash of its source, of its compiler flags and of the CPU, so builds with different flags never
collide and a cache shared between machines (a home directory on a network drive, a copied image) never hands one a
build made for another's instruction set. INFERQ_CPU_KERNELS=0
turns every such kernel off; where one cannot be built (no compiler, no ninja, no Python headers) a warning says what
runs instead and the caller gets None.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

from engine.config import inferq_home

log = logging.getLogger(__name__)


def kernels_enabled() -> bool:
    """False where INFERQ_CPU_KERNELS=0 asks for the portable paths only."""
    return os.environ.get("INFERQ_CPU_KERNELS", "1") != "0"


def cpu_march() -> str:
    """The -march= of the builds: INFERQ_CPU_MARCH, else native."""
    return os.environ.get("INFERQ_CPU_MARCH", "").strip() or "native"


def build_cpu_extension(source: Path, name: str, fallback: str = "the portable path instead",
                        march: str | None = None) -> ModuleType | None:
    """The extension compiled from `source` (one .cpp file) as `name`, loaded; built first if the cache has no build
    of this source with these flags for this CPU (tens of seconds). `march` (default: cpu_march()) is -march=.
    None where kernels are off or the build fails; `fallback` (what the caller does then) ends the warning."""
    if not kernels_enabled():
        return None
    try:
        from torch.utils.cpp_extension import load

        cflags = ["-O3", f"-march={march or cpu_march()}", "-fopenmp"]
        identity = source.read_bytes() + " ".join(cflags).encode() + _cpu_identity().encode()
        digest = hashlib.sha256(identity).hexdigest()[:12]
        directory = inferq_home() / "torch_extensions" / f"{name}_{digest}"
        directory.mkdir(parents=True, exist_ok=True)
        log.info("loading the CPU kernel %s from %s (built there first if it is not: about a minute)", name, directory)
        return load(name=f"inferq_{name}_{digest}", sources=[str(source)], build_directory=str(directory),
                    extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure: the caller's portable path serves
        log.warning("the CPU kernel %s could not be built (%s: %s); %s", name, type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "", fallback)
        return None


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)
