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
# # Chapter 4 — Implementing a GPT model from scratch, in jaxgpt
#
# A companion to chapter 4 of *Build a Large Language Model (From Scratch)*. Each section names the
# book section it follows, answers one question with a computation and a printed number or a
# figure, and `assert`s the key fact, so `python notebooks/ch04_gpt_model.py` checks every claim.
#
# The building blocks live in `jaxgpt.model` under the book's names: `LayerNorm`, `gelu`,
# `FeedForward`, `MultiHeadAttention`, `TransformerBlock`, `GPTModel`.
#
# Environment variables: `JAXGPT_FIGURES` (figure folder, default `notebooks/figures/`),
# `JAXGPT_QUICK=1` (a shorter Pre-LN/Post-LN run, for the test suite).

# %%
import functools
import math
import os
import sys

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jaxgpt
from jaxgpt.model import FeedForward, GPTModel, LayerNorm, TransformerBlock, gelu
from jaxgpt.plot import save_figure

QUICK = os.environ.get("JAXGPT_QUICK", "0") == "1"
# Figures go to $JAXGPT_FIGURES, else figures/ beside this notebook.
save = functools.partial(save_figure, notebook_file=globals().get("__file__"))


GPT_CONFIG_124M = jaxgpt.get_config("gpt2-small")  # the book's configuration (context_length 1024)
print(GPT_CONFIG_124M)

# %% [markdown]
# ## 4.1 Parameters and logits
#
# *What are parameters and logits?* Parameters are the model's trainable arrays (in jaxgpt a plain
# nested dict, the "pytree" `params`); logits are the model's raw output scores, one per
# vocabulary entry for every input position. A batch of two 4-token texts gives logits of shape
# (2, 4, 50257). `jax.eval_shape` answers shape questions without computing anything.

# %%
tokenizer = jaxgpt.get_tokenizer()
batch = np.concatenate([jaxgpt.text_to_token_ids(t) for t in ("Every effort moves you", "Every day holds a")])
print("token ids:", batch.tolist())
assert batch.tolist() == [[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]]  # the book's batch

model = GPTModel(GPT_CONFIG_124M)
param_shapes = jax.eval_shape(lambda key: model.init(key, batch)["params"], jax.random.key(0))
logits_shape = jax.eval_shape(lambda p: model.apply({"params": p}, batch), param_shapes)
print("logits:", logits_shape.shape, logits_shape.dtype)
print("top-level parameter groups:", list(param_shapes))
assert logits_shape.shape == (2, 4, 50257)

# %% [markdown]
# ## 4.2 Layer normalization
#
# *What does layer normalization do?* It rescales each token's activation vector to mean 0 and
# variance 1 over its `emb_dim` features, then applies a trainable `scale` and `shift`. The book
# (like GPT-2 and PyTorch's `nn.LayerNorm`) divides by n, the *biased* variance, not by n − 1
# (Bessel's correction). Below: a random batch of two 5-dimensional inputs goes through a
# Linear(5, 6) + ReLU layer, then through `jaxgpt.model.LayerNorm`.

# %%
batch_example = jax.random.normal(jax.random.key(123), (2, 5))
layer = nn.Dense(6)
out = jax.nn.relu(layer.apply(layer.init(jax.random.key(0), batch_example), batch_example))  # (2, 6)
print("before: mean", np.round(np.asarray(out.mean(-1)), 4), " var", np.round(np.asarray(out.var(-1)), 4))

ln = LayerNorm(emb_dim=6)
out_ln = ln.apply(ln.init(jax.random.key(0), out), out)  # scale=1, shift=0 at initialisation
mean = out_ln.mean(axis=-1)
var_biased = out_ln.var(axis=-1)  # divide by n (ddof=0), as the layer does
var_unbiased = out_ln.var(axis=-1, ddof=1)  # divide by n - 1
print(f"{'row':>3} {'mean':>10} {'var, /n (biased)':>17} {'var, /(n-1)':>12}")
for i in range(2):
    print(f"{i:>3} {float(mean[i]):>10.1e} {float(var_biased[i]):>17.5f} {float(var_unbiased[i]):>12.5f}")
assert jnp.allclose(mean, 0.0, atol=1e-6)
assert jnp.allclose(var_biased, 1.0, atol=1e-3)  # eps = 1e-5 keeps it a hair below 1
assert jnp.allclose(var_unbiased, var_biased * 6 / 5, atol=1e-6)  # n / (n - 1) = 1.2 for n = 6

# What the choice changes: had the layer divided by n - 1, its outputs would have biased variance
# (n - 1) / n. Large for a toy emb_dim, negligible for GPT-2's 768 (which is why both work, and why
# matching GPT-2's weights needs the biased form the original was trained with).
print(f"{'emb_dim':>8} {'output var if normalised with /(n-1)':>37}")
for n in (5, 6, 768):
    h = jax.random.normal(jax.random.key(n), (1000, n))
    z = (h - h.mean(-1, keepdims=True)) / h.std(-1, ddof=1, keepdims=True)
    print(f"{n:>8} {float(z.var(-1).mean()):>37.5f}")
    assert abs(float(z.var(-1).mean()) - (n - 1) / n) < 1e-4

# %% [markdown]
# ### Layer norm versus batch norm
#
# *Why not batch normalization?* Batch norm normalizes each feature across the batch, so a
# sample's output depends on which other samples share its batch (and a batch of one has zero
# variance). Layer norm normalizes each sample on its own, so the output of a row is the same
# in any batch, at any batch size, in training and in generation.


# %%
def batch_norm(x, eps=1e-5):  # statistics over the batch axis, per feature
    return (x - x.mean(axis=0, keepdims=True)) / jnp.sqrt(x.var(axis=0, keepdims=True) + eps)


other = jax.random.normal(jax.random.key(7), (3, 6))
ln_params = ln.init(jax.random.key(0), out)
ln_alone = ln.apply(ln_params, out[:1])
ln_in_batch = ln.apply(ln_params, jnp.concatenate([out[:1], other]))[:1]
bn_in_batch = batch_norm(out)[:1]
bn_other_batch = batch_norm(jnp.concatenate([out[:1], other]))[:1]
print("layer norm, row 0 alone vs in another batch: max diff", float(jnp.abs(ln_alone - ln_in_batch).max()))
print(
    "batch norm, row 0 in two different batches:  max diff",
    float(jnp.abs(bn_in_batch - bn_other_batch).max()),
)
print("batch norm of a batch of one:", np.asarray(batch_norm(out[:1]))[0])
assert jnp.allclose(ln_alone, ln_in_batch, atol=1e-6)
assert float(jnp.abs(bn_in_batch - bn_other_batch).max()) > 0.1
assert jnp.allclose(batch_norm(out[:1]), 0.0)

# %% [markdown]
# ## 4.3 GELU versus ReLU, and the feed-forward expansion
#
# *Why GELU?* ReLU is 0 with zero gradient for every negative input, so a unit pushed negative
# stops learning. GELU (x·Φ(x), here the tanh approximation GPT-2 used) is smooth, dips slightly
# below 0, and keeps a small non-zero gradient for negative inputs. The derivatives come from
# `jax.grad`, mapped over the inputs with `jax.vmap`.

# %%
xs = jnp.linspace(-3, 3, 241)
relu = jax.nn.relu
d_gelu = jax.vmap(jax.grad(gelu))(xs)
d_relu = jax.vmap(jax.grad(relu))(xs)
exact = xs * 0.5 * (1 + jax.scipy.special.erf(xs / math.sqrt(2)))  # x * Phi(x)
neg = xs < 0
print(f"GELU(-1) = {float(gelu(-1.0)):.4f}, GELU(-0.5) = {float(gelu(-0.5)):.4f}, ReLU(-0.5) = 0")
print(f"min GELU = {float(gelu(xs).min()):.4f} at x = {float(xs[jnp.argmin(gelu(xs))]):.3f}")
print(f"for x < 0: GELU' in [{float(d_gelu[neg].min()):.3f}, {float(d_gelu[neg].max()):.3f}], ReLU' = 0")
print(f"max |tanh approximation - exact GELU| on [-3, 3]: {float(jnp.abs(gelu(xs) - exact).max()):.1e}")
assert float(jnp.abs(gelu(xs) - exact).max()) < 1e-3
assert -0.18 < float(gelu(xs).min()) < -0.16
assert (d_relu[neg] == 0).all() and (jnp.abs(d_gelu[neg & (xs > -2.5)]) > 1e-3).all()
assert jnp.allclose(
    d_gelu,
    jax.vmap(jax.grad(lambda v: 0.5 * v * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))))(
        xs
    ),
)

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
axes[0].plot(xs, gelu(xs), label="GELU")
axes[0].plot(xs, relu(xs), "--", label="ReLU")
axes[0].set_title("activation")
axes[1].plot(xs, d_gelu, label="GELU'")
axes[1].plot(xs, d_relu, "--", label="ReLU'")
axes[1].set_title("derivative (jax.grad + jax.vmap)")
for ax in axes:
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_xlabel("x")
    ax.legend()
save(fig, "ch04_gelu_relu.png")

# %% [markdown]
# *What does the feed-forward expansion do?* Each token's 768-vector is projected up to 4 × 768 =
# 3072 dimensions, passed through GELU, and projected back: a wider space in which to combine
# features, with the shape restored so blocks can stack.

# %%
ff = FeedForward(GPT_CONFIG_124M)
x = jax.random.uniform(jax.random.key(123), (2, 3, 768))
ff_params = ff.init(jax.random.key(0), x)
y, state = ff.apply(ff_params, x, capture_intermediates=True, mutable=["intermediates"])
hidden = state["intermediates"]["layers_0"]["__call__"][0]
n_ff = jaxgpt.count_params(ff_params)
print(f"input {x.shape} -> expanded {hidden.shape} -> output {y.shape}; {n_ff:,} parameters")
assert hidden.shape == (2, 3, 3072) and y.shape == x.shape
assert n_ff == 768 * 3072 + 3072 + 3072 * 768 + 768 == 4_722_432

# %% [markdown]
# ## 4.4 Shortcut connections against vanishing gradients
#
# *Why shortcut connections?* The book's demonstration: five layers of sizes
# [3, 3, 3, 3, 3, 1], each Linear + GELU, input [[1, 0, −1]], target 0, MSE loss. Without
# shortcuts the gradient shrinks layer by layer on its way back to the first layer; with
# `x = x + layer(x)` wherever the shapes match, the identity path carries it back undiminished.
# Here is the network in Flax, with the mean absolute weight gradient of each layer.


# %%
class ExampleDeepNeuralNetwork(nn.Module):
    """The book's 4.4 network: Linear + GELU layers, with optional shortcut connections."""

    layer_sizes: tuple[int, ...]
    use_shortcut: bool

    @nn.compact
    def __call__(self, x):
        for i, size in enumerate(self.layer_sizes[1:]):
            layer_output = gelu(nn.Dense(size, name=f"layers_{i}")(x))
            x = x + layer_output if self.use_shortcut and x.shape == layer_output.shape else layer_output
        return x


layer_sizes = (3, 3, 3, 3, 3, 1)
sample_input = jnp.array([[1.0, 0.0, -1.0]])
target = jnp.array([[0.0]])


def mean_abs_gradients(use_shortcut, params):
    net = ExampleDeepNeuralNetwork(layer_sizes, use_shortcut)
    grads = jax.grad(lambda p: jnp.mean((net.apply({"params": p}, sample_input) - target) ** 2))(params)
    return [float(jnp.abs(grads[f"layers_{i}"]["kernel"]).mean()) for i in range(5)]


# Both networks start from the same weights (one key), as the book reseeds before each.
params = ExampleDeepNeuralNetwork(layer_sizes, False).init(jax.random.key(123), sample_input)["params"]
without = mean_abs_gradients(False, params)
with_sc = mean_abs_gradients(True, params)
print(f"{'layer':>5} {'without shortcut':>17} {'with shortcut':>14}")
for i in range(5):
    print(f"{i:>5} {without[i]:>17.3e} {with_sc[i]:>14.3e}")
print(f"first layer: {with_sc[0] / without[0]:,.0f}x larger with shortcuts")
assert with_sc[0] > 100 * without[0]
assert min(with_sc) > 100 * max(without)  # every layer, not only the first

# With PyTorch installed, start from the book's own weights (torch.manual_seed(123)) and compare
# with the numbers the book prints.
try:
    import torch
except ImportError:
    torch = None
    print("torch not installed: skipping the comparison with the book's printed gradients")
if torch is not None:
    torch.manual_seed(123)
    linears = [torch.nn.Linear(a, b) for a, b in zip(layer_sizes[:-1], layer_sizes[1:], strict=True)]
    book_params = {
        f"layers_{i}": {
            "kernel": jnp.asarray(lin.weight.detach().numpy().T),
            "bias": jnp.asarray(lin.bias.detach().numpy()),
        }
        for i, lin in enumerate(linears)
    }  # torch stores (out, in); Flax's Dense kernel is (in, out)
    book_without = [
        0.00020173587836325169,
        0.0001201116101583466,
        0.0007152041653171182,
        0.001398873864673078,
        0.005049646366387606,
    ]
    book_with = [
        0.22169792652130127,
        0.20694105327129364,
        0.32896995544433594,
        0.2665732502937317,
        1.3258541822433472,
    ]
    ours_without, ours_with = mean_abs_gradients(False, book_params), mean_abs_gradients(True, book_params)
    print("from the book's initial weights, without:", [f"{g:.6g}" for g in ours_without])
    print("from the book's initial weights, with:   ", [f"{g:.6g}" for g in ours_with])
    np.testing.assert_allclose(ours_without, book_without, rtol=1e-4)
    np.testing.assert_allclose(ours_with, book_with, rtol=1e-4)

fig, ax = plt.subplots(figsize=(6.5, 3.2))
idx = np.arange(5)
if torch is not None:  # the book's demonstration exactly
    plot_without, plot_with, init_name = ours_without, ours_with, "the book's"
else:
    plot_without, plot_with, init_name = without, with_sc, "Flax's"
ax.bar(idx - 0.2, plot_without, width=0.4, label="without shortcut")
ax.bar(idx + 0.2, plot_with, width=0.4, label="with shortcut")
ax.set_yscale("log")
ax.set_xlabel("layer (0 = first)")
ax.set_ylabel("mean |gradient| of the weights")
ax.set_title(f"Shortcut connections keep gradients alive ({init_name} initial weights)", fontsize=10)
ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
save(fig, "ch04_shortcut_gradients.png")

# %% [markdown]
# ## 4.5 The transformer block: shape in = shape out
#
# *Why is the shape preserved?* Every sub-layer maps (B, T, C) to (B, T, C) — attention mixes
# across tokens, the feed-forward network expands and contracts within a token — and each result
# is *added* to its input through a shortcut, which needs equal shapes. So blocks stack, and
# jaxgpt can run all of them with one `nn.scan`.

# %%
block = TransformerBlock(GPT_CONFIG_124M)
x = jax.random.uniform(jax.random.key(123), (2, 4, 768))  # (B, T, C)
mask = jnp.tril(jnp.ones((4, 4), dtype=bool))[None, None]
block_params = block.init(jax.random.key(0), x, None, mask, None)
(y, _), state = block.apply(
    block_params, x, None, mask, None, capture_intermediates=True, mutable=["intermediates"]
)
inside = state["intermediates"]
steps = [
    ("input x", x.shape),
    ("norm1(x)", inside["norm1"]["__call__"][0].shape),
    ("att(...)", inside["att"]["__call__"][0][0].shape),
    ("norm2(x)", inside["norm2"]["__call__"][0].shape),
    ("ff: first Linear", inside["ff"]["layers_0"]["__call__"][0].shape),
    ("ff(...)", inside["ff"]["__call__"][0].shape),
    ("block output", y.shape),
]
for name, shape in steps:
    print(f"{name:>18}: {shape}")
n_block = jaxgpt.count_params(block_params)
print(f"one block: {n_block:,} parameters")
assert y.shape == x.shape and all(s == (2, 4, 768) for n, s in steps if n != "ff: first Linear")
assert n_block == 2_360_064 + 4_722_432 + 4 * 768

# %% [markdown]
# ## 4.6 The GPT model: parameters and megabytes, tied versus untied
#
# *What does weight tying save?* GPT-2 reuses the token-embedding matrix (50257 × 768) as the
# output layer. The book's `GPTModel` keeps a separate `out_head`: 163,009,536 parameters, of
# which 38,597,376 are the second copy; tied, 124,412,160 remain. jaxgpt ties by default
# (`tie_embeddings=True`); `tie_embeddings=False` is the book's layout.


# %%
def shapes_of(cfg):
    return jax.eval_shape(lambda key: GPTModel(cfg).init(key, batch)["params"], jax.random.key(0))


tied = shapes_of(GPT_CONFIG_124M)
untied = shapes_of(GPT_CONFIG_124M.replace(tie_embeddings=False))
print(f"{'':>8} {'parameters':>13} {'MB (float32)':>13}")
counts = {}
for name, tree in (("tied", tied), ("untied", untied)):
    counts[name] = jaxgpt.count_params(tree)
    print(f"{name:>8} {counts[name]:>13,} {counts[name] * 4 / 1024**2:>13.2f}")
print(
    "token embedding:", tied["tok_emb"]["embedding"].shape, " out_head:", untied["out_head"]["kernel"].shape
)
print(f"transformer blocks: {jaxgpt.count_params(tied['trf_blocks']):,} (stacked, leading axis n_layers=12)")
assert counts["tied"] == 124_412_160 and counts["untied"] == 163_009_536
assert counts["untied"] - counts["tied"] == 50257 * 768
assert round(counts["untied"] * 4 / 1024**2, 2) == 621.83  # the book's "Total size of the model: 621.83 MB"
assert jaxgpt.count_params(tied["trf_blocks"]) == 12 * n_block

# %% [markdown]
# ### Pre-LN versus Post-LN
#
# *Where should the normalization go?* GPT-2 (and the book) normalize the *input* of each
# sub-layer (Pre-LN: `x + att(norm1(x))`). The original Transformer normalized *after* the
# shortcut addition (Post-LN: `norm1(x + att(x))`), which puts a normalization on the shortcut
# path itself, so gradients must pass through every norm; such models usually need a learning-rate
# warm-up. `GPTConfig(norm_first=False)` gives the Post-LN block. Below, two small models with
# the same initial parameters and the same batches train with AdamW at a constant learning rate
# without warm-up.
#
# In the full run (300 steps, CPU) both start alike, but Pre-LN ends about 0.5 lower. The
# gradient norms at initialisation show that the placement changes how the gradient reaches each
# block: in the Post-LN model every block after the first gets a gradient about 15 times smaller
# than the first block's (each normalization on the shortcut path rescales what flows back
# through it), while in the Pre-LN model the untouched identity path carries it to every block
# and the norms fall only gently with depth.

# %%
n_steps = 25 if QUICK else 300
small = jaxgpt.GPTConfig(
    context_length=16 if QUICK else 64, emb_dim=32 if QUICK else 64, n_heads=4, n_layers=6, drop_rate=0.0
)
text = jaxgpt.default_corpus()[: 20_000 if QUICK else 400_000]
loader = jaxgpt.create_dataloader(
    text, batch_size=2 if QUICK else 8, max_length=small.context_length, stride=small.context_length, seed=0
)
init = jaxgpt.init_params(small, jax.random.key(0))  # the same parameter tree serves both variants


def train(cfg, params, n_steps):
    optimizer = optax.adamw(1e-3, weight_decay=0.1)

    def loss_fn(p, x, y):
        return jaxgpt.cross_entropy(GPTModel(cfg).apply({"params": p}, x), y)

    @jax.jit
    def step(p, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        # gradient norm of each block: block params carry a leading n_layers axis
        block_grads = jax.tree_util.tree_leaves(grads["trf_blocks"])
        layer_norms = jnp.sqrt(sum(jnp.square(g).reshape(cfg.n_layers, -1).sum(1) for g in block_grads))
        return optax.apply_updates(p, updates), opt_state, loss, layer_norms

    opt_state, losses, epoch = optimizer.init(params), [], 0
    while len(losses) < n_steps:
        for x, y in loader.iter_epoch(epoch):
            params, opt_state, loss, norms = step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
            if not losses:
                layer_norms = np.asarray(norms)  # at initialisation
            losses.append(float(loss))
            if len(losses) == n_steps:
                break
        epoch += 1
    return np.array(losses), layer_norms


curves = {}
for name, norm_first in (("Pre-LN", True), ("Post-LN", False)):
    curves[name], grad_norms = train(small.replace(norm_first=norm_first), init, n_steps)
    norms = ", ".join(f"{g:.3f}" for g in grad_norms)
    first, last = curves[name][0], curves[name][-10:].mean()
    print(f"{name:>7}: loss {first:.3f} -> {last:.3f} (mean of the last 10 steps)")
    print(f"{'':>7}  gradient norm of each block at initialisation: [{norms}]")
for name, losses in curves.items():
    assert np.isfinite(losses).all() and losses[-5:].mean() < losses[0] - (0.1 if QUICK else 2.0), name
assert curves["Pre-LN"][0] != curves["Post-LN"][0]  # same parameters, different functions
if not QUICK:  # this seeded run: Pre-LN ends lower (about 5.3 against 5.8 on CPU)
    assert curves["Pre-LN"][-20:].mean() < curves["Post-LN"][-20:].mean()

fig, ax = plt.subplots(figsize=(5.5, 3.4))
window = 1 if QUICK else 10
for name, losses in curves.items():
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(len(smooth)) + window, smooth, label=name)
ax.set_xlabel("step")
ax.set_ylabel("training loss" + (f" ({window}-step mean)" if window > 1 else ""))
ax.set_title(f"Pre-LN vs Post-LN: {small.n_layers} layers, AdamW 1e-3, no warm-up")
ax.legend()
save(fig, "ch04_pre_vs_post_ln.png")

# %% [markdown]
# ## 4.7 Generating text
#
# *How does the model produce text?* It predicts logits for the next token, takes the most
# likely id (argmax, greedy decoding), appends it, and repeats with the longer context.
# `jaxgpt.generate` is the book's `generate_text_simple`. An untrained model produces gibberish,
# but the mechanics are the same.

# %%
encoded = jaxgpt.text_to_token_ids("Hello, I am")  # (1, 4)
out = jaxgpt.generate(init, small, encoded, max_new_tokens=6)  # (1, 10)
print("output ids:", out.tolist(), " length", out.shape[1])
print("output text:", repr(jaxgpt.token_ids_to_text(out)))
assert encoded.tolist() == [[15496, 11, 314, 716]] and out.shape == (1, 10)
assert jnp.array_equal(out[:, :4], encoded)

# One step by hand: the logits at the last position, argmax, append.
logits = jax.jit(GPTModel(small).apply)({"params": init}, jnp.asarray(out[:, :-1]))  # (1, 9, V)
next_id = jnp.argmax(logits[:, -1, :], axis=-1)  # (1,)
print("by hand, the last token:", int(next_id[0]), "->", repr(tokenizer.decode([int(next_id[0])])))
assert int(next_id[0]) == int(out[0, -1])
# Greedy decoding reads only the last position, and causality makes the earlier positions'
# predictions the model's argmax at each prefix: the generated ids are those argmaxes.
assert jnp.array_equal(jnp.argmax(logits[0, 3:], axis=-1), out[0, 4:])

# %%
print("ch04: all checks passed")
