"""GPT-2 as pure Flax modules, in the order chapter 4 of the book builds them.

Shape legend (the book's names):
  B          batch size
  T          tokens in this call (num_tokens in the book)
  S          key/value slots attended to: T without a cache, the cache's size with one
  C          emb_dim, the width of the residual stream (d_out in chapter 3)
  n_heads    attention heads;  head_dim = C // n_heads
  V          vocab_size
  L          n_layers

The transformer blocks are stacked under ``nn.scan``: their parameters carry a leading axis of
size L, and the stack compiles as one block, so compile time does not grow with depth. For
generation, ``GPTModel(cfg, decode=True)`` runs the same blocks as a Python loop over per-layer
params and an explicit key/value cache that goes in and comes back out. The speed devices
(bfloat16 and decode matmuls, hash dropout, fused attention) live in ``jaxgpt/ops.py``, behind
``Linear``, ``Dropout`` and ``attention``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt import ops
from jaxgpt.config import GPTConfig
from jaxgpt.init import book_init
from jaxgpt.ops import Dropout, Linear

Array = jax.Array
Params = dict[str, Any]
KVCache = dict[str, Any]


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
    decode: bool = False  # weights stored as rows (see ops.decode_params)

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, T, C) -> (B, T, C)
        C = self.cfg.emb_dim
        # `layers_0` and `layers_2` mirror the book's nn.Sequential indices (1 is the GELU).
        h = Linear(self.cfg, 4 * C, rows=self.decode, name="layers_0")(x)  # (B, T, 4C)
        h = ops.gelu_in_float32(gelu, h)  # (B, T, 4C)
        return Linear(self.cfg, C, rows=self.decode, name="layers_2")(h)  # (B, T, C)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with dropout on the attention weights (book 3.6)."""

    cfg: GPTConfig
    deterministic: bool = True
    decode: bool = False  # weights stored as rows (see ops.decode_params)

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        kv: KVCache | None = None,
        index: Array | None = None,
        last_token: bool = False,
    ) -> tuple[Array, KVCache | None]:
        """x (B, T, C); mask (B or 1, 1, T, S) True where a query may attend a key (None: causal, S = T).

        With a cache, ``kv`` holds this layer's keys and values, each (B * n_heads, S, head_dim);
        this call's keys and values are written at slot ``index`` and the updated cache returned.
        ``last_token=True`` (causal, no cache) returns only the last token's row (B, 1, C): every
        token's key and value, but one query, for a classifier that reads the last token alone.
        """
        cfg = self.cfg
        B, T, C = x.shape
        n_heads, head_dim = cfg.n_heads, cfg.head_dim
        T_q = 1 if last_token else T  # query rows

        # Three matmuls, as in the book: fusing them into one (C, 3C) matmul measured slower on CPU,
        # and XLA's GPU compiler merges matmuls that share an input by itself.
        W_query = Linear(cfg, C, cfg.qkv_bias, rows=self.decode, name="W_query")
        W_key = Linear(cfg, C, cfg.qkv_bias, rows=self.decode, name="W_key")
        W_value = Linear(cfg, C, cfg.qkv_bias, rows=self.decode, name="W_value")
        queries = W_query(x[:, -T_q:]).reshape(B, T_q, n_heads, head_dim)  # (B, T_q, n_heads, head_dim)
        keys = W_key(x).reshape(B, T, n_heads, head_dim)  # (B, T, n_heads, head_dim)
        values = W_value(x).reshape(B, T, n_heads, head_dim)  # (B, T, n_heads, head_dim)

        dropout = Dropout(cfg.drop_rate, deterministic=self.deterministic, name="dropout")
        if kv is not None:  # generation: append to the cache, attend over all its slots
            context_vec, kv = ops.cached_attention(queries, keys, values, kv, index, mask, dropout)
        else:  # the attention weights are dropped only in training; otherwise one fused call
            if last_token:
                mask = jnp.ones((1, 1, 1, T), dtype=bool)  # the last token sees every key
            training = cfg.drop_rate > 0 and not self.deterministic
            context_vec = ops.attention(queries, keys, values, mask, cfg.dtype, dropout if training else None)
        context_vec = context_vec.reshape(B, T_q, C)  # (B, T_q, C): the heads concatenated
        return Linear(cfg, C, rows=self.decode, name="out_proj")(context_vec), kv


class TransformerBlock(nn.Module):
    """Transformer block (book 4.5), Pre-LN: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    cfg: GPTConfig
    deterministic: bool = True
    decode: bool = False  # weights stored as rows (see ops.decode_params)

    @nn.compact
    def __call__(
        self, x: Array, kv: KVCache | None, mask: Array | None, index: Array | None, last_token: bool = False
    ) -> tuple[Array, KVCache | None]:
        """(B, T, C) -> (B, T, C): the same shape in and out, so blocks stack.

        The signature ``(carry, per_layer, *broadcast) -> (carry, per_layer)`` is what ``nn.scan``
        needs: x is carried from layer to layer, the layer's cache goes in and out.
        ``last_token=True`` computes the last token's row only, (B, 1, C) (see MultiHeadAttention).
        """
        cfg = self.cfg
        norm1, norm2 = LayerNorm(cfg.emb_dim, name="norm1"), LayerNorm(cfg.emb_dim, name="norm2")
        att = MultiHeadAttention(cfg, self.deterministic, self.decode, name="att")
        ff = FeedForward(cfg, self.decode, name="ff")
        drop_shortcut = Dropout(cfg.drop_rate, deterministic=self.deterministic, name="drop_shortcut")

        act = cfg.activation_dtype  # the branches' activations; x, the residual stream, stays float32
        if cfg.norm_first:  # Pre-LN (GPT-2, the book): normalise the input of each sub-layer
            h, kv = att(norm1(x).astype(act), mask, kv, index, last_token)
            x = x[:, -1:] if last_token else x  # (B, 1, C) when only the last row goes on
            x = x + drop_shortcut(h)  # shortcut connection
            x = x + drop_shortcut(ff(norm2(x).astype(act)))
        else:  # Post-LN (the original Transformer): normalise after each shortcut addition
            h, kv = att(x, mask, kv, index, last_token)
            x = x[:, -1:] if last_token else x
            x = norm1(x + drop_shortcut(h))
            x = norm2(x + drop_shortcut(ff(x)))
        return x, kv  # (B, T, C)


_REMAT_POLICY = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute elementwise work
}


class GPTModel(nn.Module):
    """The GPT model (book 4.6): embeddings, L transformer blocks, final norm, logits head.

    ``decode=True`` continues sequences in a KV cache (:func:`init_cache`), one token or many per
    call, with the params as :func:`jaxgpt.ops.decode_params` lays them out: the blocks run as a
    loop over per-layer weights stored as rows, which a token-by-token decode reads fastest.
    """

    cfg: GPTConfig
    decode: bool = False

    @nn.compact
    def __call__(
        self, idx: Array, *, deterministic: bool = True, cache: KVCache | None = None, head: bool = True
    ) -> Array | tuple[Array, KVCache]:
        """Token ids (B, T) -> logits (B, T, V); with ``decode``, (logits, new cache).

        ``deterministic=False`` turns dropout on and needs a ``"dropout"`` rng. ``head=False``
        stops after the final norm and returns the hidden states (B, T, C), for a loss that
        applies the head itself a few rows at a time (see ``jaxgpt.loss``).
        """
        cfg = self.cfg
        B, T = idx.shape
        if T > cfg.context_length:
            raise ValueError(
                f"input has {T} tokens but context_length is {cfg.context_length}; "
                "crop the input to its last context_length tokens"
            )
        if (cache is not None) != self.decode:
            raise ValueError("a KV cache goes with GPTModel(cfg, decode=True), and decode=True needs one")

        if cache is None:
            positions = jnp.arange(T)[None, :]  # (1, T)
            mask = index = None  # plain causal attention
        else:
            index, start = cache["index"], cache["start"]  # scalar slot, (B,) first real slot per row
            S = cache["k"][0].shape[1]
            q_slot, k_slot = index + jnp.arange(T), jnp.arange(S)  # (T,), (S,)
            positions = jnp.maximum(q_slot[None, :] - start[:, None], 0)  # (B, T): left padding shifts them
            causal = k_slot[None, None, :] <= q_slot[None, :, None]  # (1, T, S)
            real = k_slot[None, None, :] >= start[:, None, None]  # (B, 1, S): padding slots are not attended
            own = k_slot[None, None, :] == q_slot[None, :, None]  # a padding query sees itself
            mask = ((causal & real) | own)[:, None]  # (B, 1, T, S)

        V, V_pad = cfg.vocab_size, cfg.padded_vocab_size  # V_pad: see GPTConfig.vocab_pad_multiple
        tok_emb = nn.Embed(V_pad, cfg.emb_dim, embedding_init=ops.vocab_init(V, axis=0), name="tok_emb")
        pos_emb = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=ops.init_normal, name="pos_emb")
        x = tok_emb(idx) + pos_emb(positions)  # (B, T, C)
        x = Dropout(cfg.drop_rate, name="drop_emb")(x, deterministic=deterministic)

        if cache is None:
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
            x, _ = trf_blocks(x, None, mask, index)  # (B, T, C)
        else:
            ks, vs = [], []
            for i in range(cfg.n_layers):
                block = TransformerBlock(cfg, deterministic, decode=True, name=f"trf_blocks_{i}")
                x, kv = block(x, {"k": cache["k"][i], "v": cache["v"][i]}, mask, index)  # (B, T, C)
                ks.append(kv["k"])
                vs.append(kv["v"])
            cache = {"k": tuple(ks), "v": tuple(vs), "index": index + T, "start": start}

        x = LayerNorm(cfg.emb_dim, name="final_norm")(x)  # (B, T, C)
        if not head:
            return x if cache is None else (x, cache)
        if self.decode:  # the head as rows (V, C), float32 logits
            logits = Linear(cfg, V_pad, False, rows=True, out_dtype="float32", name="out_head")(x)
        elif cfg.tie_embeddings:  # GPT-2: the head is the token embedding, transposed
            logits = ops.tied_head(x, tok_emb.embedding, cfg.dtype)  # (B, T, V)
        else:
            logits = Linear(cfg, V_pad, False, ops.vocab_init(V, axis=1), name="out_head")(x)  # (B, T, V)
        if V_pad != V:
            logits = logits[..., :V]  # the padding's logits are never seen
        return logits if cache is None else (logits, cache)


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
    """An empty key/value cache of ``size`` slots (default context_length) for ``GPTModel(cfg, decode=True)``.

    "k" and "v" hold one (B * n_heads, S, head_dim) array per layer: with the heads folded into
    the batch, XLA updates them in place. ``start`` (B,) marks how many slots at the front of each
    row are left padding (default none); "index" is the next slot to write.
    """
    size = cfg.context_length if size is None else size
    if not 0 < size <= cfg.context_length:
        raise ValueError(f"cache size must be in [1, context_length={cfg.context_length}], got {size}")
    zeros = jnp.zeros((batch_size * cfg.n_heads, size, cfg.head_dim), dtype=jnp.dtype(cfg.dtype))
    layers = (zeros,) * cfg.n_layers
    start = jnp.zeros((batch_size,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return {"k": layers, "v": layers, "index": jnp.zeros((), jnp.int32), "start": start}


def count_params(params: Params) -> int:
    """Number of scalars in a parameter tree (the book's ``sum(p.numel() for p in ...)``)."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
