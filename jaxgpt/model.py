"""GPT-2 as pure Flax modules, in the order chapter 4 of the book builds them.

Shape legend (the book's names):
  B          batch size
  T          tokens in this call (num_tokens in the book)
  S          key/value slots attended to: T without a cache, the cache size with one
  C          emb_dim, the width of the residual stream (d_out in chapter 3)
  n_heads    attention heads;  head_dim = C // n_heads
  V          vocab_size
  L          n_layers

The transformer blocks are stacked under ``nn.scan``: their parameters carry a leading axis of
size L, and the whole stack compiles as one block, so compile time does not grow with depth.
The key/value cache used for generation is an explicit pytree that goes in and comes back out;
nothing in a module is mutable state.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig
from jaxgpt.init import book_init

Array = jax.Array
Params = dict[str, Any]
KVCache = dict[str, Array]

_init_normal = nn.initializers.normal(stddev=0.02)  # GPT-2's initialisation


def pad_vocab(table: Array, padded_size: int, axis: int) -> Array:
    """``table`` with zeros appended along its vocabulary ``axis`` up to ``padded_size`` entries
    (``GPTConfig.vocab_pad_multiple``)."""
    widths = [(0, 0)] * table.ndim
    widths[axis] = (0, padded_size - table.shape[axis])
    return jnp.pad(table, widths)


def _init_vocab(vocab_size: int, axis: int) -> nn.initializers.Initializer:
    """GPT-2's initialisation of a table with ``vocab_size`` entries along ``axis``, then zeros
    appended up to the padded size: padding never changes the real entries' initial values."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        real_shape = shape[:axis] + (vocab_size,) + shape[axis + 1 :]
        return pad_vocab(_init_normal(key, real_shape, dtype), shape[axis], axis)

    return init


# --- matmuls: float32, or bfloat16 inputs accumulating in float32 (cfg.dtype) ---


def _transposed(a: Array) -> Array:
    """``a.T`` for a 2-D array, as a real row-major copy.

    XLA folds a plain transpose into the matmul that reads it; on CPU the bfloat16 matmul
    library then cannot take the operand and XLA falls back to float32 (half the speed). A
    transpose through a rank-3 view is copied instead, and the copy is cheap next to the matmul.
    (GPUs take transposed operands as they are.)
    """
    if jax.default_backend() != "cpu":
        return a.T
    return jnp.transpose(a[:, :, None], (1, 0, 2)).reshape(a.shape[1], a.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_matmul(x: Array, w: Array, out_dtype: Any) -> Array:
    """(M, K) @ (K, N) -> (M, N) ``out_dtype``, multiplying in bfloat16 and accumulating in float32.

    ``x`` arrives in ``out_dtype`` (the caller casts it), so its gradient has that dtype too.
    """
    return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=out_dtype)


def _bf16_matmul_fwd(x: Array, w: Array, out_dtype: Any) -> tuple[Array, tuple[Array, Array]]:
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)  # saved for the backward in bf16
    return jnp.dot(x16, w16, preferred_element_type=out_dtype), (x16, w16)


def _bf16_matmul_bwd(out_dtype: Any, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    # Autodiff would give the backward matmuls float32 cotangents (so float32 speed); here both
    # are bf16 x bf16 products too. The weight gradient comes back in float32, like the param it
    # updates; the input's in out_dtype, like the input.
    x16, w16 = res
    g16 = g.astype(jnp.bfloat16)
    dx = jnp.dot(g16, _transposed(w16), preferred_element_type=out_dtype)  # (M, K)
    dw = jnp.dot(_transposed(x16), g16, preferred_element_type=jnp.float32)  # (K, N)
    return dx, dw


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def matmul(x: Array, w: Array, dtype: str, out_dtype: str = "float32") -> Array:
    """x (..., K) @ w (K, N) -> (..., N) in ``out_dtype``; ``dtype="bfloat16"`` multiplies in bf16.

    ``out_dtype="bfloat16"`` (with bf16 multiplication only) also returns bf16 and takes x in bf16.
    """
    if dtype == "float32":
        return x @ w
    lead = x.shape[:-1]
    out = jnp.dtype(out_dtype)
    y = _bf16_matmul(x.reshape(-1, x.shape[-1]).astype(out), w, out)
    return y.reshape(*lead, w.shape[-1])


def matmul_rows(x: Array, rows: Array, dtype: str, out_dtype: str = "float32") -> Array:
    """x (..., K) @ rows.T -> (..., N) for a weight stored as ``rows`` (N, K), one row per output.

    The decoding form of :func:`matmul`. With one row of x per sequence the product is bound by
    the memory: each weight is read once for a few multiply-adds. XLA streams a matrix faster as
    dot products along its rows than as sums of its columns, so the weight is kept (N, K) and the
    product formed as (rows @ x.T).T; the barrier keeps XLA from folding that transpose back into
    the column form. gpt2-small's greedy decode on a 2-core CPU: 9% more tokens/s at B=1, 24% at
    B=8 (docs/speed.md).
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
    """``x @ kernel + bias`` (torch's nn.Linear; the param tree of ``flax.linen.Dense``).

    Params stay float32; ``cfg.dtype`` sets the precision of the multiplication and
    ``cfg.activation_dtype`` the dtype of the output. Given ``kernel_rows`` (features, in) instead
    of ``kernel``, as decoding prepares its weights, it multiplies with :func:`matmul_rows`.
    """

    cfg: GPTConfig
    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = _init_normal

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (..., in) -> (..., features)
        cfg = self.cfg
        if self.has_variable("params", "kernel_rows"):  # decoding (jaxgpt.generate._decode_weights)
            y = matmul_rows(x, self.get_variable("params", "kernel_rows"), cfg.dtype, cfg.activation_dtype)
        else:
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
            y = matmul(x, kernel, cfg.dtype, cfg.activation_dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
        return y


class LayerNorm(nn.Module):
    """Layer normalisation (book 4.2): biased variance over the last axis, eps 1e-5, scale and shift."""

    emb_dim: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (..., C) -> (..., C)
        scale = self.param("scale", nn.initializers.ones, (self.emb_dim,), jnp.float32)
        shift = self.param("shift", nn.initializers.zeros, (self.emb_dim,), jnp.float32)
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased: divide by C, not C - 1
        norm_x = (x - mean) / jnp.sqrt(var + self.eps)
        lead = (1,) * (x.ndim - 1)
        return scale.reshape(lead + (-1,)) * norm_x + shift.reshape(lead + (-1,))


def gelu(x: Array) -> Array:
    """GELU, the tanh approximation GPT-2 was trained with (book 4.3)."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


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
    by the words of ``key``, leading index folded into the second round. On CPU this draws the
    ~6M masks of one gpt2-small attention dropout in 2 ms, where ``jax.random.bernoulli`` takes
    35 ms (threefry) to 60 ms (rbg): XLA expands those generators into long integer programs.
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

    ``flax.linen.Dropout``'s interface and semantics, with the mask drawn by :func:`keep_mask`
    from the module's ``"dropout"`` rng.
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


@jax.checkpoint
def _gelu_float32(h: Array) -> Array:
    """:func:`gelu` in float32 arithmetic; bf16 activations stay bf16.

    Checkpointed: the backward pass recomputes the tanh from ``h`` (kept anyway, in bf16 with bf16
    activations) instead of keeping float32 intermediates of the (B, T, 4C) hidden layer, which a
    train step writes and reads back once per layer. gpt2-small, T=1024, batch 64 on an H200: peak
    memory 30.9 -> 21.9 GiB and 1.3% faster. On the CPU, same speed; T=256, batch 8: 1.1 GB less;
    T=1024, batch 8: XLA's temporaries 23.2 -> 18.7 GiB, so it trains in 24 GiB without remat.
    """
    return gelu(h.astype(jnp.float32)).astype(h.dtype)


class FeedForward(nn.Module):
    """Position-wise feed-forward network (book 4.3): C -> 4C -> GELU -> C."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, T, C) -> (B, T, C)
        C = self.cfg.emb_dim
        # `layers_0` and `layers_2` mirror the book's nn.Sequential indices (1 is the GELU).
        h = Linear(self.cfg, 4 * C, name="layers_0")(x)  # (B, T, 4C)
        h = _gelu_float32(h)
        return Linear(self.cfg, C, name="layers_2")(h)  # (B, T, C)


# einsum letters of (queries, keys and values, scores) in the layouts attention is computed in
_ATTENTION_LAYOUTS = {
    "bshd": ("bthd", "bshd", "bhts"),  # as projected: (B, T or S, n_heads, head_dim)
    "flat": ("ntd", "nsd", "nts"),  # the KV cache's: heads folded into the batch, n = B * n_heads
}


def _attention_with_dropout(
    queries: Array,
    keys: Array,
    values: Array,
    mask: Array,
    dropout: Dropout,
    deterministic: bool,
    layout: str = "bshd",
) -> Array:
    """The book's attention, step by step, with dropout on the attention weights.

    ``layout="bshd"``: queries (B, T, n_heads, head_dim), keys and values (B, S, n_heads,
    head_dim), mask broadcasting to (B, n_heads, T, S) -> (B, T, n_heads, head_dim).
    ``layout="flat"``: queries (N, T, head_dim), keys and values (N, S, head_dim), mask (N, T, S)
    -> (N, T, head_dim), for N = B * n_heads: the KV cache's layout (see ``MultiHeadAttention``).
    """
    q_spec, kv_spec, scores_spec = _ATTENTION_LAYOUTS[layout]
    head_dim = queries.shape[-1]
    # the scores and their softmax in float32 whatever the activations' dtype
    attn_scores = jnp.einsum(
        f"{q_spec},{kv_spec}->{scores_spec}", queries, keys, preferred_element_type=jnp.float32
    )  # (B, n_heads, T, S) or (N, T, S)
    attn_scores = jnp.where(mask, attn_scores / math.sqrt(head_dim), -jnp.inf)
    attn_weights = jax.nn.softmax(attn_scores, axis=-1)
    attn_weights = dropout(attn_weights, deterministic=deterministic)
    attn_weights = attn_weights.astype(values.dtype)
    return jnp.einsum(f"{scores_spec},{kv_spec}->{q_spec}", attn_weights, values)


def _fused_attention(queries: Array, keys: Array, values: Array, mask: Array | None, dtype: str) -> Array:
    """The same attention without dropout, as one ``jax.nn.dot_product_attention`` call.

    XLA's implementation on CPU; cuDNN's flash attention on a GPU in bfloat16 (never holds the
    (T, S) weights). ``mask=None`` means plain causal attention over the call's own tokens.
    """
    scale = 1.0 / math.sqrt(queries.shape[-1])
    causal = mask is None
    if dtype == "bfloat16" and jax.default_backend() == "gpu":
        q, k, v = (t.astype(jnp.bfloat16) for t in (queries, keys, values))
        try:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
            )
            return out.astype(queries.dtype)
        except Exception:  # this GPU/cuDNN/shape has no fused kernel: XLA's version below
            pass
    return jax.nn.dot_product_attention(queries, keys, values, mask=mask, scale=scale, is_causal=causal)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with dropout on the attention weights (book 3.6)."""

    cfg: GPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x: Array, mask: Array | None, kv: KVCache | None = None, index: Array | None = None
    ) -> tuple[Array, KVCache | None]:
        """x (B, T, C); mask (B or 1, 1, T, S) True where a query may attend a key (None: causal, S = T).

        With a cache, ``kv`` holds this layer's keys and values, each (B, n_heads, S, head_dim) or
        (B * n_heads, S, head_dim); this call's keys and values are written at slot ``index`` and
        the updated cache returned in the layout it came in.
        """
        cfg = self.cfg
        B, T, C = x.shape
        n_heads, head_dim = cfg.n_heads, cfg.head_dim

        # Three matmuls, as in the book: fusing them into one (C, 3C) matmul measured slower on CPU
        # (the concatenation and the split gradient cost more than they save), and XLA's GPU
        # compiler merges matmuls that share an input by itself.
        queries = Linear(cfg, C, cfg.qkv_bias, name="W_query")(x).reshape(B, T, n_heads, head_dim)
        keys = Linear(cfg, C, cfg.qkv_bias, name="W_key")(x).reshape(B, T, n_heads, head_dim)
        values = Linear(cfg, C, cfg.qkv_bias, name="W_value")(x).reshape(B, T, n_heads, head_dim)

        dropout = Dropout(cfg.drop_rate, name="dropout")
        if kv is not None:  # decode: write into the fixed-size cache, attend over all its slots
            # The update and both products run with the heads folded into the batch, (B * n_heads,
            # S, head_dim): XLA then updates the cache in place and the products read it as it is.
            # With (B, n_heads, ...) at B=1 it copied each layer's caches five times per token.
            def flat(a: Array) -> Array:  # (B, n_heads, S, head_dim) -> (B * n_heads, S, head_dim)
                return a.reshape(B * n_heads, -1, head_dim)

            cache_shape = kv["k"].shape  # either layout; the result goes back to it
            kv = {
                name: jax.lax.dynamic_update_slice_in_dim(
                    flat(kv[name]), flat(new.transpose(0, 2, 1, 3)).astype(kv[name].dtype), index, axis=1
                )
                for name, new in (("k", keys), ("v", values))
            }
            S = kv["k"].shape[1]
            mask = jnp.broadcast_to(mask, (B, n_heads, T, S)).reshape(B * n_heads, T, S)
            context_vec = _attention_with_dropout(
                flat(queries.transpose(0, 2, 1, 3)),
                kv["k"].astype(jnp.float32),  # a bf16 cache: in float32
                kv["v"].astype(jnp.float32),
                mask,
                dropout,
                self.deterministic,
                layout="flat",
            )  # (B * n_heads, T, head_dim)
            context_vec = context_vec.reshape(B, n_heads, T, head_dim).transpose(0, 2, 1, 3)
            kv = {name: a.reshape(cache_shape) for name, a in kv.items()}
        elif cfg.drop_rate > 0 and not self.deterministic:
            # jax.nn.dot_product_attention has no dropout, so training with dropout keeps the
            # book's explicit attention weights and drops them exactly as the book does.
            if mask is None:
                mask = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None]  # (1, 1, T, T)
            context_vec = _attention_with_dropout(queries, keys, values, mask, dropout, self.deterministic)
        else:
            context_vec = _fused_attention(queries, keys, values, mask, cfg.dtype)  # (B, T, n_heads, hd)
        context_vec = context_vec.reshape(B, T, C)  # concatenate the heads
        return Linear(cfg, C, name="out_proj")(context_vec), kv


class TransformerBlock(nn.Module):
    """Transformer block (book 4.5), Pre-LN: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    cfg: GPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x: Array, kv: KVCache | None, mask: Array, index: Array | None
    ) -> tuple[Array, KVCache | None]:
        """(B, T, C) -> (B, T, C): the same shape in and out, so blocks stack.

        The signature ``(carry, per_layer, *broadcast) -> (carry, per_layer)`` is what ``nn.scan``
        needs: x is carried from layer to layer, the layer's cache slice goes in and out.
        """
        cfg = self.cfg
        norm1, norm2 = LayerNorm(cfg.emb_dim, name="norm1"), LayerNorm(cfg.emb_dim, name="norm2")
        att, ff = MultiHeadAttention(cfg, self.deterministic, name="att"), FeedForward(cfg, name="ff")
        drop_shortcut = Dropout(cfg.drop_rate, deterministic=self.deterministic, name="drop_shortcut")

        act = cfg.activation_dtype  # the branches' activations; x, the residual stream, stays float32
        if cfg.norm_first:  # Pre-LN (GPT-2, the book): normalise the input of each sub-layer
            h, kv = att(norm1(x).astype(act), mask, kv, index)
            x = x + drop_shortcut(h)  # shortcut connection
            x = x + drop_shortcut(ff(norm2(x).astype(act)))
        else:  # Post-LN (the original Transformer): normalise after each shortcut addition
            h, kv = att(x, mask, kv, index)
            x = norm1(x + drop_shortcut(h))
            x = norm2(x + drop_shortcut(ff(x)))
        return x, kv


_REMAT_POLICY = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute elementwise work
}


class GPTModel(nn.Module):
    """The GPT model (book 4.6): embeddings, L transformer blocks, final norm, logits head."""

    cfg: GPTConfig

    @nn.compact
    def __call__(
        self, idx: Array, *, deterministic: bool = True, cache: KVCache | None = None, head: bool = True
    ) -> Array | tuple[Array, KVCache]:
        """Token ids (B, T) -> logits (B, T, V).

        ``deterministic=False`` turns dropout on and needs a ``"dropout"`` rng. With ``cache`` (see
        :func:`init_cache`) the call continues a sequence: its tokens take the slots
        ``cache["index"] ...`` and ``(logits, new_cache)`` is returned. ``head=False`` stops
        after the final norm and returns the hidden states (B, T, C) instead of logits, for a
        loss that applies the head itself a few rows at a time (see ``jaxgpt.loss``).
        """
        cfg = self.cfg
        B, T = idx.shape
        if T > cfg.context_length:
            raise ValueError(
                f"input has {T} tokens but context_length is {cfg.context_length}; "
                "crop the input to its last context_length tokens"
            )

        if cache is None:
            positions = jnp.arange(T)[None, :]  # (1, T)
            mask = None  # plain causal attention (built where it is needed)
            index, kv = None, None
        else:
            index, start = cache["index"], cache["start"]  # scalar slot, (B,) first real slot per row
            S = cache["k"].shape[3]
            q_slot = index + jnp.arange(T)  # (T,)
            k_slot = jnp.arange(S)  # (S,)
            # (B, T): left padding shifts a row's positions
            positions = jnp.maximum(q_slot[None, :] - start[:, None], 0)
            causal = k_slot[None, None, :] <= q_slot[None, :, None]  # (1, T, S)
            real = k_slot[None, None, :] >= start[:, None, None]  # (B, 1, S): padding slots are not attended
            # a padding query sees itself, so no row of the softmax is empty
            own = k_slot[None, None, :] == q_slot[None, :, None]
            mask = ((causal & real) | own)[:, None]  # (B, 1, T, S)
            kv = {"k": cache["k"], "v": cache["v"]}  # each (L, B, n_heads, S, head_dim)

        V = cfg.vocab_size
        tok_emb = nn.Embed(
            cfg.padded_vocab_size, cfg.emb_dim, embedding_init=_init_vocab(V, axis=0), name="tok_emb"
        )
        pos_emb = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=_init_normal, name="pos_emb")
        x = tok_emb(idx) + pos_emb(positions)  # (B, T, C)
        x = Dropout(cfg.drop_rate, name="drop_emb")(x, deterministic=deterministic)

        block = TransformerBlock
        if cfg.remat != "none":
            block = nn.remat(block, policy=_REMAT_POLICY[cfg.remat], prevent_cse=False)
        trf_blocks = nn.scan(
            block,
            variable_axes={"params": 0},  # every param gets a leading layer axis L
            split_rngs={"params": True, "dropout": True},  # each layer its own init and dropout key
            in_axes=(0, nn.broadcast, nn.broadcast),  # kv per layer; mask and index shared
            length=cfg.n_layers,
            unroll=cfg.scan_unroll,
        )(cfg, deterministic, name="trf_blocks")
        x, kv = trf_blocks(x, kv, mask, index)

        x = LayerNorm(cfg.emb_dim, name="final_norm")(x)
        if not head and cache is None:
            return x  # (B, T, C)
        if cfg.tie_embeddings:  # GPT-2: the head is the token embedding, transposed
            embedding = tok_emb.embedding  # (V, C)
            if cfg.dtype == "float32":
                logits = x @ embedding.T  # (B, T, V)
            else:  # cast before the transpose copy: half the bytes to move
                logits = matmul(x, _transposed(embedding.astype(jnp.bfloat16)), cfg.dtype)  # (B, T, V)
        else:
            head = Linear(cfg, cfg.padded_vocab_size, False, _init_vocab(V, axis=1), name="out_head")
            logits = head(x)  # (B, T, V)
        if cfg.padded_vocab_size != V:
            logits = logits[..., :V]  # the padding's logits are never seen

        if cache is None:
            return logits
        return logits, {"k": kv["k"], "v": kv["v"], "index": index + T, "start": cache["start"]}


def init_params(cfg: GPTConfig, key: Array) -> Params:
    """Randomly initialised parameters for ``cfg``: GPT-2's N(0, 0.02) weights and unit norms, or
    with ``cfg.init == "book"`` PyTorch's defaults as the book's model gets them (jaxgpt.init)."""
    dummy = jnp.zeros((1, min(cfg.context_length, 8)), dtype=jnp.int32)
    if cfg.init == "book":
        return book_init(cfg, jax.eval_shape(lambda k: GPTModel(cfg).init(k, dummy)["params"], key), key)
    return jax.jit(lambda k: GPTModel(cfg).init(k, dummy)["params"])(key)


def init_cache(
    cfg: GPTConfig, batch_size: int, size: int | None = None, start: Array | None = None
) -> KVCache:
    """An empty key/value cache with ``size`` slots (default: context_length).

    ``start`` (B,) marks how many slots at the front of each row are left padding (default none).
    """
    size = cfg.context_length if size is None else size
    if not 0 < size <= cfg.context_length:
        raise ValueError(f"cache size must be in [1, context_length={cfg.context_length}], got {size}")
    shape = (cfg.n_layers, batch_size, cfg.n_heads, size, cfg.head_dim)  # (L, B, n_heads, S, head_dim)
    zeros = jnp.zeros(shape, dtype=jnp.dtype(cfg.dtype))
    start = jnp.zeros((batch_size,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return {"k": zeros, "v": zeros, "index": jnp.zeros((), jnp.int32), "start": start}


def count_params(params: Params) -> int:
    """Number of scalars in a parameter tree (the book's ``sum(p.numel() for p in ...)``)."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
