"""The XLA compile options jaxgpt's big jitted functions are built with, per backend.

On CPU, XLA emits its fused loops through LLVM at optimisation level 2 by default. jaxgpt's
steps spend their time in matmul library calls, and the fused loops around them (GELU, softmax,
LayerNorm, AdamW) vectorise just as well at level 1, so level 1 compiles faster and runs as fast
(level 0 makes the steps markedly slower). GPUs and TPUs keep XLA's defaults. docs/speed.md has
the measurements.

A training step's matmuls run on YNNPACK by default. On Intel CPUs oneDNN, Intel's own library,
runs them faster (5% a step with AVX-512, 9% under AVX2 caps, on a Xeon with AMX), so training
steps ask XLA for oneDNN's dots there; AMD hosts keep YNNPACK, which was not beaten there. JAX's
persistent cache cannot hold a program with oneDNN's calls, so those steps compile in every process.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import jax

_CPU = {"xla_backend_optimization_level": 1}

# XLA's matmuls on oneDNN, one library call per dot, instead of on YNNPACK.
ONEDNN_DOTS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
CPU_MATMULS = "JAXGPT_CPU_MATMULS"  # "auto" (the default), "onednn" or "ynnpack": the training steps' library


def cpu_vendor(cpuinfo: str | None = None) -> str | None:
    """The ``vendor_id`` of ``/proc/cpuinfo`` (or of the text given), e.g. GenuineIntel; None if unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return None


@functools.cache
def _host_is_intel_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and cpu_vendor() == "GenuineIntel"


def training_matmuls() -> str:
    """Which library runs a CPU training step's matmuls: ``"onednn"`` on Intel x86 hosts, else
    ``"ynnpack"``; ``$JAXGPT_CPU_MATMULS`` (onednn or ynnpack) overrides the choice."""
    choice = os.environ.get(CPU_MATMULS, "auto").strip().lower() or "auto"
    if choice not in ("auto", "onednn", "ynnpack"):
        raise ValueError(f"{CPU_MATMULS}={choice!r}: expected auto, onednn or ynnpack")
    if choice == "auto":
        return "onednn" if _host_is_intel_x86() else "ynnpack"
    return choice


def compiler_options(backend: str | None = None, *, training: bool = False) -> dict[str, Any] | None:
    """Options for ``jax.jit(..., compiler_options=...)`` on ``backend`` (default: JAX's default one).

    ``training``: the options for a training step, which on a CPU may also move its matmuls to
    oneDNN (:func:`training_matmuls`). Decoding keeps YNNPACK, which streams a matrix-vector
    product faster. Call it when the function is jitted, not at import: asking for the default
    backend starts it, which must wait for ``jax.distributed.initialize`` in a multi-process run.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return None
    options = dict(_CPU)
    if training and training_matmuls() == "onednn":
        options.update(ONEDNN_DOTS)
    return options


NO_CACHE = "JAXGPT_NO_COMPILE_CACHE"  # set to 1 to keep the command-line tools off the disk cache


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache: programs compiled once are kept on disk, and a
    later process with the same shapes loads them instead of compiling them again.

    The command-line tools call this at start-up; library code never changes JAX's config behind
    a caller's back. ``path`` defaults to ``$JAX_COMPILATION_CACHE_DIR`` when set (JAX's own
    variable), else ``$XDG_CACHE_HOME/jaxgpt/xla`` (``~/.cache/jaxgpt/xla``). Returns the directory
    in use, or None when ``JAXGPT_NO_COMPILE_CACHE=1`` or the directory cannot be created. JAX keys
    each entry by the program, the options and the jax/jaxlib versions, so a stale entry is never used.
    """
    if os.environ.get(NO_CACHE, "") not in ("", "0"):
        return None
    if path is None:
        path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxgpt" / "xla"
        )
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # JAX cannot serialise oneDNN's calls (training steps on Intel hosts): such a step is compiled
    # anew in each process, which is all the warning would say.
    warnings.filterwarnings(
        "ignore", message="Error writing persistent compilation cache entry.*onednn", category=UserWarning
    )
    return directory
