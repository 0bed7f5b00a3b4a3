"""Cross-entropy loss over next-token targets (book 5.1): per batch and averaged over a loader."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.config import GPTConfig
from jaxgpt.model import GPTModel, Params
from jaxgpt.ops import transposed

Array = jax.Array


IGNORE_INDEX = -100  # a target that adds no loss: torch's cross_entropy default (book 7.3)


def cross_entropy(logits: Array, targets: Array, ignore_index: int | None = IGNORE_INDEX) -> Array:
    """Mean negative log-likelihood of ``targets`` (B, T) under ``logits`` (B, T, V).

    The book flattens to (B*T, V) and calls ``torch.nn.functional.cross_entropy``; this is the
    same number, computed in float32 from a log-softmax. As there, targets equal to
    ``ignore_index`` (-100) take no part: the mean is over the others (NaN when none is left).
    """
    if ignore_index is None:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        return losses.mean()
    valid = targets != ignore_index  # (B, T)
    safe = jnp.where(valid, targets, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)  # (B, T)
    return jnp.where(valid, losses, 0.0).sum() / valid.sum()


# --- the training loss without the (B, T, V) logits ---------------------------------------------
#
# The logits of one gpt2-small batch (8 x 256 x 50257 floats) take 411 MB, and autodiff keeps
# them and their gradient alive at once. The loss below applies the head to ``chunk_rows`` rows at
# a time and, while it has a chunk's logits, also forms their gradient (softmax - one_hot) / N and
# multiplies it back into the gradients of the hidden states and of the head. The backward pass
# then only scales those by the incoming cotangent: no logits are kept and none are recomputed.

CHUNK_ROWS = 1024


def _mm(a: Array, b: Array, dtype: str) -> Array:
    """a (M, K) @ b (K, N) -> float32; in bfloat16 inputs when ``dtype`` says so."""
    if dtype == "float32":
        return a @ b
    return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def _chunked_loss_and_grads(
    x: Array,
    head: Array,
    targets: Array,
    dtype: str,
    chunk_rows: int,
    vocab_size: int,
    with_grads: bool,
    ignore_index: int | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """Mean cross-entropy of ``targets`` (N,) under logits ``x @ head``; x (N, C), head (C, V).

    Columns of ``head`` from ``vocab_size`` on are padding: their logits are -inf (probability
    0, gradient 0). Targets equal to ``ignore_index`` weigh 0 and the mean is over the others.
    With ``with_grads`` also d loss / d x (N, C) and d loss / d head (C, V), both float32.
    """
    N, C = x.shape
    if dtype == "float32":
        head_t = head.T  # (V, C), for d loss / d x
    else:  # cast once here, not in every chunk (XLA does not hoist it out of the scan)
        head = head.astype(jnp.bfloat16)
        head_t = transposed(head)
    n_chunks = -(-N // chunk_rows)
    pad = n_chunks * chunk_rows - N
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(n_chunks, chunk_rows, C)
    if ignore_index is None:
        valid, count = jnp.ones((N,), bool), N
    else:  # ignored targets weigh 0 and are read as token 0; the mean is over the rest
        valid = targets != ignore_index
        count = valid.sum().astype(jnp.float32)
        targets = jnp.where(valid, targets, 0)
    ys = jnp.pad(targets, (0, pad)).reshape(n_chunks, chunk_rows)
    weights = jnp.pad(valid, (0, pad)).astype(jnp.float32).reshape(n_chunks, chunk_rows, 1) / count

    def one_chunk(dhead: Array | None, chunk: tuple[Array, Array, Array]) -> tuple[Array | None, tuple]:
        xc, yc, wc = chunk  # (R, C), (R,), (R, 1)
        logits = _mm(xc, head, dtype)  # (R, V)
        if vocab_size < logits.shape[-1]:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # (R, 1)
        target_logit = jnp.take_along_axis(logits, yc[:, None], axis=-1)  # (R, 1)
        loss_sum = ((lse - target_logit) * wc).sum()
        if not with_grads:
            return dhead, (loss_sum, jnp.zeros((), jnp.float32))
        one_hot = jnp.arange(logits.shape[-1])[None, :] == yc[:, None]  # (R, V)
        dlogits = (jnp.exp(logits - lse) - one_hot) * wc  # (R, V): d mean-loss / d logits
        dx = _mm(dlogits, head_t, dtype)  # (R, C)
        dhead = dhead + _mm(transposed(xc), dlogits, dtype)  # (C, V)
        return dhead, (loss_sum, dx)

    dhead0 = jnp.zeros(head.shape, jnp.float32) if with_grads else None
    dhead, (loss_sums, dxs) = jax.lax.scan(one_chunk, dhead0, (xs, ys, weights))
    if not with_grads:
        return loss_sums.sum(), None, None
    return loss_sums.sum(), dxs.reshape(-1, C)[:N], dhead


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _linear_cross_entropy(
    x: Array, head: Array, targets: Array, dtype: str, chunk_rows: int, vocab_size: int, ignore_index
) -> Array:
    args = (dtype, chunk_rows, vocab_size)
    return _chunked_loss_and_grads(x, head, targets, *args, False, ignore_index)[0]


def _linear_cross_entropy_fwd(x, head, targets, dtype, chunk_rows, vocab_size, ignore_index):
    args = (dtype, chunk_rows, vocab_size)
    loss, dx, dhead = _chunked_loss_and_grads(x, head, targets, *args, True, ignore_index)
    return loss, (dx, dhead, targets)


def _linear_cross_entropy_bwd(dtype, chunk_rows, vocab_size, ignore_index, res, g):
    dx, dhead, targets = res
    return g * dx, g * dhead, np.zeros(targets.shape, dtype=jax.dtypes.float0)


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def linear_cross_entropy(
    hidden: Array,
    head: Array,
    targets: Array,
    dtype: str = "float32",
    chunk_rows: int = CHUNK_ROWS,
    vocab_size: int | None = None,
    ignore_index: int | None = IGNORE_INDEX,
) -> Array:
    """``cross_entropy(hidden @ head, targets)`` without ever holding all the logits.

    hidden (B, T, C) from ``GPTModel(..., head=False)``; head (C, V); targets (B, T). Equal to
    the plain loss (and so are its gradients) up to float rounding; peak memory holds the
    logits of ``chunk_rows`` rows only. ``vocab_size`` < V: the head's later columns are padding
    and take no part (``GPTConfig.vocab_pad_multiple``). Targets equal to ``ignore_index``
    take no part either, as in :func:`cross_entropy`.
    """
    B, T, C = hidden.shape
    if targets.shape != (B, T):
        raise ValueError(
            f"targets must have shape {(B, T)} to match hidden {hidden.shape}, got {targets.shape}"
        )
    chunk_rows = max(1, min(chunk_rows, B * T))
    vocab_size = head.shape[1] if vocab_size is None else vocab_size
    if not 0 < vocab_size <= head.shape[1]:
        raise ValueError(f"vocab_size must be in [1, {head.shape[1]}] (the head's columns), got {vocab_size}")
    flat_targets = targets.reshape(B * T)
    args = (dtype, chunk_rows, vocab_size, ignore_index)
    return _linear_cross_entropy(hidden.reshape(B * T, C), head, flat_targets, *args)


def dropout_rng(key: Array) -> Array:
    """The key the model's dropout gets, derived from ``key`` in JAX's "rbg" implementation.

    Flax derives one key per layer and dropout site from it (``split`` / ``fold_in``); with an
    "rbg" key each derivation is one small RngBitGenerator op, where threefry's is a chain of
    integer ops that XLA compiles anew at every site (seconds of the train step's compile time on
    CPU). The masks themselves come from :func:`jaxgpt.ops.keep_mask`. Same key in, same masks
    out, so training stays reproducible.
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    data = key.reshape(-1).astype(jnp.uint32)  # (2,) threefry key data
    return jax.random.wrap_key_data(jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)]), impl="rbg")


def train_loss(
    params: Params, cfg: GPTConfig, input_batch: Array, target_batch: Array, dropout_key: Array
) -> Array:
    """The training loss of one (B, T) batch with dropout on (the book's calc_loss_batch in training).

    The same number as ``cross_entropy(GPTModel(cfg).apply(..., deterministic=False,
    rngs={"dropout": dropout_rng(dropout_key)}), targets)``, computed by :func:`linear_cross_entropy`
    so that neither the forward nor the backward pass holds the (B, T, V) logits. The loss that
    :func:`jaxgpt.train.train_step` differentiates unless it is given another ``loss_fn``.
    """
    rngs = {"dropout": dropout_rng(dropout_key)}
    hidden = GPTModel(cfg).apply({"params": params}, input_batch, deterministic=False, head=False, rngs=rngs)
    # hidden: (B, T, C)
    if cfg.tie_embeddings:  # (C, V); bf16 matmuls on CPU need the transpose as a real copy
        embedding = params["tok_emb"]["embedding"]
        head = embedding.T if cfg.dtype == "float32" else transposed(embedding)
    else:
        head = params["out_head"]["kernel"]  # (C, V)
    return linear_cross_entropy(hidden, head, target_batch, cfg.dtype, vocab_size=cfg.vocab_size)


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
