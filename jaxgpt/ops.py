"""The speed devices behind the book's model, each a small function or module.

``jaxgpt/model.py`` reads like chapter 4 of the book and reaches everything here through a few
seams: its ``Linear`` and ``Dropout`` layers, :func:`attention` and :func:`cached_attention`,
:func:`gelu_in_float32` and :func:`tied_head`. Each device computes what the book computes (the
tests hold each one to a plain reference); its docstring says why it exists, and
``docs/speed.md`` has the measurements that kept it.

Shapes: B batch, T tokens in this call, S key/value slots, n_heads heads of head_dim, C width,
V vocabulary; N = B * n_heads in the KV cache's layout.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp

from jaxgpt.config import GPTConfig

Array = jax.Array

init_normal = nn.initializers.normal(stddev=0.02)  # GPT-2's initialisation of every weight matrix


# --- vocabulary padding ---------------------------------------------------------------------------


def pad_vocab(table: Array, padded_size: int, axis: int) -> Array:
    """``table`` with zeros appended along its vocabulary ``axis`` up to ``padded_size`` entries.

    GPUs multiply faster by a vocabulary rounded up to a multiple of 64
    (``GPTConfig.vocab_pad_multiple``); the extra rows are zero and their logits never seen
    (docs/speed.md).
    """
    widths = [(0, 0)] * table.ndim
    widths[axis] = (0, padded_size - table.shape[axis])
    return jnp.pad(table, widths)


def vocab_init(vocab_size: int, axis: int) -> nn.initializers.Initializer:
    """GPT-2's initialisation of a table with ``vocab_size`` real entries along ``axis``, zeros up to
    the padded size: padding never changes the real entries' initial values."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        real_shape = shape[:axis] + (vocab_size,) + shape[axis + 1 :]
        return pad_vocab(init_normal(key, real_shape, dtype), shape[axis], axis)

    return init


# --- matmuls: float32, or bfloat16 inputs accumulating in float32 ----------------------------------


def transposed(a: Array) -> Array:
    """``a.T`` for a 2-D array, as a real row-major copy on a CPU.

    XLA folds a plain transpose into the matmul that reads it, and on a CPU the bfloat16 matmul
    library then cannot take the operand and falls back to float32 at half the speed; a transpose
    through a rank-3 view is copied instead (docs/speed.md). GPUs take transposed operands as they are.
    """
    if jax.default_backend() != "cpu":
        return a.T
    return jnp.transpose(a[:, :, None], (1, 0, 2)).reshape(a.shape[1], a.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_matmul(x: Array, w: Array, out_dtype: Any) -> Array:
    """(M, K) @ (K, N) -> (M, N) ``out_dtype``, multiplying in bfloat16 and accumulating in float32.

    Its own VJP keeps the two backward products in bfloat16 too, where autodiff would give them
    float32 cotangents and float32 speed (docs/speed.md). ``x`` arrives in ``out_dtype`` (the
    caller casts it), so its gradient has that dtype; the weight's gradient is float32, like the
    param it updates.
    """
    return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=out_dtype)


def _bf16_matmul_fwd(x: Array, w: Array, out_dtype: Any) -> tuple[Array, tuple[Array, Array]]:
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)  # saved for the backward in bf16
    return jnp.dot(x16, w16, preferred_element_type=out_dtype), (x16, w16)


def _bf16_matmul_bwd(out_dtype: Any, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x16, w16 = res
    g16 = g.astype(jnp.bfloat16)
    dx = jnp.dot(g16, transposed(w16), preferred_element_type=out_dtype)  # (M, K)
    dw = jnp.dot(transposed(x16), g16, preferred_element_type=jnp.float32)  # (K, N)
    return dx, dw


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def matmul(x: Array, w: Array, dtype: str, out_dtype: str = "float32") -> Array:
    """x (..., K) @ w (K, N) -> (..., N) in ``out_dtype``; ``dtype="bfloat16"`` multiplies in bf16.

    bfloat16 multiplication runs at twice float32's speed on a CPU with AVX-512 BF16 and on every
    GPU (docs/speed.md); ``out_dtype="bfloat16"`` (with bf16 multiplication only) also takes and
    returns bf16 activations. Either way x is multiplied as (M, K) rows: a 3-D x made XLA's CPU
    compiler copy it transposed to form w's gradient (docs/speed.md).
    """
    lead, rows = x.shape[:-1], x.reshape(-1, x.shape[-1])  # rows (M, K), M = B * T
    if dtype == "float32":
        y = rows @ w
    else:
        out = jnp.dtype(out_dtype)
        y = bf16_matmul(rows.astype(out), w, out)
    return y.reshape(*lead, w.shape[-1])


def matmul_rows(x: Array, rows: Array, dtype: str, out_dtype: str = "float32") -> Array:
    """x (..., K) @ rows.T -> (..., N) for a weight stored as ``rows`` (N, K), one row per output.

    The decoding form of :func:`matmul`. With one row of x per sequence the product is bound by
    memory, and XLA streams a matrix faster as dot products along its rows than as sums of its
    columns; the barrier keeps XLA from folding the transpose of (rows @ x.T) back into the
    column form (docs/speed.md).
    """
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])  # x (M, K)
    if dtype == "float32":
        y = rows @ x.T  # (N, M)
    else:
        y = jnp.dot(
            rows.astype(jnp.bfloat16), x.T.astype(jnp.bfloat16), preferred_element_type=jnp.dtype(out_dtype)
        )
    return jax.lax.optimization_barrier(y).T.reshape(*lead, rows.shape[0])  # (..., N): a small copy


class Linear(nn.Module):
    """``x @ kernel + bias`` (torch's ``nn.Linear``; the param tree of ``flax.linen.Dense``).

    Params stay float32; ``cfg.dtype`` sets the precision of the multiplication (:func:`matmul`)
    and ``out_dtype`` (default ``cfg.activation_dtype``) the dtype of the output. ``rows=True``
    stores the kernel as (features, in) and multiplies with :func:`matmul_rows`: the layout
    decoding reads (see :func:`decode_params`).
    """

    cfg: GPTConfig
    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = init_normal
    rows: bool = False
    out_dtype: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (..., in) -> (..., features)
        cfg = self.cfg
        out_dtype = self.out_dtype or cfg.activation_dtype
        if self.rows:
            kernel = self.param("kernel", self.kernel_init, (self.features, x.shape[-1]), jnp.float32)
            y = matmul_rows(x, kernel, cfg.dtype, out_dtype)
        else:
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
            y = matmul(x, kernel, cfg.dtype, out_dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
        return y


def tied_head(x: Array, embedding: Array, dtype: str) -> Array:
    """Logits x (..., C) @ embedding.T (C, V): GPT-2's head is its token embedding.

    In bfloat16 the embedding is cast before its transpose is copied (:func:`transposed`), which
    moves half the bytes.
    """
    if dtype == "float32":
        return x @ embedding.T
    return matmul(x, transposed(embedding.astype(jnp.bfloat16)), dtype)


def _split_layers(stacked: Any, n_layers: int) -> list[Any]:
    """A tree whose leaves have a leading layer axis -> a list of ``n_layers`` per-layer trees."""
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], stacked) for i in range(n_layers)]


def _kernels_as_rows(tree: Any, dtype: str) -> Any:
    """Every ``kernel`` (in, out) of a param tree as rows (out, in), in bfloat16 when ``dtype`` is."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for name, value in tree.items():
        if name == "kernel":
            out[name] = value.T if dtype == "float32" else value.T.astype(jnp.bfloat16)
        else:
            out[name] = _kernels_as_rows(value, dtype)
    return out


def decode_params(params: Mapping[str, Any], cfg: GPTConfig) -> dict[str, Any]:
    """``params`` laid out as ``GPTModel(cfg, decode=True)`` reads them, once before a decode loop.

    Each block's params are split out of the stacked ``trf_blocks`` into ``trf_blocks_0``,
    ``trf_blocks_1``, ...: sliced inside the loop, the stacked weights were copied on every token
    on a CPU. Every kernel is stored as rows (out, in) for :func:`matmul_rows`, and the head as rows
    (V, C) under ``out_head`` (the token embedding itself when tied); with bfloat16 matmuls the
    matrices are cast here, not on every token (docs/speed.md).
    """
    out = {name: value for name, value in params.items() if name not in ("trf_blocks", "out_head")}
    for i, layer in enumerate(_split_layers(params["trf_blocks"], cfg.n_layers)):
        out[f"trf_blocks_{i}"] = _kernels_as_rows(layer, cfg.dtype)
    head = params["tok_emb"]["embedding"] if cfg.tie_embeddings else params["out_head"]["kernel"].T  # (V, C)
    out["out_head"] = {"kernel": head if cfg.dtype == "float32" else head.astype(jnp.bfloat16)}
    return out


# --- dropout ----------------------------------------------------------------------------------------


def _mix32(x: Array) -> Array:
    """A strong 32-bit integer hash (Wellons' "lowbias32"): a bijection on uint32 values."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def keep_mask(key: Array, shape: tuple[int, ...], keep_prob: float) -> Array:
    """Bernoulli(``keep_prob``) booleans of ``shape``, a deterministic function of ``key``.

    Each element's 32 random bits are a keyed hash of its own index (a counter-based generator, as
    Philox and Threefry are, with a lighter mixing function): two rounds of :func:`_mix32`, keyed
    by the words of ``key``, the leading index folded into the second round. XLA expands
    ``jax.random.bernoulli`` into long integer programs; on a CPU this draws the same masks
    many times faster (docs/speed.md).
    """
    shape = tuple(shape)
    if not shape:
        return keep_mask(key, (1,), keep_prob).reshape(())
    rest = math.prod(shape[1:])  # positions within one leading index
    if rest >= 2**32:
        raise ValueError(f"keep_mask counts positions in uint32: {shape[1:]} has {rest} >= 2**32 elements")
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)  # 2 (threefry) or 4 (rbg) words
    k0, k1 = words[0], words[-1]
    lead = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)  # the leading index (batch)
    counter = jax.lax.iota(jnp.uint32, rest).reshape((1,) + shape[1:])
    bits = _mix32(_mix32(counter ^ k0) ^ (lead * jnp.uint32(0x9E3779B9) + k1))
    threshold = min(round(keep_prob * 2**32), 2**32 - 1)  # P(bits < threshold) = keep_prob
    return bits < jnp.uint32(threshold)


class Dropout(nn.Module):
    """Inverted dropout (``torch.nn.Dropout``): zero each element with probability ``rate`` and
    scale the survivors by 1 / (1 - rate); the identity when ``deterministic``.

    ``flax.linen.Dropout``'s interface and semantics, with the mask drawn by :func:`keep_mask` from
    the module's ``"dropout"`` rng, for speed (docs/speed.md).
    """

    rate: float
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        mask = keep_mask(self.make_rng("dropout"), x.shape, keep_prob)
        return jnp.where(mask, x / keep_prob, jnp.zeros((), x.dtype))


# --- GELU -------------------------------------------------------------------------------------------


@functools.partial(jax.checkpoint, static_argnums=(0,))
def gelu_in_float32(gelu: Callable[[Array], Array], h: Array) -> Array:
    """``gelu(h)`` in float32 arithmetic, returned in ``h``'s dtype, and recomputed in the backward pass.

    Checkpointed so that the backward pass recomputes the tanh from ``h`` (kept anyway) instead of
    storing float32 intermediates of the (B, T, 4C) hidden layer: less memory at the same speed
    (docs/speed.md).
    """
    return gelu(h.astype(jnp.float32)).astype(h.dtype)


# --- attention --------------------------------------------------------------------------------------

# einsum letters of (queries, keys and values, scores) in the layouts attention is computed in
_ATTENTION_LAYOUTS = {
    "bshd": ("bthd", "bshd", "bhts"),  # as projected: (B, T or S, n_heads, head_dim)
    "flat": ("ntd", "nsd", "nts"),  # the KV cache's: heads folded into the batch, N = B * n_heads
}


def explicit_attention(
    queries: Array,
    keys: Array,
    values: Array,
    mask: Array,
    dropout: Callable[[Array], Array] | None = None,
    layout: str = "bshd",
) -> Array:
    """The book's attention step by step: softmax(q k^T / sqrt(head_dim)) over allowed keys, @ v.

    ``layout="bshd"``: queries (B, T, n_heads, head_dim), keys and values (B, S, n_heads, head_dim),
    mask broadcasting to (B, n_heads, T, S) -> (B, T, n_heads, head_dim). ``layout="flat"``: queries
    (N, T, head_dim), keys and values (N, S, head_dim), mask (N, T, S) -> (N, T, head_dim). The
    scores and their softmax are float32 whatever the inputs; ``dropout`` drops attention weights.
    """
    q_spec, kv_spec, scores_spec = _ATTENTION_LAYOUTS[layout]
    head_dim = queries.shape[-1]
    attn_scores = jnp.einsum(
        f"{q_spec},{kv_spec}->{scores_spec}", queries, keys, preferred_element_type=jnp.float32
    )  # (B, n_heads, T, S) or (N, T, S)
    attn_scores = jnp.where(mask, attn_scores / math.sqrt(head_dim), -jnp.inf)
    attn_weights = jax.nn.softmax(attn_scores, axis=-1)
    if dropout is not None:
        attn_weights = dropout(attn_weights)
    attn_weights = attn_weights.astype(values.dtype)
    return jnp.einsum(f"{scores_spec},{kv_spec}->{q_spec}", attn_weights, values)


def _cudnn_unavailable(head_dim: int) -> str | None:
    """Why cuDNN's flash attention cannot run on this GPU for ``head_dim``, or None when it can."""
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:  # JAX reports a "gpu" backend but has no GPU device to run on
        return "no GPU device is visible"
    if "cuda" not in jax.extend.backend.get_backend("gpu").platform_version.lower():
        return "the GPU is not driven by CUDA"
    capability = tuple(int(part) for part in str(getattr(device, "compute_capability", "0.0")).split("."))
    if capability < (8, 0):
        return f"compute capability {'.'.join(map(str, capability))} is below 8.0"
    max_head_dim = 256 if capability >= (9, 0) else 128
    if head_dim > max_head_dim or head_dim % 8:
        return f"head_dim {head_dim} is not a multiple of 8 up to {max_head_dim}"
    return None


@functools.cache
def attention_implementation(backend: str, dtype: str, head_dim: int) -> str:
    """The ``jax.nn.dot_product_attention`` implementation for a backend, matmul dtype and head size.

    ``"cudnn"`` (flash attention, never holding the (T, S) weights: less memory and faster, see
    docs/speed.md) on a CUDA GPU in bfloat16 where cuDNN supports the head size; ``"xla"``
    otherwise. A bfloat16 GPU run that cannot use cuDNN says why, once.
    """
    if backend != "gpu" or dtype != "bfloat16":
        return "xla"
    reason = _cudnn_unavailable(head_dim)
    if reason is not None:
        warnings.warn(f"cuDNN flash attention is off ({reason}); using XLA's attention", stacklevel=2)
        return "xla"
    return "cudnn"


def fused_attention(queries: Array, keys: Array, values: Array, mask: Array | None, dtype: str) -> Array:
    """:func:`explicit_attention` without dropout as one ``jax.nn.dot_product_attention`` call.

    XLA's implementation on a CPU, cuDNN's flash attention on a GPU where
    :func:`attention_implementation` picks it. ``mask=None`` means causal attention over the
    call's own tokens.
    """
    scale = 1.0 / math.sqrt(queries.shape[-1])
    causal = mask is None
    if attention_implementation(jax.default_backend(), dtype, queries.shape[-1]) == "cudnn":
        q, k, v = (t.astype(jnp.bfloat16) for t in (queries, keys, values))
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
        )
        return out.astype(queries.dtype)
    return jax.nn.dot_product_attention(queries, keys, values, mask=mask, scale=scale, is_causal=causal)


def attention(
    queries: Array,
    keys: Array,
    values: Array,
    mask: Array | None,
    dtype: str,
    dropout: Callable[[Array], Array] | None = None,
) -> Array:
    """Causal multi-head attention (B, T, n_heads, head_dim) -> (B, T, n_heads, head_dim).

    ``mask`` (B or 1, 1, T, S) is True where a query may attend a key; None is plain causal
    attention. Without ``dropout`` this is one fused call (:func:`fused_attention`); with it,
    the book's explicit weights, which are dropped as the book drops them.
    """
    if dropout is None:
        return fused_attention(queries, keys, values, mask, dtype)
    if mask is None:
        T = queries.shape[1]
        mask = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None]  # (1, 1, T, T)
    return explicit_attention(queries, keys, values, mask, dropout)


def cached_attention(
    queries: Array,
    keys: Array,
    values: Array,
    kv: dict[str, Array],
    index: Array,
    mask: Array,
    dropout: Callable[[Array], Array] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Write this call's keys and values into a layer's KV cache at slot ``index``, attend over it.

    queries, keys, values (B, T, n_heads, head_dim); ``kv`` holds "k" and "v", each (B * n_heads,
    S, head_dim); mask (B, 1, T, S). Returns (B, T, n_heads, head_dim) and the updated cache. With
    the heads folded into the batch XLA updates the cache in place and both products read it as
    it is; (B, n_heads, S, head_dim) was copied several times per token (docs/speed.md).
    """
    B, T, n_heads, head_dim = queries.shape

    def flat(a: Array) -> Array:  # (B, T, n_heads, head_dim) -> (B * n_heads, T, head_dim)
        return a.transpose(0, 2, 1, 3).reshape(B * n_heads, T, head_dim)

    kv = {
        name: jax.lax.dynamic_update_slice_in_dim(kv[name], flat(new).astype(kv[name].dtype), index, axis=1)
        for name, new in (("k", keys), ("v", values))
    }
    S = kv["k"].shape[1]
    mask = jnp.broadcast_to(mask, (B, n_heads, T, S)).reshape(B * n_heads, T, S)
    context_vec = explicit_attention(
        flat(queries), kv["k"].astype(jnp.float32), kv["v"].astype(jnp.float32), mask, dropout, layout="flat"
    )  # (B * n_heads, T, head_dim); a bf16 cache is read in float32
    return context_vec.reshape(B, n_heads, T, head_dim).transpose(0, 2, 1, 3), kv
