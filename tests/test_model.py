import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from book_reference import BOOK_CFG

from jaxgpt.config import GPTConfig, get_config
from jaxgpt.model import (
    FeedForward,
    GPTModel,
    LayerNorm,
    TransformerBlock,
    count_params,
    gelu,
    init_cache,
    init_params,
)
from jaxgpt.ops import decode_params

TINY = GPTConfig(**BOOK_CFG, qkv_bias=True)


def _logits(cfg, params, idx, **kw):
    return GPTModel(cfg).apply({"params": params}, jnp.asarray(idx, jnp.int32), **kw)


def _cached_logits(cfg, params, idx, cache):
    """GPTModel's decoding call: the params laid out for it, (logits, new cache)."""
    model = GPTModel(cfg, decode=True)
    return model.apply({"params": decode_params(params, cfg)}, jnp.asarray(idx, jnp.int32), cache=cache)


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY, jax.random.key(0))


# --- book figures: parameter counts (4.6) ---


@pytest.mark.parametrize(
    "tie, qkv_bias, expected",
    [(False, False, 163_009_536), (True, False, 124_412_160), (True, True, 124_439_808)],
)
def test_gpt2_small_parameter_counts(tie, qkv_bias, expected):
    cfg = get_config("gpt2-small", tie_embeddings=tie, qkv_bias=qkv_bias)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    assert count_params(shapes) == expected


def test_gpt2_small_untied_size_is_621_83_mb():
    cfg = get_config("gpt2-small", tie_embeddings=False)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    assert round(count_params(shapes) * 4 / 1024**2, 2) == 621.83


# --- layers against their definitions ---


def test_layernorm_gives_zero_mean_and_unit_biased_variance():
    x = jax.random.normal(jax.random.key(1), (2, 5)) * 3.0 + 7.0  # the book's 2 x 5 example shape
    ln = LayerNorm(5)
    out = np.asarray(ln.apply(ln.init(jax.random.key(0), x), x))
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.var(-1, ddof=0), 1.0, rtol=1e-4)  # biased variance is 1 ...
    assert np.all(np.abs(out.var(-1, ddof=1) - 1.25) < 1e-3)  # ... so the unbiased one is C/(C-1)
    xn = np.asarray(x)
    expected = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_gelu_matches_the_tanh_formula_and_known_values():
    x = np.linspace(-5, 5, 101, dtype=np.float32)
    formula = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x))), formula, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(gelu(jnp.asarray(x))), np.asarray(jax.nn.gelu(x, approximate=True)), atol=1e-6
    )
    assert float(gelu(0.0)) == 0.0
    # Close to the exact x * Phi(x), and negative (not zero) for small negative inputs, unlike ReLU.
    for v in (-1.0, -0.5, 0.5, 1.0, 2.0):
        exact = v * 0.5 * (1 + math.erf(v / math.sqrt(2)))
        assert abs(float(gelu(v)) - exact) < 1e-3
    assert float(gelu(-0.5)) < 0


def test_feed_forward_gradient_keeps_no_float32_hidden_activations(capsys):
    """With bf16 activations the backward pass keeps the (B, T, 4C) hidden layer in bf16 only: the
    GELU's float32 intermediates are recomputed from it (on an H200 that took 29% off a train
    step's peak memory). Checked on JAX's own list of the residuals a gradient saves."""
    from jax.ad_checkpoint import print_saved_residuals

    cfg = TINY.replace(dtype="bfloat16", activation_dtype="bfloat16")
    B, T, C = 2, 8, cfg.emb_dim
    ff = FeedForward(cfg)
    x = jax.random.normal(jax.random.key(0), (B, T, C)).astype(jnp.bfloat16)
    params = ff.init(jax.random.key(1), x)
    print_saved_residuals(lambda p, x: ff.apply(p, x).astype(jnp.float32).sum(), params, x)
    saved = capsys.readouterr().out
    assert f"bf16[{B},{T},{4 * C}]" in saved  # the hidden layer itself
    assert f"f32[{B},{T},{4 * C}]" not in saved, saved


def test_block_preserves_shape():
    x = jax.random.normal(jax.random.key(2), (2, 6, TINY.emb_dim))
    mask = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    block = TransformerBlock(TINY)
    variables = block.init(jax.random.key(0), x, None, mask, None)
    out, kv = block.apply(variables, x, None, mask, None)
    assert out.shape == x.shape and kv is None


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_last_token_is_the_last_row_of_the_full_block(norm_first):
    """last_token=True (a classifier's final block) computes the last row of the causal block alone."""
    cfg = TINY.replace(norm_first=norm_first)
    x = jax.random.normal(jax.random.key(3), (3, 7, cfg.emb_dim))
    block = TransformerBlock(cfg)
    variables = block.init(jax.random.key(0), x, None, None, None)
    full, _ = block.apply(variables, x, None, None, None)
    last, _ = block.apply(variables, x, None, None, None, last_token=True)
    assert last.shape == (3, 1, cfg.emb_dim)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-5)


def test_logits_shape(tiny_params):
    idx = np.arange(2 * 7).reshape(2, 7) % TINY.vocab_size
    assert _logits(TINY, tiny_params, idx).shape == (2, 7, TINY.vocab_size)


def test_input_longer_than_context_is_a_clear_error(tiny_params):
    with pytest.raises(ValueError, match="context_length"):
        _logits(TINY, tiny_params, np.zeros((1, TINY.context_length + 1)))


# --- causality ---


def test_logits_at_t_ignore_tokens_after_t(tiny_params):
    rng = np.random.default_rng(0)
    a = rng.integers(0, TINY.vocab_size, (2, 10))
    b = a.copy()
    b[:, 6:] = rng.integers(0, TINY.vocab_size, (2, 4))
    la, lb = _logits(TINY, tiny_params, a), _logits(TINY, tiny_params, b)
    np.testing.assert_allclose(la[:, :6], lb[:, :6], atol=1e-6)
    assert np.abs(np.asarray(la[:, 6:] - lb[:, 6:])).max() > 1e-3


def test_gradient_of_position_t_is_zero_for_later_inputs(tiny_params):
    """d logits[t] / d embedding[t'] vanishes for every t' > t (checked through the embeddings).

    The head is untied here: a tied head would route gradient into every embedding row.
    """
    cfg = TINY.replace(tie_embeddings=False)
    params = {
        **tiny_params,
        "out_head": {"kernel": jax.random.normal(jax.random.key(5), (TINY.emb_dim, TINY.vocab_size))},
    }
    idx = jnp.arange(8)[None] % TINY.vocab_size
    t = 3

    def out_t(tok_table):
        return _logits(cfg, {**params, "tok_emb": {"embedding": tok_table}}, idx)[0, t].sum()

    grad = jax.grad(out_t)(tiny_params["tok_emb"]["embedding"])  # (V, C): rows of the ids used
    later, earlier = np.asarray(idx[0, t + 1 :]), np.asarray(idx[0, : t + 1])
    assert np.all(np.asarray(grad)[later] == 0.0)
    assert np.all(np.abs(np.asarray(grad)[earlier]).sum(-1) > 0)


# --- dropout ---


def test_dropout_only_in_training():
    cfg = TINY.replace(drop_rate=0.5)
    params = init_params(cfg, jax.random.key(0))
    idx = np.arange(8)[None]
    eval1 = _logits(cfg, params, idx, rngs={"dropout": jax.random.key(1)})
    eval2 = _logits(cfg, params, idx, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(eval1, eval2)
    np.testing.assert_allclose(eval1, _logits(cfg.replace(drop_rate=0.0), params, idx), atol=1e-6)
    train1 = _logits(cfg, params, idx, deterministic=False, rngs={"dropout": jax.random.key(1)})
    train2 = _logits(cfg, params, idx, deterministic=False, rngs={"dropout": jax.random.key(2)})
    train1_again = _logits(cfg, params, idx, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert np.abs(np.asarray(train1 - eval1)).max() > 1e-3
    assert np.abs(np.asarray(train1 - train2)).max() > 1e-3
    np.testing.assert_array_equal(train1, train1_again)  # same key, same mask


def test_training_without_a_dropout_key_is_an_error(tiny_params):
    cfg = TINY.replace(drop_rate=0.1)
    with pytest.raises(Exception, match="dropout"):
        _logits(cfg, tiny_params, np.arange(4)[None], deterministic=False)


# --- tied and untied heads ---


def test_tied_head_is_the_token_embedding_transposed(tiny_params):
    idx = np.arange(5)[None]
    untied_cfg = TINY.replace(tie_embeddings=False)
    untied = {**tiny_params, "out_head": {"kernel": tiny_params["tok_emb"]["embedding"].T}}
    np.testing.assert_allclose(_logits(TINY, tiny_params, idx), _logits(untied_cfg, untied, idx), atol=1e-6)


# --- equivalent ways to run the same model ---


@pytest.mark.parametrize("tie", [True, False])
def test_a_padded_vocabulary_changes_nothing_a_user_sees(tie, tiny_params):
    cfg = TINY.replace(tie_embeddings=tie)
    padded_cfg = cfg.replace(vocab_pad_multiple=32)  # 97 -> 128 rows
    params, padded = init_params(cfg, jax.random.key(0)), init_params(padded_cfg, jax.random.key(0))
    name, axis = ("tok_emb", "embedding"), 0
    if not tie:
        name, axis = ("out_head", "kernel"), 1
    table, padded_table = np.asarray(params[name[0]][name[1]]), np.asarray(padded[name[0]][name[1]])
    assert padded_table.shape[axis] == 128
    real, pad = np.split(padded_table, [TINY.vocab_size], axis=axis)
    np.testing.assert_array_equal(real, table)  # the same initial weights, plus zero padding
    assert not pad.any()
    idx = np.arange(10)[None] % TINY.vocab_size
    np.testing.assert_allclose(_logits(padded_cfg, padded, idx), _logits(cfg, params, idx), atol=1e-6)
    cache = init_cache(padded_cfg, batch_size=1, size=12)
    logits, _ = _cached_logits(padded_cfg, padded, idx, cache)
    assert logits.shape == (1, 10, TINY.vocab_size)  # V wide, with or without a cache


def test_cache_gives_the_same_logits_as_a_full_pass(tiny_params):
    idx = jnp.asarray(np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 9)), jnp.int32)
    full = _logits(TINY, tiny_params, idx)
    cache = init_cache(TINY, batch_size=2, size=12)
    first, cache = _cached_logits(TINY, tiny_params, idx[:, :5], cache)
    pieces = [first]
    for t in range(5, 9):
        step, cache = _cached_logits(TINY, tiny_params, idx[:, t : t + 1], cache)
        pieces.append(step)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5)
    assert int(cache["index"]) == 9


def test_left_padded_row_matches_the_unpadded_sequence(tiny_params):
    seq = np.array([5, 17, 3, 44, 9], np.int32)
    alone = _logits(TINY, tiny_params, seq[None])  # (1, 5, V)
    pad = 3
    padded = np.concatenate([np.zeros(pad, np.int32), seq])[None]  # (1, 8)
    cache = init_cache(TINY, batch_size=1, size=10, start=[pad])
    out, _ = _cached_logits(TINY, tiny_params, padded, cache)
    np.testing.assert_allclose(out[:, pad:], alone, atol=1e-5)


@pytest.mark.parametrize(
    "tie, qkv_bias, dtype, pad",
    [
        (True, False, "float32", 1),
        (False, True, "float32", 1),
        (True, True, "bfloat16", 1),
        (False, False, "float32", 24),
    ],
)
def test_decoding_token_by_token_gives_the_uncached_logits(tie, qkv_bias, dtype, pad):
    """GPTModel(decode=True) over a KV cache, a prompt then one token per call with a left-padded
    row, equals the plain forward pass of each row on its own (the scan over stacked params)."""
    cfg = TINY.replace(tie_embeddings=tie, qkv_bias=qkv_bias, dtype=dtype, vocab_pad_multiple=pad)
    params = init_params(cfg, jax.random.key(8))
    rows = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    start = np.array([0, 3], np.int32)  # row 1: three padding slots, then its last six tokens
    ids = rows.copy()
    ids[1, :3] = 0
    cache = init_cache(cfg, batch_size=2, size=10, start=start)
    first, cache = _cached_logits(cfg, params, ids[:, :5], cache)
    pieces = [first]
    for t in range(5, 9):
        step, cache = _cached_logits(cfg, params, ids[:, t : t + 1], cache)
        pieces.append(step)
    cached = np.concatenate(pieces, axis=1)  # (2, 9, V)
    atol = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(cached[:1], _logits(cfg, params, rows[:1]), atol=atol)
    np.testing.assert_allclose(cached[1:, 3:], _logits(cfg, params, rows[1:, 3:]), atol=atol)
    assert int(cache["index"]) == 9 and len(cache["k"]) == cfg.n_layers


def test_decode_params_have_the_layout_the_decoding_model_declares(tiny_params):
    cfg = TINY.replace(tie_embeddings=False)
    params = init_params(cfg, jax.random.key(0))
    cache = init_cache(cfg, batch_size=1, size=4)
    declared = jax.eval_shape(
        lambda: GPTModel(cfg, decode=True).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), cache=cache)
    )["params"]
    laid_out = decode_params(params, cfg)
    assert jax.tree_util.tree_structure(laid_out) == jax.tree_util.tree_structure(declared)
    for got, want in zip(
        jax.tree_util.tree_leaves(laid_out), jax.tree_util.tree_leaves(declared), strict=True
    ):
        assert got.shape == want.shape
    w = np.asarray(params["trf_blocks"]["att"]["W_query"]["kernel"][1])  # layer 1, (in, out)
    np.testing.assert_array_equal(laid_out["trf_blocks_1"]["att"]["W_query"]["kernel"], w.T)


def test_a_cache_needs_the_decoding_model(tiny_params):
    with pytest.raises(ValueError, match="decode=True"):
        _logits(TINY, tiny_params, np.zeros((1, 3)), cache=init_cache(TINY, 1, 4))


def test_unrolled_and_rematerialised_stacks_match_the_scan(tiny_params):
    idx = jnp.asarray(np.arange(12).reshape(2, 6) % TINY.vocab_size)

    def loss(cfg, params):
        return _logits(cfg, params, idx).astype(jnp.float32).mean()

    variants = (
        TINY.replace(scan_unroll=TINY.n_layers),
        TINY.replace(remat="full"),
        TINY.replace(remat="dots"),
    )

    @jax.jit  # one compilation for the scan and all three variants
    def values_and_grads(params):
        return [jax.value_and_grad(lambda p, cfg=cfg: loss(cfg, p))(params) for cfg in (TINY, *variants)]

    (base, base_grads), *others = values_and_grads(tiny_params)
    for value, grads in others:
        np.testing.assert_allclose(value, base, atol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(base_grads), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_same_logits_with_and_without_jit(tiny_params):
    idx = jnp.asarray(np.arange(6)[None])
    eager = _logits(TINY, tiny_params, idx)
    jitted = jax.jit(lambda p, i: GPTModel(TINY).apply({"params": p}, i))(tiny_params, idx)
    np.testing.assert_allclose(eager, jitted, atol=1e-6)


def test_post_ln_block_normalises_its_output():
    """norm_first=False: each block ends in a LayerNorm, so its output rows are standardised."""
    cfg = TINY.replace(norm_first=False)
    x = jax.random.normal(jax.random.key(4), (1, 5, cfg.emb_dim)) * 4.0
    mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    block = TransformerBlock(cfg)
    out, _ = block.apply(block.init(jax.random.key(0), x, None, mask, None), x, None, mask, None)
    np.testing.assert_allclose(np.asarray(out).mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out).var(-1), 1.0, rtol=1e-3)
    pre, _ = TransformerBlock(TINY).apply(
        block.init(jax.random.key(0), x, None, mask, None), x, None, mask, None
    )
    assert np.abs(np.asarray(pre).var(-1) - 1.0).max() > 0.1  # Pre-LN leaves the residual stream unnormalised
