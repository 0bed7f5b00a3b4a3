# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 3 — Coding attention mechanisms, in jaxgpt
#
# A companion to chapter 3 of *Build a Large Language Model (From Scratch)*. Each section names the
# book section it follows, answers one question with a computation, and `assert`s the result, so
# `python notebooks/ch03_attention.py` checks every claim (after `pip install -e .`).
#
# jaxgpt's attention is `jaxgpt.model.MultiHeadAttention`, the book's `MultiHeadAttention` (3.6)
# with the causal mask passed in as an argument. In evaluation it may use a fused attention kernel
# that never forms the weight matrix, so the weights are recomputed here by hand from the module's
# own parameters — and the module's output must match the hand computation. In training, Flax's
# `capture_intermediates` shows the weights after the module's `dropout`.
#
# Environment variables: `JAXGPT_FIGURES` (figure folder, default `notebooks/figures/`).

# %%
import functools
import math
import sys

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxgpt
from jaxgpt.model import MultiHeadAttention
from jaxgpt.plot import save_figure

# Figures go to $JAXGPT_FIGURES, else figures/ beside this notebook.
save = functools.partial(save_figure, notebook_file=globals().get("__file__"))


def attention_by_hand(params, x, mask, n_heads):
    """The book's multi-head attention (3.6), written out from a jaxgpt ``MultiHeadAttention``'s params.

    x (B, T, C), mask (1, 1, T, T) -> (output (B, T, C), attention weights (B, n_heads, T, T)).
    """
    B, T, C = x.shape
    head_dim = C // n_heads

    def project(name):  # (B, T, C) -> (B, T, n_heads, head_dim)
        return (x @ params[name]["kernel"]).reshape(B, T, n_heads, head_dim)

    queries, keys, values = project("W_query"), project("W_key"), project("W_value")
    attn_scores = jnp.einsum("bthd,bshd->bhts", queries, keys) / math.sqrt(head_dim)  # (B, n_heads, T, T)
    attn_weights = jax.nn.softmax(jnp.where(mask, attn_scores, -jnp.inf), axis=-1)
    context_vec = jnp.einsum("bhts,bshd->bthd", attn_weights, values).reshape(B, T, C)  # heads concatenated
    out = context_vec @ params["out_proj"]["kernel"] + params["out_proj"]["bias"].reshape(1, 1, C)
    return out, attn_weights


def dropped_weights(module, variables, x, mask, key):
    """Output of ``module`` in training mode and the attention weights after its ``dropout``.

    Flax's ``capture_intermediates`` records what each sub-module returns; the book's attention
    applies its ``dropout`` to the attention weights, so that record is the dropped weights.
    """
    (out, _), state = module.apply(
        variables, x, mask, rngs={"dropout": key}, capture_intermediates=True, mutable=["intermediates"]
    )
    return out, state["intermediates"]["dropout"]["__call__"][0]  # (B, n_heads, T, T)


# The book's six 3-dimensional token embeddings for "Your journey starts with one step".
words = ["Your", "journey", "starts", "with", "one", "step"]
inputs = jnp.array(
    [
        [0.43, 0.15, 0.89],  # Your     (x^1)
        [0.55, 0.87, 0.66],  # journey  (x^2)
        [0.57, 0.85, 0.64],  # starts   (x^3)
        [0.22, 0.58, 0.33],  # with     (x^4)
        [0.77, 0.25, 0.10],  # one      (x^5)
        [0.05, 0.80, 0.55],  # step     (x^6)
    ]
)
T = inputs.shape[0]

# %% [markdown]
# ## 3.3.1 A simple self-attention mechanism without trainable weights
#
# *What is an attention score?* For the query "journey" (x²), the score of each token is its dot
# product with the query; softmax turns the scores into weights that sum to 1, and the context
# vector is the weighted sum of the inputs.

# %%
query = inputs[1]  # (3,)
attn_scores_2 = inputs @ query  # (6,): one dot product per token
attn_weights_2 = jax.nn.softmax(attn_scores_2)
context_vec_2 = attn_weights_2 @ inputs  # (3,)
print("scores: ", np.round(np.asarray(attn_scores_2), 4))
print("weights:", np.round(np.asarray(attn_weights_2), 4), " sum:", float(attn_weights_2.sum()))
print("context vector z^2:", np.round(np.asarray(context_vec_2), 4))
# The book's printed values (section 3.3.1).
np.testing.assert_allclose(attn_scores_2, [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865], atol=1e-4)
np.testing.assert_allclose(attn_weights_2, [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581], atol=1e-4)
np.testing.assert_allclose(context_vec_2, [0.4419, 0.6515, 0.5683], atol=1e-4)
assert abs(float(attn_weights_2.sum()) - 1.0) < 1e-6

# %% [markdown]
# ## 3.3.2 Attention weights for all inputs
#
# All queries at once is one matrix product: scores = X Xᵀ (6 × 6), softmax along each row.

# %%
attn_scores = inputs @ inputs.T  # (6, 6)
attn_weights = jax.nn.softmax(attn_scores, axis=-1)
all_context_vecs = attn_weights @ inputs  # (6, 3)
print("row sums:", np.round(np.asarray(attn_weights.sum(axis=-1)), 6))
assert jnp.allclose(attn_weights.sum(axis=-1), 1.0, atol=1e-6)
assert jnp.allclose(all_context_vecs[1], context_vec_2, atol=1e-6)

# %% [markdown]
# ## 3.4 Scaled dot-product attention: why divide by √d?
#
# *Why "scaled"?* With trainable projections the dot product of a query and a key sums `head_dim`
# products. For unit-variance entries its variance is `head_dim`, so large heads give large scores,
# softmax saturates into a near one-hot vector, and its gradients vanish. Dividing by √head_dim
# brings the variance back to 1. The table samples random queries and keys.

# %%
key = jax.random.key(0)
print(f"{'head_dim':>8} {'var(q.k)':>9} {'var(q.k/sqrt(d))':>17} {'max weight, unscaled':>21} {'scaled':>7}")
peak = {}
for d in (4, 16, 64, 256, 1024):
    kq, kk, key = jax.random.split(key, 3)
    q = jax.random.normal(kq, (2000, d))  # 2000 queries
    k = jax.random.normal(kk, (2000, 6, d))  # 6 keys for each
    scores = jnp.einsum("nd,ntd->nt", q, k)  # (2000, 6)
    scaled = scores / math.sqrt(d)
    peak[d] = (
        float(jax.nn.softmax(scores, axis=-1).max(axis=-1).mean()),
        float(jax.nn.softmax(scaled, axis=-1).max(axis=-1).mean()),
    )
    var, var_scaled = float(scores.var()), float(scaled.var())
    print(f"{d:>8} {var:>9.1f} {var_scaled:>17.3f} {peak[d][0]:>21.3f} {peak[d][1]:>7.3f}")
    assert abs(float(scores.var()) / d - 1.0) < 0.1 and abs(float(scaled.var()) - 1.0) < 0.1
assert peak[1024][0] > 0.95  # unscaled: softmax is almost one-hot
assert peak[1024][1] < 0.6 and abs(peak[1024][1] - peak[4][1]) < 0.05  # scaled: independent of d

# %% [markdown]
# ## 3.5 Hiding future words with causal attention
#
# *What does the causal mask do?* A token may attend only to itself and earlier tokens. jaxgpt
# sets the scores above the diagonal to −∞ *before* the softmax, so their weights are exactly 0 and
# each row still sums to 1. Below, jaxgpt's `MultiHeadAttention` (one head, emb_dim 3, no
# dropout) is run on the six inputs, and its weights are recomputed by hand from its parameters.

# %%
cfg = jaxgpt.GPTConfig(vocab_size=16, context_length=T, emb_dim=3, n_heads=1, n_layers=1, drop_rate=0.0)
att = MultiHeadAttention(cfg, deterministic=True)
x = inputs[None]  # (1, 6, 3): a batch of one
causal = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None]  # (1, 1, T, T): True where allowed
variables = att.init(jax.random.key(123), x, causal)
# jaxgpt initialises like GPT-2, N(0, 0.02): the scores would all be ~0 and every row uniform. To see
# some structure, draw the three projections uniformly in [0, 1) as the book's SelfAttention_v1 does.
uniform = jax.random.uniform(jax.random.key(123), (3, 3, 3))
p = {**variables["params"]}
for i, name in enumerate(("W_query", "W_key", "W_value")):
    p[name] = {"kernel": uniform[i]}
variables = {"params": p}
print({name: p[name]["kernel"].shape for name in ("W_query", "W_key", "W_value", "out_proj")})

out = att.apply(variables, x, causal)[0]
out_by_hand, weights = attention_by_hand(p, x, causal, n_heads=1)
weights = weights[0, 0]  # (T, T), the one head
print("max |jaxgpt MultiHeadAttention - by hand| =", float(jnp.abs(out - out_by_hand).max()))
assert jnp.allclose(out, out_by_hand, atol=1e-5)

# The same weights step by step, for the figure (qkv_bias is False in the book's configuration).
queries, keys = inputs @ p["W_query"]["kernel"], inputs @ p["W_key"]["kernel"]  # (6, 3) each
scores = queries @ keys.T / math.sqrt(cfg.head_dim)  # (6, 6), scaled
masked = jnp.where(causal[0, 0], scores, -jnp.inf)
print("causal attention weights:\n", np.round(np.asarray(weights), 4))
assert jnp.allclose(weights, jax.nn.softmax(masked, axis=-1), atol=1e-6)
assert (np.triu(np.asarray(weights), k=1) == 0).all()  # the upper triangle is exactly zero
assert jnp.allclose(weights.sum(axis=-1), 1.0, atol=1e-6)
assert weights[0, 0] == 1.0  # the first token can only attend to itself

# The book first shows a longer route: softmax over all scores, zero the future, renormalise
# each row. It gives the same weights, because softmax's normaliser cancels out.
simple = jax.nn.softmax(scores, axis=-1) * jnp.tril(jnp.ones((T, T)))
renormalised = simple / simple.sum(axis=-1, keepdims=True)
print("max |renormalised - masked softmax| =", float(jnp.abs(renormalised - weights).max()))
assert jnp.allclose(renormalised, weights, atol=1e-6)

# Causality seen through gradients: output t does not depend on input s > t.
jac = jax.jacobian(lambda inp: att.apply(variables, inp[None], causal)[0][0])(inputs)  # (T, C, T, C)
influence = jnp.abs(jac).sum(axis=(1, 3))  # (T, T): |d out_t / d in_s|
print("influence of later inputs on earlier outputs:", float(jnp.triu(influence, k=1).max()))
assert float(jnp.triu(influence, k=1).max()) == 0.0  # no path from the future
assert float(influence[np.tril_indices(T)].min()) > 0.0  # but every past token has one

fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.8), gridspec_kw={"wspace": 0.25})
panels = [
    (np.asarray(scores), "scaled scores QKᵀ/√d"),
    (
        np.where(np.asarray(causal[0, 0]), np.asarray(scores), np.nan),
        "after the mask (−∞ above the diagonal)",
    ),
    (np.asarray(weights), "attention weights after softmax"),
]
for ax, (mat, title) in zip(axes, panels, strict=True):
    im = ax.imshow(mat, cmap="viridis")
    ax.set_xticks(range(T), words, rotation=45)
    ax.set_yticks(range(T), words if ax is axes[0] else [])
    ax.set_title(title, fontsize=10)
    for i in range(T):
        for j in range(T):
            if not np.isnan(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
axes[0].set_ylabel("query")
axes[1].set_xlabel("key")
save(fig, "ch03_causal_attention.png")

# %% [markdown]
# ## 3.5.2 Dropout on the attention weights: training versus evaluation
#
# *What does attention dropout do?* In training each weight is zeroed with probability
# `drop_rate`, and the weights that survive are scaled by 1/(1 − drop_rate), so a row's expected
# sum stays 1. In evaluation (`deterministic=True`) dropout does nothing. jaxgpt draws the mask
# from an explicit key: the same key gives the same mask, on any machine.

# %%
drop_rate = 0.5
T_big = 64  # a longer sequence, for enough weights to count
cfg_drop = cfg.replace(context_length=T_big, drop_rate=drop_rate)
x_big = jax.random.normal(jax.random.key(1), (1, T_big, 3))
causal_big = jnp.tril(jnp.ones((T_big, T_big), dtype=bool))[None, None]
eval_att = MultiHeadAttention(cfg_drop, deterministic=True)
train_att = MultiHeadAttention(cfg_drop, deterministic=False)
variables = eval_att.init(jax.random.key(123), x_big, causal_big)

out_eval = eval_att.apply(variables, x_big, causal_big, rngs={"dropout": jax.random.key(7)})[0]
out_by_hand, w_eval = attention_by_hand(variables["params"], x_big, causal_big, n_heads=1)
out_train, w_train = dropped_weights(train_att, variables, x_big, causal_big, jax.random.key(7))
_, w_train_again = dropped_weights(train_att, variables, x_big, causal_big, jax.random.key(7))
_, w_train_other = dropped_weights(train_att, variables, x_big, causal_big, jax.random.key(8))
assert jnp.allclose(out_eval, out_by_hand, atol=1e-5)  # evaluation: no dropout, whatever the key
# Training: the module's output is exactly what the dropped weights give.
values = x_big @ variables["params"]["W_value"]["kernel"]  # (1, T, C), one head
out_proj = variables["params"]["out_proj"]
assert jnp.allclose(out_train, (w_train[0, 0] @ values[0]) @ out_proj["kernel"] + out_proj["bias"], atol=1e-5)
w_eval, w_train = np.asarray(w_eval[0, 0]), np.asarray(w_train[0, 0])

allowed = np.tril(np.ones((T_big, T_big), dtype=bool))
kept = (w_train != 0) & allowed
dropped_fraction = 1 - kept.sum() / allowed.sum()
scale = w_train[kept] / w_eval[kept]
print(f"eval: weights unchanged, row sums = 1: {np.allclose(w_eval.sum(-1), 1)}")
print(f"train: dropped {dropped_fraction:.3f} of the allowed weights (drop_rate {drop_rate})")
print(
    f"train: kept weights scaled by {scale.min():.4f} .. {scale.max():.4f} (1/(1-p) = {1 / (1 - drop_rate)})"
)
row_sums = w_train.sum(-1)
print(f"train: mean row sum {row_sums.mean():.3f} (rows vary: {row_sums.min():.2f} .. {row_sums.max():.2f})")
np.testing.assert_allclose(scale, 1 / (1 - drop_rate), rtol=1e-5)
assert abs(dropped_fraction - drop_rate) < 0.05
assert (w_train[~allowed] == 0).all()
assert abs(w_train.sum(-1).mean() - 1.0) < 0.15
assert jnp.array_equal(w_train_again[0, 0], w_train)  # same key, same mask
assert not jnp.array_equal(w_train_other[0, 0], w_train)  # another key, another mask

fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
n_show = 12
for ax, mat, title in (
    (axes[0], w_eval, "evaluation: dropout off"),
    (axes[1], w_train, f"training: drop_rate={drop_rate}, kept ×{1 / (1 - drop_rate):g}"),
):
    im = ax.imshow(mat[:n_show, :n_show], cmap="magma", vmin=0, vmax=w_train[:n_show, :n_show].max())
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key")
    fig.colorbar(im, ax=ax, fraction=0.046)
axes[0].set_ylabel("query")
save(fig, "ch03_attention_dropout.png")

# %% [markdown]
# ## 3.6 Multi-head attention: shapes
#
# *What does "multi-head" change?* The C-wide queries, keys and values are split into `n_heads`
# heads of `head_dim = C / n_heads`; each head attends on its own, and the heads' context vectors
# are concatenated back to C and mixed by `out_proj`. The shape in equals the shape out.

# %%
cfg_mha = jaxgpt.GPTConfig(vocab_size=16, context_length=T, emb_dim=4, n_heads=2, n_layers=1, drop_rate=0.0)
mha = MultiHeadAttention(cfg_mha, deterministic=True)
batch = jnp.stack([jnp.pad(inputs, ((0, 0), (0, 1))), jnp.pad(inputs, ((0, 0), (1, 0)))])  # (2, 6, 4)
variables = mha.init(jax.random.key(123), batch, causal)
uniform = jax.random.uniform(jax.random.key(1), (2, 4, 4))  # visible structure, as in 3.5
variables = {
    "params": {**variables["params"], "W_query": {"kernel": uniform[0]}, "W_key": {"kernel": uniform[1]}}
}
context_vecs = mha.apply(variables, batch, causal)[0]
by_hand, head_weights = attention_by_hand(variables["params"], batch, causal, n_heads=2)
print(
    "input:",
    batch.shape,
    "-> attention weights (B, n_heads, T, T):",
    head_weights.shape,
    "-> context vectors:",
    context_vecs.shape,
)
print("last token's weights, head 0:", np.round(np.asarray(head_weights[0, 0, -1]), 3))
print("last token's weights, head 1:", np.round(np.asarray(head_weights[0, 1, -1]), 3))
assert context_vecs.shape == batch.shape and head_weights.shape == (2, 2, T, T)
assert jnp.allclose(by_hand, context_vecs, atol=1e-5)  # split, attend per head, concatenate, project
assert float(jnp.abs(head_weights[:, 0] - head_weights[:, 1]).max()) > 0.01  # each head attends differently

# The attention of one GPT-2 small layer: three C x C projections plus out_proj with its bias.
gpt2 = jaxgpt.get_config("gpt2-small")
shapes = jax.eval_shape(
    lambda key: MultiHeadAttention(gpt2).init(key, jnp.zeros((1, 4, gpt2.emb_dim)), causal[..., :4, :4]),
    jax.random.key(0),
)
n_att = jaxgpt.count_params(shapes["params"])
print(f"GPT-2 small attention per layer: {n_att:,} parameters, {gpt2.n_heads} heads of {gpt2.head_dim}")
assert n_att == 4 * 768 * 768 + 768 == 2_360_064

# %%
print("ch03: all checks passed")
