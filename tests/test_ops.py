"""The speed devices of jaxgpt.ops compute what the book computes: bf16 matmuls, the decode
matmul, hash dropout, the float32 GELU, the fused attention, and the chunked loss built on them.

Each test compares against an independent computation (NumPy, the book's step-by-step attention,
the plain logits loss, a float32 run), never against the code path it checks.
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from book_reference import BOOK_CFG

from jaxgpt.config import GPTConfig
from jaxgpt.loss import cross_entropy, dropout_rng, linear_cross_entropy, train_loss
from jaxgpt.model import GPTModel, MultiHeadAttention, gelu, init_params
from jaxgpt.ops import (
    Dropout,
    attention_implementation,
    bf16_matmul,
    decode_params,
    explicit_attention,
    fused_attention,
    gelu_in_float32,
    keep_mask,
    matmul_rows,
    pad_vocab,
    tied_head,
    transposed,
)

TINY = GPTConfig(**BOOK_CFG, qkv_bias=True)


def _bf16_round(a):
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))


# --- bfloat16 matmuls ---


def test_transposed_copy_is_the_transpose():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(np.asarray(transposed(jnp.asarray(a))), a.T)


def test_bf16_matmul_and_its_gradients_are_bf16_products_summed_in_f32():
    rng = np.random.default_rng(0)
    x, w, g = (rng.normal(size=s).astype(np.float32) for s in ((5, 8), (8, 3), (5, 3)))
    xb, wb, gb = _bf16_round(x), _bf16_round(w), _bf16_round(g)
    out, vjp = jax.vjp(lambda x, w: bf16_matmul(x, w, jnp.float32), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    assert out.dtype == dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_allclose(out, xb @ wb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, gb @ wb.T, rtol=1e-5, atol=1e-5)  # backward in bf16 too
    np.testing.assert_allclose(dw, xb.T @ gb, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out) - x @ w).max() > 1e-4  # it really rounded the inputs


def test_bf16_matmul_with_bf16_activations_rounds_only_its_outputs():
    # bf16 in, bf16 out (summed in f32, then rounded once); the weight gradient stays float32
    rng = np.random.default_rng(1)
    x, w, g = (rng.normal(size=s).astype(np.float32) for s in ((6, 16), (16, 5), (6, 5)))
    xb, wb, gb = _bf16_round(x), _bf16_round(w), _bf16_round(g)
    bf16 = jnp.bfloat16
    out, vjp = jax.vjp(lambda x, w: bf16_matmul(x, w, bf16), jnp.asarray(xb, bf16), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(gb, bf16))
    assert (out.dtype, dx.dtype, dw.dtype) == (bf16, bf16, jnp.float32)
    np.testing.assert_array_equal(np.asarray(out, np.float32), _bf16_round(xb @ wb))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), _bf16_round(gb @ wb.T))
    np.testing.assert_allclose(dw, xb.T @ gb, rtol=1e-5, atol=1e-5)


def test_bf16_keeps_float32_params_and_gradients():
    cfg = TINY.replace(dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    idx = jnp.asarray(np.arange(12).reshape(2, 6) % cfg.vocab_size)
    grads = jax.jit(jax.grad(lambda p: cross_entropy(GPTModel(cfg).apply({"params": p}, idx), idx)))(params)
    for leaf in jax.tree_util.tree_leaves(params) + jax.tree_util.tree_leaves(grads):
        assert leaf.dtype == jnp.float32
    logits = GPTModel(cfg).apply({"params": params}, idx)
    fp32 = GPTModel(TINY).apply({"params": params}, idx)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, fp32, atol=2e-2)  # bf16 has 8 bits of mantissa


def test_bf16_activations_keep_float32_params_gradients_and_logits():
    cfg = TINY.replace(dtype="bfloat16", activation_dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    idx = jnp.asarray(np.arange(12).reshape(2, 6) % cfg.vocab_size)
    grads = jax.jit(jax.grad(lambda p: cross_entropy(GPTModel(cfg).apply({"params": p}, idx), idx)))(params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(grads))
    logits = GPTModel(cfg).apply({"params": params}, idx)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, GPTModel(TINY).apply({"params": params}, idx), atol=3e-2)


def test_bf16_activations_decode_with_the_kv_cache_like_the_full_forward():
    from jaxgpt.model import init_cache

    cfg = TINY.replace(dtype="bfloat16", activation_dtype="bfloat16")
    params = init_params(cfg, jax.random.key(2))
    idx = jnp.asarray(np.arange(10).reshape(2, 5) % cfg.vocab_size)
    full = GPTModel(cfg).apply({"params": params}, idx)  # (B, T, V), no cache
    cache, decoding = init_cache(cfg, batch_size=2, size=8), {"params": decode_params(params, cfg)}
    logits, cache = GPTModel(cfg, decode=True).apply(decoding, idx[:, :4], cache=cache)
    last, _ = GPTModel(cfg, decode=True).apply(decoding, idx[:, 4:], cache=cache)
    np.testing.assert_allclose(jnp.concatenate([logits, last], axis=1), full, atol=3e-2)


BF16_LOSS_TOL = 0.05  # max |loss_bf16 - loss_fp32| over a short run, nats (stated in the README)


LOSS_RUN_CFG = GPTConfig(vocab_size=64, context_length=16, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)


@functools.cache
def _loss_run(c: GPTConfig):
    """25 AdamW steps of config ``c`` on a learnable pattern: (losses, final params). Cached, so the
    float32 reference runs once for both bf16 cases."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 16, (4, 17))  # a learnable pattern: tokens from a small sub-vocabulary
    data[:, 1::2] = (data[:, 0:-1:2] + 1) % 16
    x, y = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])
    tx = optax.adamw(3e-3, weight_decay=0.1)
    params = init_params(LOSS_RUN_CFG, jax.random.key(1))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss_fn = lambda p: cross_entropy(GPTModel(c).apply({"params": p}, x), y)  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(25):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return np.array(losses), params


@pytest.mark.parametrize("activation_dtype", ["float32", "bfloat16"])
def test_bf16_training_loss_tracks_float32(activation_dtype):
    fp32, _ = _loss_run(LOSS_RUN_CFG)
    bf16, params = _loss_run(LOSS_RUN_CFG.replace(dtype="bfloat16", activation_dtype=activation_dtype))
    assert fp32[-1] < fp32[0] - 1.0  # the run learns something
    assert np.abs(bf16 - fp32).max() < BF16_LOSS_TOL, np.abs(bf16 - fp32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))


# --- the decode matmul, the tied head, vocabulary padding, GELU ---


def test_matmul_rows_is_the_product_with_the_transposed_rows():
    rng = np.random.default_rng(2)
    x, rows = rng.normal(size=(2, 3, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_allclose(
        matmul_rows(jnp.asarray(x), jnp.asarray(rows), "float32"), x @ rows.T, atol=1e-5
    )
    bf16 = np.asarray(matmul_rows(jnp.asarray(x), jnp.asarray(rows), "bfloat16"))
    np.testing.assert_allclose(bf16, _bf16_round(x) @ _bf16_round(rows).T, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_head_is_the_product_with_the_embedding_transposed(dtype):
    rng = np.random.default_rng(3)
    x, emb = rng.normal(size=(2, 3, 8)).astype(np.float32), rng.normal(size=(11, 8)).astype(np.float32)
    expected = x @ emb.T if dtype == "float32" else _bf16_round(x) @ _bf16_round(emb).T
    np.testing.assert_allclose(tied_head(jnp.asarray(x), jnp.asarray(emb), dtype), expected, atol=1e-5)


def test_pad_vocab_appends_zero_entries_along_its_axis():
    table = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(pad_vocab(jnp.asarray(table), 5, 0), np.vstack([table, np.zeros((2, 2))]))
    np.testing.assert_array_equal(pad_vocab(jnp.asarray(table), 4, 1), np.hstack([table, np.zeros((3, 2))]))


def test_gelu_in_float32_is_gelu_with_the_same_gradient():
    h = jnp.linspace(-4, 4, 33, dtype=jnp.float32).reshape(3, 11)
    np.testing.assert_array_equal(gelu_in_float32(gelu, h), gelu(h))
    grad = jax.grad(lambda h: gelu_in_float32(gelu, h).sum())(h)
    np.testing.assert_allclose(grad, jax.grad(lambda h: gelu(h).sum())(h), atol=1e-6)
    h16 = h.astype(jnp.bfloat16)  # bf16 in, bf16 out, computed from the float32 of the same values
    out16 = gelu_in_float32(gelu, h16)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out16, gelu(h16.astype(jnp.float32)).astype(jnp.bfloat16))


# --- dropout: the hash mask and the torch-style module ---


@pytest.mark.parametrize("keep_prob", [0.9, 0.5, 0.013])
def test_keep_mask_keeps_each_element_with_probability_keep_prob(keep_prob):
    shape = (8, 12, 64, 64)  # a batch of attention weights: 393,216 draws
    mask = np.asarray(keep_mask(jax.random.key(3), shape, keep_prob))
    assert mask.shape == shape and mask.dtype == bool
    n = mask.size
    sigma = math.sqrt(keep_prob * (1 - keep_prob) / n)
    assert abs(mask.mean() - keep_prob) < 5 * sigma  # the overall rate
    # ... and in every row of the batch, every head, and along the positions: no stripes or repeats
    for axes in [(1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2)]:
        rates = mask.mean(axis=axes)
        assert np.abs(rates - keep_prob).max() < 5 * sigma * math.sqrt(n / (n / rates.size))
    flat = mask.reshape(shape[0], -1)
    assert not (flat[1:] == flat[:1]).all(axis=1).any()  # batch rows differ
    # neighbours are independent: P(both kept) = keep_prob**2 along every axis
    for axis in range(4):
        a, b = np.moveaxis(mask, axis, 0)[:-1], np.moveaxis(mask, axis, 0)[1:]
        assert abs((a & b).mean() - keep_prob**2) < 5 * math.sqrt(keep_prob**2 * (1 - keep_prob**2) / a.size)


def test_keep_mask_is_a_deterministic_function_of_the_key():
    def draw(key):
        return np.asarray(keep_mask(key, (4, 1000), 0.5))

    np.testing.assert_array_equal(draw(jax.random.key(1)), draw(jax.random.key(1)))
    np.testing.assert_array_equal(draw(jax.random.key(1, impl="rbg")), draw(jax.random.key(1, impl="rbg")))
    masks = [draw(k) for k in (jax.random.key(1), jax.random.key(2), *jax.random.split(jax.random.key(1)))]
    for i in range(len(masks)):
        for j in range(i):  # different keys: agreement at chance level (1/2), not identical masks
            assert 0.45 < (masks[i] == masks[j]).mean() < 0.55


def test_keep_mask_shapes():
    key = jax.random.key(0)
    assert keep_mask(key, (), 0.5).shape == ()
    assert keep_mask(key, (7,), 0.5).shape == (7,)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        keep_mask(key, (1, 2**16, 2**16), 0.5)


def test_dropout_module_is_torch_style_inverted_dropout():
    x = jnp.arange(1, 20_001, dtype=jnp.float32).reshape(2, 10_000)
    key = {"dropout": jax.random.key(0)}
    out = np.asarray(Dropout(0.1).apply({}, x, deterministic=False, rngs=key))
    kept = out != 0
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / 0.9, rtol=1e-6)  # survivors scaled by 1/(1-p)
    assert abs(kept.mean() - 0.9) < 5 * math.sqrt(0.09 / kept.size)
    np.testing.assert_array_equal(Dropout(0.1).apply({}, x, deterministic=True), x)  # evaluation: identity
    np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False, rngs=key), x)
    np.testing.assert_array_equal(Dropout(1.0).apply({}, x, deterministic=False, rngs=key), np.zeros_like(x))


# --- attention: the fused attention call ---


def test_attention_runs_on_xla_off_a_bf16_gpu():
    assert attention_implementation("cpu", "bfloat16", 64) == "xla"
    assert attention_implementation("gpu", "float32", 64) == "xla"
    assert attention_implementation("tpu", "bfloat16", 64) == "xla"


def test_a_bf16_gpu_that_cannot_use_cudnn_says_why_once(monkeypatch):
    from jaxgpt import ops

    monkeypatch.setattr(ops, "_cudnn_unavailable", lambda head_dim: f"head_dim {head_dim} is odd")
    attention_implementation.cache_clear()
    with pytest.warns(UserWarning, match="head_dim 65 is odd"):
        assert attention_implementation("gpu", "bfloat16", 65) == "xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        assert attention_implementation("gpu", "bfloat16", 65) == "xla"
    monkeypatch.setattr(ops, "_cudnn_unavailable", lambda head_dim: None)
    assert attention_implementation("gpu", "bfloat16", 64) == "cudnn"
    attention_implementation.cache_clear()


def test_attention_layer_matches_a_numpy_reference():
    """The whole attention layer (projections, causal softmax, heads, out_proj) against NumPy."""
    B, T, C, H = 2, 5, TINY.emb_dim, TINY.n_heads
    x = jax.random.normal(jax.random.key(3), (B, T, C))
    att = MultiHeadAttention(TINY)
    p = att.init(jax.random.key(0), x, None)["params"]
    out, _ = att.apply({"params": p}, x, None)

    xn = np.asarray(x, np.float64)

    def proj(name):
        return xn @ np.asarray(p[name]["kernel"]) + np.asarray(p[name]["bias"])

    q, k, v = (
        proj(n).reshape(B, T, H, C // H).transpose(0, 2, 1, 3) for n in ("W_query", "W_key", "W_value")
    )
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(C // H)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = (weights @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    expected = context @ np.asarray(p["out_proj"]["kernel"]) + np.asarray(p["out_proj"]["bias"])
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_equals_the_step_by_step_attention(padded):
    B, T, S, H, D = 2, 4, 6, 3, 8
    q = jax.random.normal(jax.random.key(0), (B, T, H, D))
    k = jax.random.normal(jax.random.key(1), (B, S, H, D))
    v = jax.random.normal(jax.random.key(2), (B, S, H, D))
    q_slot = 2 + jnp.arange(T)  # queries at slots 2..5 of a 6-slot cache
    mask = jnp.arange(S)[None, None, :] <= q_slot[None, :, None]  # (1, T, S)
    if padded:  # row 1 starts with one padding slot
        mask = mask & (jnp.arange(S)[None, None, :] >= jnp.array([0, 1])[:, None, None])
    mask = mask[:, None]  # (B or 1, 1, T, S)
    hand = explicit_attention(q, k, v, mask)
    np.testing.assert_allclose(fused_attention(q, k, v, mask, "float32"), hand, atol=1e-5)


def test_fused_causal_attention_without_a_mask():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 4)) for i in range(3))
    causal = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    hand = explicit_attention(q, k, v, causal)
    np.testing.assert_allclose(fused_attention(q, k, v, None, "float32"), hand, atol=1e-5)


def test_attention_weight_dropout_still_applies_in_training():
    """The fused path has no dropout, so training with dropout must take the book's path."""
    cfg = TINY.replace(drop_rate=0.5)
    x = jax.random.normal(jax.random.key(3), (1, 6, cfg.emb_dim))
    att = MultiHeadAttention(cfg, deterministic=False)
    p = att.init(jax.random.key(0), x, None)["params"]
    train, _ = att.apply({"params": p}, x, None, rngs={"dropout": jax.random.key(1)})
    evaluate, _ = MultiHeadAttention(cfg).apply({"params": p}, x, None)
    assert np.abs(np.asarray(train - evaluate)).max() > 1e-3


# --- the chunked training loss ---


@pytest.mark.parametrize("chunk_rows", [1, 4, 5, 1024])
def test_linear_cross_entropy_equals_the_logits_loss_and_its_gradients(chunk_rows):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 50, (2, 7)))

    def plain(h, w):
        return cross_entropy(jnp.einsum("btc,cv->btv", h, w), y)

    def chunked(h, w):
        return linear_cross_entropy(h, w, y, "float32", chunk_rows)

    np.testing.assert_allclose(chunked(h, w), plain(h, w), rtol=1e-6)
    for got, want in zip(
        jax.jit(jax.grad(chunked, (0, 1)))(h, w), jax.grad(plain, (0, 1))(h, w), strict=True
    ):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_linear_cross_entropy_leaves_out_the_vocabulary_padding():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)  # 50 real columns, 14 of padding (not zero)
    y = jnp.asarray(rng.integers(0, 50, (2, 7)))

    def plain(h, w):  # the loss over the 50 real columns only
        return cross_entropy(jnp.einsum("btc,cv->btv", h, w[:, :50]), y)

    def padded(h, w):
        return linear_cross_entropy(h, w, y, "float32", 4, vocab_size=50)

    np.testing.assert_allclose(padded(h, w), plain(h, w), rtol=1e-6)
    (dh, dw), (ref_dh, ref_dw) = jax.grad(padded, (0, 1))(h, w), jax.grad(plain, (0, 1))(h, w)
    np.testing.assert_allclose(dh, ref_dh, atol=1e-6)
    np.testing.assert_allclose(dw, ref_dw, atol=1e-6)  # zero in the padding columns, like the reference
    with pytest.raises(ValueError, match="vocab_size must be in"):
        linear_cross_entropy(h, w, y, vocab_size=65)


@pytest.mark.parametrize("tie,pad", [(True, 1), (False, 1), (True, 24), (False, 24)])
def test_train_loss_equals_the_logits_loss_with_dropout(tie, pad):
    cfg = TINY.replace(drop_rate=0.2, tie_embeddings=tie, vocab_pad_multiple=pad)
    params = init_params(cfg, jax.random.key(0))
    x = jnp.asarray(np.arange(14).reshape(2, 7) % cfg.vocab_size)
    y = (x + 1) % cfg.vocab_size
    key = jax.random.key(5)

    def reference(p):
        rngs = {"dropout": dropout_rng(key)}
        logits = GPTModel(cfg).apply({"params": p}, x, deterministic=False, rngs=rngs)
        return cross_entropy(logits, y)

    value, grads = jax.jit(jax.value_and_grad(train_loss), static_argnums=1)(params, cfg, x, y, key)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_dropout_rng_is_a_deterministic_function_of_the_key():
    masks = [
        np.asarray(jax.random.bernoulli(dropout_rng(k), 0.5, (64,)))
        for k in (*(jax.random.key(i) for i in (1, 1, 2)), jax.random.key_data(jax.random.key(1)))
    ]
    np.testing.assert_array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(masks[0], masks[3])  # raw uint32[2] key data works the same
    assert (masks[0] != masks[2]).any()
    assert 16 < masks[0].sum() < 48


def test_linear_cross_entropy_checks_target_shape():
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((4, 5)), jnp.zeros((2, 4), jnp.int32))


def test_bf16_train_loss_with_a_tied_head_and_one_chunk_runs_and_tracks_float32():
    """Regression: a single-chunk loss with the tied (transposed) head once hit a bf16 dot XLA's CPU lacks."""
    cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=64, n_heads=2, n_layers=1, drop_rate=0.0)
    params = init_params(cfg, jax.random.key(0))
    x = jnp.asarray(np.arange(32).reshape(2, 16) * 997 % cfg.vocab_size)
    grad_fn = jax.jit(jax.value_and_grad(train_loss), static_argnums=1)
    loss32, grads32 = grad_fn(params, cfg, x, x, jax.random.key(1))
    loss16, grads16 = grad_fn(params, cfg.replace(dtype="bfloat16"), x, x, jax.random.key(1))
    assert abs(float(loss16) - float(loss32)) < 0.05
    g32, g16 = grads32["tok_emb"]["embedding"], grads16["tok_emb"]["embedding"]
    assert g16.dtype == jnp.float32
    np.testing.assert_allclose(g16, g32, atol=0.05 * float(np.abs(g32).max()))
