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

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig
from jaxgpt.ops import (
    Dropout,
    Linear,
    explicit_attention,
    fused_attention,
    gelu_in_float32,
    init_normal,
    tied_head,
    vocab_init,
)

Array = jax.Array
Params = dict[str, Any]
KVCache = dict[str, Array]


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


class FeedForward(nn.Module):
    """Position-wise feed-forward network (book 4.3): C -> 4C -> GELU -> C."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, T, C) -> (B, T, C)
        C = self.cfg.emb_dim
        # `layers_0` and `layers_2` mirror the book's nn.Sequential indices (1 is the GELU).
        h = Linear(self.cfg, 4 * C, name="layers_0")(x)  # (B, T, 4C)
        h = gelu_in_float32(gelu, h)
        return Linear(self.cfg, C, name="layers_2")(h)  # (B, T, C)


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

        dropout = Dropout(cfg.drop_rate, deterministic=self.deterministic, name="dropout")
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
            context_vec = explicit_attention(
                flat(queries.transpose(0, 2, 1, 3)),
                kv["k"].astype(jnp.float32),  # a bf16 cache: in float32
                kv["v"].astype(jnp.float32),
                mask,
                dropout,
                layout="flat",
            )  # (B * n_heads, T, head_dim)
            context_vec = context_vec.reshape(B, n_heads, T, head_dim).transpose(0, 2, 1, 3)
            kv = {name: a.reshape(cache_shape) for name, a in kv.items()}
        elif cfg.drop_rate > 0 and not self.deterministic:
            # jax.nn.dot_product_attention has no dropout, so training with dropout keeps the
            # book's explicit attention weights and drops them exactly as the book does.
            if mask is None:
                mask = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None]  # (1, 1, T, T)
            context_vec = explicit_attention(queries, keys, values, mask, dropout)
        else:
            context_vec = fused_attention(queries, keys, values, mask, cfg.dtype)  # (B, T, n_heads, hd)
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
            cfg.padded_vocab_size, cfg.emb_dim, embedding_init=vocab_init(V, axis=0), name="tok_emb"
        )
        pos_emb = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=init_normal, name="pos_emb")
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
            logits = tied_head(x, tok_emb.embedding, cfg.dtype)  # (B, T, V)
        else:
            head = Linear(cfg, cfg.padded_vocab_size, False, vocab_init(V, axis=1), name="out_head")
            logits = head(x)  # (B, T, V)
        if cfg.padded_vocab_size != V:
            logits = logits[..., :V]  # the padding's logits are never seen

        if cache is None:
            return logits
        return logits, {"k": kv["k"], "v": kv["v"], "index": index + T, "start": cache["start"]}


def init_params(cfg: GPTConfig, key: Array) -> Params:
    """Randomly initialised parameters for ``cfg`` (GPT-2's N(0, 0.02) weights, unit norms)."""
    dummy = jnp.zeros((1, min(cfg.context_length, 8)), dtype=jnp.int32)
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
