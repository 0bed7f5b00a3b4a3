"""Cross-entropy loss over next-token targets (book 5.1): per batch and averaged over a loader."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import GPTConfig
from jaxgpt.model import GPTModel, Params

Array = jax.Array


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean negative log-likelihood of ``targets`` (B, T) under ``logits`` (B, T, V).

    The book flattens to (B*T, V) and calls ``torch.nn.functional.cross_entropy``; this is the
    same number, computed in float32 from a log-softmax.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # (B, T)
    return losses.mean()


@functools.partial(jax.jit, static_argnames="cfg")
def calc_loss_batch(params: Params, cfg: GPTConfig, input_batch: Array, target_batch: Array) -> Array:
    """Loss of one (B, T) batch with dropout off (the book's ``calc_loss_batch`` in evaluation)."""
    logits = GPTModel(cfg).apply({"params": params}, input_batch, deterministic=True)
    return cross_entropy(logits, target_batch)


def calc_loss_loader(
    params: Params, cfg: GPTConfig, loader: Iterable[tuple[Array, Array]], num_batches: int | None = None
) -> float:
    """Average batch loss over the first ``num_batches`` batches of ``loader`` (all when None).

    An empty loader gives NaN, as in the book.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    total, count = 0.0, 0
    for input_batch, target_batch in loader:
        if num_batches is not None and count >= num_batches:
            break
        total += float(calc_loss_batch(params, cfg, jnp.asarray(input_batch), jnp.asarray(target_batch)))
        count += 1
    return total / count if count else math.nan
