"""Text generation: the book's ``generate_text_simple`` (4.7) as a pure function."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig
from jaxgpt.model import GPTModel, Params

Array = jax.Array


@functools.partial(jax.jit, static_argnames="cfg")
def _next_token_logits(params: Params, cfg: GPTConfig, ids: Array) -> Array:
    return GPTModel(cfg).apply({"params": params}, ids, deterministic=True)[:, -1, :]  # (B, V)


def generate(params: Params, cfg: GPTConfig, ids: Array, max_new_tokens: int) -> Array:
    """Greedily extend ``ids`` (B, T) by ``max_new_tokens`` tokens -> (B, T + max_new_tokens).

    Each step conditions on the last ``context_length`` tokens and appends the argmax.
    """
    ids = jnp.asarray(ids, dtype=jnp.int32)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"ids must be a non-empty (B, T) array of token ids, got shape {ids.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for _ in range(max_new_tokens):
        logits = _next_token_logits(params, cfg, ids[:, -cfg.context_length :])
        next_id = jnp.argmax(logits, axis=-1, keepdims=True).astype(jnp.int32)  # (B, 1)
        ids = jnp.concatenate([ids, next_id], axis=1)
    return ids
