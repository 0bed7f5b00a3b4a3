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
# # Chapter 2 — Working with text data, in jaxgpt
#
# A companion to chapter 2 of *Build a Large Language Model (From Scratch)*. Each section names the
# book section it follows and answers one question with a computation and a printed number or a
# figure. Every key fact is also `assert`ed, so running this file as a script checks it:
#
# ```bash
# pip install -e .                       # once, from the repository root
# python notebooks/ch02_text_data.py     # or open it in Jupyter with jupytext
# ```
#
# Environment variables: `JAXGPT_FIGURES` (where the PNG figures go, default `notebooks/figures/`),
# `JAXGPT_QUICK=1` (smaller runs, used by the test suite), `JAXGPT_VERDICT` (path to the book's
# `the-verdict.txt`; without it the built-in corpus is used — nothing is downloaded).

# %%
import functools
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # running as a script: write files, open no window
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxgpt
from jaxgpt.data import DataLoader
from jaxgpt.plot import save_figure

QUICK = os.environ.get("JAXGPT_QUICK", "0") == "1"
# Figures go to $JAXGPT_FIGURES, else figures/ beside this notebook.
save = functools.partial(save_figure, notebook_file=globals().get("__file__"))


# %% [markdown]
# ## 2.5 Byte pair encoding: token ids and their text pieces
#
# *What does the tokenizer turn a sentence into?* GPT-2's BPE maps text to integers from a
# vocabulary of 50,257 pieces. Common words are one piece (with their leading space), rare words
# are split into sub-word pieces, and `<|endoftext|>` is the single id 50256. jaxgpt ships the
# tokenizer offline: `jaxgpt.get_tokenizer()` is `tiktoken`'s GPT-2 encoding without a download.

# %%
tokenizer = jaxgpt.get_tokenizer()
text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
ids = jaxgpt.text_to_token_ids(text)  # (1, T) int32, a batch of one
print("vocabulary size:", tokenizer.n_vocab)
print("ids:", ids[0].tolist())
pieces = [tokenizer.decode([int(i)]) for i in ids[0]]
print("pieces:", pieces)

# The book's printed ids for this sentence (section 2.5).
book_ids = [
    15496,
    11,
    466,
    345,
    588,
    8887,
    30,
    220,
    50256,
    554,
    262,
    4252,
    18250,
    8812,
    2114,
    286,
    617,
    34680,
    27271,
    13,
]
assert ids[0].tolist() == book_ids
assert tokenizer.n_vocab == 50257 and ids[0, 8] == jaxgpt.tokenizer.EOT_ID
assert jaxgpt.token_ids_to_text(ids) == text  # decoding gives back the exact text

# An unknown word is spelled out of smaller pieces instead of an <unk> token (exercise 2.1).
unknown = tokenizer.encode("Akwirw ier")
print("'Akwirw ier' ->", unknown, [tokenizer.decode([i]) for i in unknown])
assert unknown == [33901, 86, 343, 86, 220, 959]
assert "".join(tokenizer.decode([i]) for i in unknown) == "Akwirw ier"

# %% [markdown]
# ## 2.6 Data sampling with a sliding window
#
# *What are an input and its target?* The model learns to predict the next token, so a target
# window is its input window moved one token on. `jaxgpt.sliding_windows(ids, max_length,
# stride)` is the book's `GPTDatasetV1`: window *i* starts at token `i * stride`.

# %%
verdict_path = os.environ.get("JAXGPT_VERDICT")
if verdict_path and Path(verdict_path).is_file():
    raw_text = Path(verdict_path).read_text(encoding="utf-8")
    corpus_name = "the book's the-verdict.txt"
else:
    raw_text = jaxgpt.default_corpus()[:20_000]  # about the size of the book's short story
    corpus_name = "the first 20,000 characters of jaxgpt.default_corpus() (JAXGPT_VERDICT not set)"
enc_text = tokenizer.encode(raw_text)
print(f"corpus: {corpus_name}: {len(raw_text):,} characters, {len(enc_text):,} tokens")

inputs, targets = jaxgpt.sliding_windows(enc_text, max_length=4, stride=1)
print("first input: ", inputs[0].tolist(), "->", repr(tokenizer.decode(inputs[0].tolist())))
print("first target:", targets[0].tolist(), "->", repr(tokenizer.decode(targets[0].tolist())))
assert (inputs[:, 1:] == targets[:, :-1]).all()  # the target is the input shifted by one
assert (targets[:, -1] == np.asarray(enc_text)[np.arange(len(inputs)) + 4]).all()
if corpus_name.startswith("the book"):
    assert len(enc_text) == 5145  # the book's count for the-verdict.txt
    assert inputs[0].tolist() == [40, 367, 2885, 1464] and targets[0].tolist() == [367, 2885, 1464, 1807]

# %% [markdown]
# ### Stride versus overlap
#
# *How many windows does a stride make, and how much do they overlap?* With `max_length` L and
# stride s, neighbouring windows share `max(L - s, 0)` tokens, and `max(s - L, 0)` tokens between
# them are never seen as inputs. The book uses `stride = max_length` to avoid overlap (less
# overfitting, every token seen once per epoch). Below, the counts from `sliding_windows` are
# checked against a plain Python loop over start positions.

# %%
L = 4
n_tokens = len(enc_text)
print(f"{'stride':>6} {'windows':>8} {'shared with next':>17} {'skipped between':>16} {'max uses':>9}")
rows = {}
for stride in (1, 2, 4, 6):
    x, _ = jaxgpt.sliding_windows(enc_text, max_length=L, stride=stride)
    starts = []
    start = 0
    while start < n_tokens - L:  # GPTDatasetV1: range(0, len(ids) - max_length, stride)
        starts.append(start)
        start += stride
    uses = np.zeros(n_tokens, dtype=int)  # how many input windows each token appears in
    for s0 in starts:
        uses[s0 : s0 + L] += 1
    shared, skipped = max(L - stride, 0), max(stride - L, 0)
    rows[stride] = (len(x), shared, skipped, uses.max())
    print(f"{stride:>6} {len(x):>8,} {shared:>17} {skipped:>16} {uses.max():>9}")
    assert len(x) == len(starts) == -(-(n_tokens - L) // stride)  # ceil((n - L) / s)
    assert (x[:, 0] == np.asarray(enc_text)[starts]).all()
    if len(x) > 1:
        assert (x[0, stride:] == x[1, : max(L - stride, 0)]).all()  # the shared tokens really are shared
    assert uses.max() == -(-L // stride)  # with overlap a token is seen ceil(L / s) times
assert rows[4][1] == 0 and rows[1][1] == 3 and rows[6][2] == 2

# A picture of the first windows over the first 20 tokens, for each stride.
fig, axes = plt.subplots(4, 1, figsize=(8, 5.2), sharex=True)
for ax, stride in zip(axes, (1, 2, 4, 6), strict=True):
    starts = list(range(0, 20 - L + 1, stride))[:6]
    for row, s0 in enumerate(starts):
        ax.barh(row, L, left=s0, height=0.7, color=f"C{row % 10}", alpha=0.75, edgecolor="k")
        ax.barh(row, 1, left=s0 + L, height=0.7, color="none", edgecolor="gray", hatch="//")
    ax.set_yticks([])
    ax.set_ylabel(f"stride {stride}", rotation=0, ha="right", va="center")
    ax.set_xlim(0, 21)
axes[0].set_title(f"Input windows of max_length={L} (hatched: the extra target token)")
axes[-1].set_xlabel("token position")
save(fig, "ch02_sliding_windows.png")

# %% [markdown]
# ### Batch size: memory versus noise
#
# *What does the batch size trade?* A training step sees the mean loss of one batch of B
# windows. Memory grows with B (the step holds B × T × emb_dim activations per layer), while the
# batch loss gets less noisy: its spread across batches falls like 1/√B. To measure the spread
# without training anything, each window is scored by a unigram model (the token frequencies of
# the corpus), whose per-window loss varies a lot from window to window.

# %%
T = 64
x_all, y_all = jaxgpt.sliding_windows(enc_text, max_length=T, stride=T // 2)
counts = np.bincount(np.asarray(enc_text), minlength=tokenizer.n_vocab) + 1.0  # +1 smoothing
log_p = np.log(counts / counts.sum())
window_loss = -log_p[y_all].mean(axis=1)  # (N,) each window's unigram cross-entropy, in nats
batch_sizes = (1, 2, 4, 8, 16)
spread = {}
print(f"{'B':>3} {'batches/epoch':>14} {'activations per layer (C=768)':>30} {'std of batch loss':>18}")
for B in batch_sizes:
    loader = DataLoader(x_all, y_all, batch_size=B, shuffle=True, drop_last=True, seed=0)
    means = []
    for epoch in range(20):  # 20 shuffles, for a stable estimate
        order = loader.order(epoch)[: len(loader) * B].reshape(len(loader), B)
        means.append(window_loss[order].mean(axis=1))
    spread[B] = float(np.concatenate(means).std())
    act_mb = B * T * 768 * 4 / 2**20
    print(f"{B:>3} {len(loader):>14} {act_mb:>26.2f} MB {spread[B]:>18.4f}")
ratio = spread[1] / spread[16]
print(f"std(B=1) / std(B=16) = {ratio:.2f} (1/sqrt(B) predicts {np.sqrt(16):.2f})")
assert all(spread[a] > spread[b] for a, b in zip(batch_sizes[:-1], batch_sizes[1:], strict=True))
assert 2.5 < ratio < 6.0

fig, ax = plt.subplots(figsize=(5, 3.2))
ax.loglog(batch_sizes, [spread[B] for B in batch_sizes], "o-", label="measured")
ax.loglog(batch_sizes, [spread[1] / np.sqrt(B) for B in batch_sizes], "--", label=r"$\propto 1/\sqrt{B}$")
ax.set_xlabel("batch size B")
ax.set_ylabel("std of the batch loss")
ax.set_title("Bigger batches: less noisy loss, more memory")
ax.legend()
save(fig, "ch02_batch_noise.png")

# %% [markdown]
# ## 2.7–2.8 Token embeddings plus positional embeddings
#
# *What shapes go into the model?* The book embeds a batch of 8 windows of 4 tokens into 256
# dimensions: token ids (8, 4) → token embeddings (8, 4, 256), plus one positional vector per
# position (4, 256), broadcast over the batch. In jaxgpt the two tables are the model's
# `tok_emb` and `pos_emb` parameters; below the sum is formed by hand and compared with what
# `GPTModel` computes internally (Flax's `capture_intermediates`).

# %%
cfg = jaxgpt.GPTConfig(context_length=4, emb_dim=256, n_heads=4, n_layers=1, drop_rate=0.0)
params = jaxgpt.init_params(cfg, jax.random.key(123))
loader = jaxgpt.create_dataloader(raw_text, batch_size=8, max_length=4, stride=4, shuffle=False)
x_batch, y_batch = next(iter(loader))
print("token ids:", x_batch.shape)

tok_table = params["tok_emb"]["embedding"]  # (V, C)
pos_table = params["pos_emb"]["embedding"]  # (context_length, C)
token_embeddings = tok_table[x_batch]  # (8, 4, 256): one row of the table per token id
pos_embeddings = pos_table[jnp.arange(4)]  # (4, 256): one vector per position
input_embeddings = token_embeddings + pos_embeddings[None, :, :]  # (8, 4, 256)
print("token embedding table:", tok_table.shape, " positional table:", pos_table.shape)
print(
    "token embeddings:",
    token_embeddings.shape,
    "+ positional:",
    pos_embeddings.shape,
    "-> input embeddings:",
    input_embeddings.shape,
)
assert x_batch.shape == (8, 4) and input_embeddings.shape == (8, 4, 256)
assert tok_table.shape == (50257, 256) and pos_table.shape == (4, 256)

_, state = jaxgpt.GPTModel(cfg).apply(
    {"params": params}, jnp.asarray(x_batch), capture_intermediates=True, mutable=["intermediates"]
)
inside = state["intermediates"]
model_sum = inside["tok_emb"]["__call__"][0] + inside["pos_emb"]["__call__"][0]
print("max |by hand - inside GPTModel| =", float(jnp.abs(model_sum - input_embeddings).max()))
assert jnp.allclose(model_sum, input_embeddings, atol=1e-6)
# The same token at two positions gets the same token vector but different input embeddings.
same_token = jnp.array([[x_batch[0, 0], x_batch[0, 0]]])  # (1, 2): one id at positions 0 and 1
emb = tok_table[same_token] + pos_table[jnp.arange(2)][None, :, :]  # (1, 2, 256)
gap = float(jnp.abs(emb[0, 0] - emb[0, 1]).max())
print(f"token {int(x_batch[0, 0])} at positions 0 and 1: max difference of input embeddings {gap:.4f}")
assert gap > 0

# %%
print("ch02: all checks passed")
