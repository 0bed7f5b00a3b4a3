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
# # Chapter 6 — Fine-tuning for classification (and appendix E, LoRA), in jaxgpt
#
# A companion to chapter 6 of *Build a Large Language Model (From Scratch)* and its appendix E:
# the SMS spam data read, balanced, split and padded as the book does, a two-class head on a
# GPT, only the last block, the final norm and the head training, the accuracy before and after,
# the book's loss and accuracy plots, new messages classified, and LoRA's adapters with their
# parameter count against full fine-tuning. Each key fact is `assert`ed.
#
# Environment variables:
# - `JAXGPT_SMS`: the UCI SMS Spam Collection as the book downloads it (`SMSSpamCollection`,
#   Almeida and Gómez Hidalgo, CC BY 4.0); default `../shared/data/SMSSpamCollection` beside the
#   checkout. Nothing is downloaded.
# - `JAXGPT_GPT2`: the starting weights, anything `jaxgpt.load` reads (the book's `gpt2/124M`
#   download, a Hugging Face directory, a `.pth`, a jaxgpt run). Without it the model starts
#   from random weights of gpt2-small, the book's "from scratch" bonus experiment.
# - `JAXGPT_QUICK=1`: a tiny model and a short run (the test suite); `JAXGPT_FIGURES`: figure folder.
#
# The full run (gpt2-small, 5 epochs of 130 steps) takes a few minutes on a GPU and about an
# hour on a laptop CPU.

# %%
import functools
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxgpt
from jaxgpt import classify, lora
from jaxgpt.plot import save_figure

QUICK = os.environ.get("JAXGPT_QUICK", "0") == "1"
# Figures go to $JAXGPT_FIGURES, else figures/ beside this notebook.
save = functools.partial(save_figure, notebook_file=globals().get("__file__"))
here = Path(globals().get("__file__", "notebooks/ch06_classification.py")).resolve().parent
SMS = Path(os.environ.get("JAXGPT_SMS", here.parent.parent / "shared" / "data" / "SMSSpamCollection"))
if not SMS.is_file():
    raise SystemExit(f"the SMS Spam Collection is not at {SMS}: set JAXGPT_SMS to the book's file")

jax.config.update("jax_default_matmul_precision", "highest")  # full float32, as PyTorch
print("JAX backend:", jax.default_backend(), "| devices:", jax.devices())

# %% [markdown]
# ## 6.2 Preparing the dataset
#
# The file has one message per line, `label<TAB>text`: 5,574 messages, 4,827 ham and 747 spam.
# The book reads it with `pd.read_csv(..., sep="\t")`, whose default quoting treats a `"` at the
# start of a field as an opening quote and joins a few messages with the lines after them:
# it reports 4,825 ham. `jaxgpt.classify.read_labeled_texts` splits each line at its first tab
# and unquotes nothing. The joined messages are ham, so both reads balance to 747 + 747.

# %%
data = classify.read_labeled_texts(SMS)
print(f"{len(data):,} messages: {data.counts()}")
assert len(data) == 5574 and data.counts() == {"ham": 4827, "spam": 747}
try:
    import pandas as pd
except ImportError:
    pd = None
if pd is not None:  # the book's read, for comparison
    df = pd.read_csv(SMS, sep="\t", header=None, names=["Label", "Text"])
    print("the book's pandas read:", df["Label"].value_counts().to_dict())
    assert df["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}

balanced = classify.balance_classes(data, seed=123)
train, val, test = classify.random_split(balanced, 0.7, 0.1, seed=123)
print(f"balanced: {balanced.counts()}; split {len(train)} / {len(val)} / {len(test)}")
assert balanced.counts() == {"ham": 747, "spam": 747}
assert (len(train), len(val), len(test)) == (1045, 149, 300)  # the book's sizes

# %% [markdown]
# ## 6.3 Creating data loaders
#
# Every message is tokenized and padded with token 50256 (`<|endoftext|>`) on the right to the
# longest training message: 120 tokens. The validation and test sets are padded (or cut) to the
# same length. Batches of 8; the training loader shuffles and drops the last partial batch.

# %%
tokenizer = jaxgpt.get_tokenizer()
train_ds = classify.make_dataset(train, tokenizer)
val_ds = classify.make_dataset(val, tokenizer, train_ds.max_length)
test_ds = classify.make_dataset(test, tokenizer, train_ds.max_length)
print(f"padded length {train_ds.max_length}; first training row ends with", train_ds.inputs[0, -6:])
assert train_ds.max_length == 120 and train_ds.inputs.shape == (1045, 120)
train_loader = classify.ClassificationLoader(train_ds, 8, shuffle=True, drop_last=True, seed=123)
val_loader = classify.ClassificationLoader(val_ds, 8)
test_loader = classify.ClassificationLoader(test_ds, 8)
inputs, labels = next(iter(train_loader.iter_epoch(0)))
print(f"batch: inputs {inputs.shape}, labels {labels.shape} {labels}")
print(f"{len(train_loader)} training, {len(val_loader)} validation, {len(test_loader)} test batches")
assert inputs.shape == (8, 120) and (len(train_loader), len(val_loader), len(test_loader)) == (130, 19, 38)

# %% [markdown]
# ## 6.4–6.5 A classification head, and which parameters train
#
# The model's 50,257-way language-model head is replaced by a two-way `out_head` (ham, spam),
# initialised as PyTorch's `nn.Linear(768, 2)`. The book trains the last transformer block, the
# final norm and the new head, and freezes the rest. jaxgpt's blocks are stacked on a layer axis,
# so `partition_params` cuts the params into a trainable tree and a frozen tree; the gradient is
# taken of the trainable tree only, so no backward pass runs through the frozen blocks and AdamW
# keeps no state for them.

# %%
weights = os.environ.get("JAXGPT_GPT2")
if QUICK:  # a toy model for the test suite, long enough for the 120-token messages
    cfg = jaxgpt.GPTConfig(
        context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True
    )
    params = jaxgpt.init_params(cfg, jax.random.key(123))
    source = "a tiny random model (JAXGPT_QUICK=1)"
elif weights:
    cfg, params = jaxgpt.load(weights)
    source = weights
else:  # the book's bonus experiment: the same procedure from random weights
    cfg = jaxgpt.get_config("gpt2-small", qkv_bias=True)
    params = jaxgpt.init_params(cfg, jax.random.key(123))
    source = "random gpt2-small weights (set JAXGPT_GPT2 for pretrained ones)"
cfg = cfg.replace(drop_rate=0.0)  # the book fine-tunes without dropout
params = classify.add_classification_head(params, cfg, 2, jax.random.PRNGKey(123))
C, L = cfg.emb_dim, cfg.n_layers
print(f"model: {source}; {L} blocks of width {C}; head {params['out_head']['kernel'].shape}")

lr = 5e-5 if not QUICK else 1e-3  # the tiny random model needs bigger steps to move in a short run
tx = classify.make_classifier_optimizer(lr, weight_decay=0.1)
fresh = functools.partial(jax.tree.map, jnp.array)  # a copy: training donates its input buffers
state = classify.create_classifier_state(fresh(params), cfg, tx, "last-block")
n_total = jaxgpt.count_params(params)
n_trainable = jaxgpt.count_params(state.trainable)
# by hand: one block (attention with biases 4(C^2 + C), feed-forward 8C^2 + 5C, two norms 4C),
# the final norm (2C) and the head (2C + 2)
by_hand = (4 * (C * C + C) + 8 * C * C + 5 * C + 4 * C) + 2 * C + (2 * C + 2)
print(f"trainable: {n_trainable:,} of {n_total:,} parameters ({100 * n_trainable / n_total:.1f}%)")
assert n_trainable == by_hand
opt_scalars = sum(int(np.size(x)) for x in jax.tree.leaves(state.opt_state))
assert opt_scalars == 2 * n_trainable + 1  # AdamW's two moments of what trains, and its step count

# %% [markdown]
# ## 6.6 Calculating the classification loss and accuracy
#
# The class is the argmax of the last token's two logits: the last token is the only one that
# has attended to the whole message. Before fine-tuning the accuracy is a coin toss.

# %%
num_batches = 10 if not QUICK else 5
acc_before = [
    classify.calc_accuracy_loader(state.trainable, cfg, loader.iter_epoch(0), num_batches, state.frozen)
    for loader in (train_loader, val_loader, test_loader)
]
print("before fine-tuning: train {:.2%}, validation {:.2%}, test {:.2%}".format(*acc_before))
loss_before = classify.calc_loss_loader(state.trainable, cfg, train_loader.iter_epoch(0), 5, state.frozen)
print(f"training loss {loss_before:.3f} (ln 2 = {np.log(2):.3f} for an even guess)")

# %% [markdown]
# ## 6.7 Fine-tuning the model on supervised data
#
# `train_classifier_simple` is the book's loop: AdamW, the losses every `eval_freq` steps and the
# accuracies after every epoch, each over `eval_iter` batches, printed as the book prints them.

# %%
epochs = 5 if not QUICK else 2
loader = train_loader
if QUICK:  # 12 batches per epoch: the test suite's minute
    small = classify.ClassificationDataset(train_ds.inputs[:96], train_ds.labels[:96], train_ds.max_length)
    loader = classify.ClassificationLoader(small, 8, shuffle=True, drop_last=True, seed=123)
frozen_before = jax.tree.map(np.asarray, state.frozen)
state, history = classify.train_classifier_simple(
    state, tx, cfg, loader, val_loader, epochs, eval_freq=50 if not QUICK else 4, eval_iter=5
)
assert jax.tree.all(jax.tree.map(np.array_equal, frozen_before, jax.tree.map(np.asarray, state.frozen)))
params_ft, frozen_ft = state.eval_parts()
train_batches = None if not QUICK else 10  # None: every batch
acc_after = [
    classify.calc_accuracy_loader(params_ft, cfg, ld.iter_epoch(0), n, frozen=frozen_ft)
    for ld, n in ((train_loader, train_batches), (val_loader, None), (test_loader, None))
]
print("after fine-tuning: train {:.2%}, validation {:.2%}, test {:.2%}".format(*acc_after))
print(f"(train accuracy over {'all' if train_batches is None else train_batches} batches)")
print("the book, from OpenAI's gpt2-small: 97.21%, 97.32%, 95.67%")
assert history.epochs_done == epochs and len(history.train_accs) == epochs


# %% [markdown]
# The book's figures 6.16 and 6.17: loss and accuracy against epochs, with the examples seen on
# a second axis.


# %%
def plot_values(epochs_seen, examples_seen, train_values, val_values, label, name):
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()  # the examples seen, on the same data
    ax2.plot(examples_seen, train_values, alpha=0)
    ax2.set_xlabel("Examples seen")
    fig.tight_layout()
    save(fig, name)


for label, train_values, val_values, name in (
    ("loss", history.train_losses, history.val_losses, "ch06_loss.png"),
    ("accuracy", history.train_accs, history.val_accs, "ch06_accuracy.png"),
):
    n = len(train_values)
    plot_values(
        np.linspace(0, epochs, n),
        np.linspace(0, history.examples_seen, n),
        train_values,
        val_values,
        label,
        name,
    )

# %% [markdown]
# ## 6.8 Using the LLM as a spam classifier
#
# The test set's confusion matrix, the book's two new messages, and a few test messages with the
# class the model gives them.

# %%
whole = state.params  # the blocks joined again: one param tree for the whole classifier
logits_fn = jax.jit(classify.classifier_logits, static_argnums=1)
predicted = np.concatenate(
    [np.argmax(logits_fn(whole, cfg, jnp.asarray(x)), axis=-1) for x, _ in test_loader.iter_epoch(0)]
)
confusion = np.zeros((2, 2), int)
np.add.at(confusion, (test_ds.labels, predicted), 1)
print("confusion matrix (rows: true ham, spam; columns: predicted ham, spam)\n", confusion)
assert confusion.sum() == 300 and abs(np.trace(confusion) / 300 - acc_after[2]) < 1e-9
fig, ax = plt.subplots(figsize=(3.2, 3))
ax.imshow(confusion, cmap="Blues")
for (i, j), count in np.ndenumerate(confusion):
    ax.text(j, i, str(count), ha="center", va="center")
ax.set_xticks([0, 1], ["ham", "spam"])
ax.set_yticks([0, 1], ["ham", "spam"])
ax.set_xlabel("predicted")
ax.set_ylabel("true")
ax.set_title(f"test set, accuracy {acc_after[2]:.1%}", fontsize=9)
save(fig, "ch06_confusion.png")

names = data.label_names
for text in (
    "You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
    "Hey, just wanted to check if we're still on for dinner tonight? Let me know!",
    *test.texts[:3],
):
    label = classify.classify_review(text, whole, cfg, train_ds.max_length, names, tokenizer)
    print(f"{label:>4}  {text[:80]}")
    assert label in names

# %% [markdown]
# ### Appendix E: parameter-efficient fine-tuning with LoRA
#
# LoRA freezes every weight and adds to each linear layer of the blocks and the head a low-rank
# update `alpha * (x @ A @ B)`, `A` (in, rank) drawn as PyTorch's Kaiming-uniform, `B` (rank, out)
# zero, so training starts from the unchanged model. The book's rank 16 on gpt2-small with a
# two-class head trains 2,666,528 parameters: 2% of the model, and fewer than the last block alone.

# %%
small_cfg = jaxgpt.get_config("gpt2-small", qkv_bias=True)


def gpt2_small_shapes():
    key = jax.random.PRNGKey(0)
    p = classify.add_classification_head(jaxgpt.init_params(small_cfg, key), small_cfg, 2, key)
    return p, lora.init_lora(p, 16, key), classify.partition_params(p, small_cfg, "last-block")[0]


full_shapes, lora_shapes, last_block_shapes = jax.eval_shape(gpt2_small_shapes)  # shapes, no weights
counts = {
    "all parameters": jaxgpt.count_params(full_shapes),
    "last block + final norm + head (chapter 6)": jaxgpt.count_params(last_block_shapes),
    "LoRA rank 16 (appendix E)": lora.lora_param_count(lora_shapes),
}
for what, n in counts.items():
    print(f"gpt2-small, {what}: {n:,} trainable")
assert counts["LoRA rank 16 (appendix E)"] == 2_666_528

# %% [markdown]
# LoRA on this notebook's model: the adapted model runs the book's way, `x @ W + alpha * (x @ A @ B)`,
# and `merge_lora` folds the adapters into plain kernels (`W + alpha * A @ B`) that compute the
# same logits, for export or for tools that know nothing of adapters.

# %%
rank, alpha = (16, 16.0) if not QUICK else (4, 16.0)
adapters = lora.init_lora(params, rank, jax.random.PRNGKey(124))
lora_state = lora.create_lora_state(fresh(params), tx, adapters, alpha)
print(f"LoRA rank {rank}: {lora.lora_param_count(adapters):,} trainable of {n_total:,}")
lora_state, lora_history = classify.train_classifier_simple(
    lora_state, tx, cfg, loader, val_loader, epochs, eval_freq=50 if not QUICK else 4, eval_iter=5
)
x_test = jnp.asarray(test_ds.inputs[:8])
adapted = classify.classifier_logits(lora_state.frozen, cfg, x_test, lora=(lora_state.trainable, alpha))
merged = lora.merge_lora(lora_state.frozen, lora_state.trainable, alpha)
np.testing.assert_allclose(classify.classifier_logits(merged, cfg, x_test), adapted, atol=1e-4)
assert jax.tree.all(
    jax.tree.map(
        np.array_equal, jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, lora_state.frozen)
    )
)
lora_acc = [
    classify.calc_accuracy_loader(merged, cfg, ld.iter_epoch(0))
    for ld in (train_loader, val_loader, test_loader)
]
print("LoRA after fine-tuning: train {:.2%}, validation {:.2%}, test {:.2%}".format(*lora_acc))
print("the book, from OpenAI's gpt2-small: 99.81%, 97.99%, 96.67%")

# %%
print("ch06: all checks passed")
