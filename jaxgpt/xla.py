"""The XLA compile options jaxgpt's big jitted functions are built with, per backend.

On CPU, XLA emits its fused loops through LLVM at optimisation level 2 by default. jaxgpt's
steps spend their time in matmul library calls, and the fused loops around them (GELU, softmax,
LayerNorm, AdamW) vectorise the same at level 1, so level 1 compiles faster and runs as fast.
Measured on the 2-core CPU (compiles alternated six times in one process; steps alternated):

  gpt2-small train step, fp32          compile 3.0-3.3 -> 2.7-3.0 s   205 vs 207 tok/s
  the same, bf16 with remat="dots"     compile 3.0-3.6 -> 2.8-3.0 s   336 vs 332 tok/s
  greedy decode, 100 tokens, B=1/B=8   the same tok/s and the same tokens

Level 0 is no good (the step 33% slower). GPUs and TPUs keep XLA's defaults: their fused kernels
were not measured here.
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
    later process with the same shapes loads them instead of compiling (the gpt2-small train
    step: 2-5 s the first time, 0.1 s from the cache).

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
