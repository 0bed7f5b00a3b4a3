"""The XLA compile options jaxgpt's big jitted functions are built with, per backend.

On CPU, XLA emits its fused loops through LLVM at optimisation level 2 by default. jaxgpt's
steps spend their time in matmul library calls, and the fused loops around them (GELU, softmax,
LayerNorm, AdamW) vectorise just as well at level 1, so level 1 compiles faster and runs as fast
(level 0 makes the steps markedly slower). GPUs and TPUs keep XLA's defaults. docs/speed.md has
the measurements.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

_CPU = {"xla_backend_optimization_level": 1}


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
    """Options for ``jax.jit(..., compiler_options=...)`` on ``backend`` (default: JAX's default one).

    Call it when the function is jitted, not at import: asking for the default backend starts it,
    which must wait for ``jax.distributed.initialize`` in a multi-process run.
    """
    backend = backend or jax.default_backend()
    return dict(_CPU) if backend == "cpu" else None


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
    return directory
