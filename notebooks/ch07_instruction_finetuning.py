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
# # Chapter 7 — Fine-tuning to follow instructions, and preference tuning with DPO, in jaxgpt
#
# A companion to chapter 7 of *Build a Large Language Model (From Scratch)* and its bonus
# material on Direct Preference Optimization: the prompt format, the padded batches and their
# ignored targets, fine-tuning, the model's answers before and after, and a DPO run with its
# reward margins. Each key fact is `assert`ed.
#
# Environment variables:
# - `JAXGPT_INSTRUCTIONS`: the folder holding the book's `instruction-data.json` and
#   `instruction-data-with-preference.json` (from the book's repository, Apache-2.0); by default
#   `../shared/data` beside the checkout. Without them a dozen hand-made entries stand in, and the
#   notebook says so.
# - `JAXGPT_GPT2`: the model to fine-tune (the book uses OpenAI's gpt2-medium): the book's
#   `gpt2/355M` folder, a Hugging Face directory or a GPT-2 name in the Hugging Face cache. Without
#   it a small model starts from random weights: the mechanics are the same, the answers are not.
# - `JAXGPT_QUICK=1`: a tiny model and a short run (the test suite); `JAXGPT_FIGURES`: figure folder.

# %%
import functools
import math
import os
import sys
import time
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxgpt
from jaxgpt import dpo
from jaxgpt import instruct as ins
from jaxgpt import train as jt
from jaxgpt.plot import figure_dir, save_figure

QUICK = os.environ.get("JAXGPT_QUICK", "0") == "1"
save = functools.partial(save_figure, notebook_file=globals().get("__file__"))
FIG_DIR = figure_dir(globals().get("__file__"))
jax.config.update("jax_default_matmul_precision", "highest")
print("JAX backend:", jax.default_backend())

# %% [markdown]
# ## 7.2 The instruction data and its prompt format
#
# Each entry has an `instruction`, an optional `input` and the `output` the model should learn
# to give. The book's Alpaca-style prompt puts them under `### Instruction:`, `### Input:` and
# `### Response:` headings; the Phi-3 style of exercise 7.1 is the other choice.

# %%
here = Path(globals().get("__file__", "notebooks/ch07.py")).resolve().parent
data_dir = Path(os.environ.get("JAXGPT_INSTRUCTIONS", here.parent.parent / "shared" / "data"))
instruction_file = data_dir / "instruction-data.json"
preference_file = data_dir / "instruction-data-with-preference.json"
book_data = instruction_file.is_file() and preference_file.is_file()
if book_data:
    data = ins.load_instruction_data(instruction_file)
    preference_data = dpo.read_preference_data(preference_file)
    print(f"{instruction_file}: {len(data)} entries (the book's file, from its repository, Apache-2.0)")
    assert len(data) == 1100 and len(preference_data) == 1100  # the book's counts
else:  # a stand-in: a dozen entries made here, so the mechanics still run
    print(f"the book's instruction files are not in {data_dir}: a dozen hand-made entries stand in")
    words = ["cat", "tree", "river", "stone", "cloud", "apple", "horse", "candle", "bridge", "storm"]
    data = [
        {"instruction": "Give the plural of the word.", "input": w, "output": f"The plural is {w}s."}
        for w in words
    ] + [
        {"instruction": "Name the opposite of hot.", "input": "", "output": "Cold."},
        {"instruction": "What is 2 plus 3?", "input": "", "output": "2 plus 3 is 5."},
    ]
    preference_data = [dict(e, chosen=e["output"], rejected=e["output"].split()[-1].upper()) for e in data]

entry = data[50 % len(data)]  # the book prints entry 50
print(ins.format_example(entry))
print("--- the same entry in the Phi-3 style of exercise 7.1 ---")
print(ins.format_example(entry, "phi3"))
assert ins.format_input(entry).startswith("Below is an instruction that describes a task.")
assert ins.format_prompt(entry, "phi3").endswith("\n<|assistant|>:\n")

# %% [markdown]
# The book cuts the file in order: the first 85% for training, the next 10% for testing and the
# last 5% for validation (935, 110 and 55 entries).

# %%
train_data, val_data, test_data = ins.split_data(data)
print(f"train {len(train_data)}, validation {len(val_data)}, test {len(test_data)}")
if book_data:
    assert (len(train_data), len(test_data), len(val_data)) == (935, 110, 55)

# %% [markdown]
# ## 7.3 Batches: padding, shifted targets and ignored positions
#
# The book's `custom_collate_fn` adds an end-of-text token (50256) to each entry, pads the batch
# to its longest entry plus one, shifts the targets by one, and replaces every padding target but
# the first with -100, which the loss ignores: the model learns to end its answer, and padding
# costs nothing. The book's own three-row example gives exactly its printed tensors:

# %%
inputs, targets = ins.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
print(inputs, targets, sep="\n")
np.testing.assert_array_equal(inputs, [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]])
np.testing.assert_array_equal(
    targets, [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
)

# %% [markdown]
# A real batch of four training entries, with exercise 7.2's option of ignoring the prompt's
# tokens too. Grey cells are targets the loss ignores.

# %%
tokenizer = jaxgpt.get_tokenizer()
train_set = ins.InstructionDataset.from_entries(train_data)
rows = list(range(4))
items = [train_set.encoded_texts[r] for r in rows]
_, plain_targets = ins.custom_collate_fn(items)
_, masked_targets = ins.custom_collate_fn(
    items, instruction_lengths=[train_set.instruction_lengths[r] for r in rows]
)
assert (masked_targets == -100).sum() > (plain_targets == -100).sum()
for row in range(len(rows)):  # the first padding target (the end of the answer) always counts
    assert (plain_targets[row] == 50256).sum() == 1

fig, axes = plt.subplots(2, 1, figsize=(10, 3.6), sharex=True)
for ax, t, title in zip(
    axes,
    (plain_targets, masked_targets),
    ("the book's targets", "instructions masked (exercise 7.2)"),
    strict=True,
):
    ax.imshow(t == -100, cmap="Greys", vmin=0, vmax=1.6, aspect="auto", interpolation="nearest")
    ax.set_title(f"{title}: {(t == -100).sum()} of {t.size} targets ignored", fontsize=9)
    ax.set_ylabel("entry")
axes[-1].set_xlabel("position")
save(fig, "ch07_padded_batch.png")

# %% [markdown]
# Every batch pads to its own length, and a jitted step compiles once per shape. jaxgpt's loader
# rounds the length up to a multiple of 64 (inputs 50256, targets -100): under the causal mask
# the extra positions change no earlier logit and add no loss, so each batch's loss is the book's
# while the shapes stay few.

# %% [markdown]
# ## 7.4–7.6 The model and its fine-tuning
#
# The book fine-tunes OpenAI's gpt2-medium for 2 epochs with AdamW (learning rate 5e-5, weight
# decay 0.1) on batches of 8.

# %%
gpt2_source = os.environ.get("JAXGPT_GPT2")
if gpt2_source and not QUICK:
    cfg, params = jaxgpt.load(gpt2_source)
    cfg = cfg.replace(drop_rate=0.0)  # the book's chapter 7 model has dropout 0.0
    weights_source = gpt2_source
elif QUICK:
    cfg = jaxgpt.GPTConfig(context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    params = jaxgpt.init_params(cfg, jax.random.key(123))
    weights_source = "a tiny random model (JAXGPT_QUICK=1)"
else:
    cfg = jaxgpt.get_config("gpt2-small").replace(context_length=512, drop_rate=0.0)
    params = jaxgpt.init_params(cfg, jax.random.key(123))
    weights_source = "gpt2-small from random weights (JAXGPT_GPT2 is not set)"
print(f"weights: {weights_source}; {jaxgpt.count_params(params):,} parameters")

limit = 32 if QUICK else None  # the quick run trains on a few entries
train_set = ins.InstructionDataset.from_entries(train_data[:limit])
val_set = ins.InstructionDataset.from_entries(val_data[: 8 if QUICK else None])
L = cfg.context_length
sft_L = 64 if QUICK else L  # the quick run cuts its few longer entries: one padded shape to compile
train_loader = ins.InstructionLoader(
    train_set, batch_size=8, shuffle=True, drop_last=True, allowed_max_length=sft_L
)
val_loader = ins.InstructionLoader(val_set, batch_size=8, allowed_max_length=sft_L)
print(
    f"{len(train_loader)} training batches; padded lengths:",
    sorted({b[0].shape[1] for b in train_loader.iter_epoch(0)}),
)

response_loss_before = ins.response_loss(params, cfg, val_loader)
val_loss_before = jaxgpt.calc_loss_loader(params, cfg, val_loader)
print(
    f"before: validation loss {val_loss_before:.3f}, loss of the reference answers {response_loss_before:.3f}"
)

# %%
epochs = 2
tcfg = jt.TrainConfig(
    learning_rate=5e-5 if not QUICK else 1e-3,  # a tiny random model needs a larger step
    weight_decay=0.1,
    batch_size=8,
    num_epochs=epochs,
    eval_freq=5,
    eval_iter=5 if not QUICK else 2,
    start_context=ins.format_input(val_data[0]),
    sample_tokens=0,
)
total_steps = jt.total_train_steps(train_loader, tcfg)
tx = jt.make_optimizer(tcfg, total_steps)
state, _ = jt.create_train_state(cfg, tcfg, jax.random.key(123), total_steps, jax.tree.map(jnp.array, params))


class PrintEvals(jt.Hooks):
    def on_eval(self, record):
        print(
            f"Ep {int(record['epoch']) + 1} (Step {record['step'] - 1:06d}): "
            f"Train loss {record['train_loss']:.3f}, Val loss {record['val_loss']:.3f}"
        )


t0 = time.perf_counter()
state, _, records = jt.train(state, tx, cfg, tcfg, train_loader, val_loader, hooks=PrintEvals())
print(f"fine-tuning took {time.perf_counter() - t0:.1f} s")
tuned = state.params
steps = [r["step"] for r in records]
train_losses = np.array([r["train_loss"] for r in records])
val_losses = np.array([r["val_loss"] for r in records])
assert np.isfinite(train_losses).all() and train_losses[-1] < train_losses[0]

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(steps, train_losses, label="training loss")
ax.plot(steps, val_losses, "--", label="validation loss")
ax.set_xlabel("step")
ax.set_ylabel("loss")
ax.legend()
save(fig, "ch07_losses.png")

# %% [markdown]
# ## 7.7 Answers before and after
#
# The book generates greedily from each test entry's prompt, up to 256 tokens or the end-of-text
# token, and keeps the text after `### Response:`.

# %%
few = test_data[:3]
max_new = 24 if QUICK else 256
before = ins.generate_responses(params, cfg, few, max_new_tokens=max_new)
after = ins.generate_responses(tuned, cfg, few, max_new_tokens=max_new)
for e, b, a in zip(few, before, after, strict=True):
    print(ins.format_input(e))
    print(
        f"\nCorrect response:\n>> {e['output']}\nBefore fine-tuning:\n>> {b!r}\nAfter fine-tuning:\n>> {a!r}"
    )
    print("-" * 40)

# %% [markdown]
# ## 7.8 Scoring without a judge
#
# The book asks a larger model (Llama 3 through Ollama) to grade each answer from 0 to 100;
# `scripts/finetune_instruct.py --judge URL` does the same. Without a judge, the mean loss of the
# reference answers under the model says how likely it finds them: lower is better.

# %%
response_loss_after = ins.response_loss(tuned, cfg, val_loader)
print(f"loss of the reference answers: {response_loss_before:.3f} before, {response_loss_after:.3f} after")
assert response_loss_after < response_loss_before

# %% [markdown]
# ## 7.9 What comes next: preference tuning with DPO (the book's bonus notebook)
#
# DPO starts from the instruction-tuned model and a frozen copy of it, the *reference*. For each
# entry it raises the policy's log-probability of the `chosen` answer and lowers that of the
# `rejected` one, each measured against the reference. The reward of an answer is the policy's
# mean log-probability of it minus the reference's; the book tracks the margin, chosen minus
# rejected. At the start policy and reference agree, so every reward is 0 and the loss is log 2.

# %%
p_train, p_val, _ = dpo.split_preference_data(preference_data)
p_train = dpo.encode_preference_data(p_train[: 16 if QUICK else None])
p_val = dpo.encode_preference_data(p_val[: 8 if QUICK else None])
dpo_batch = 4 if QUICK else 8
dpo_train = dpo.PreferenceLoader(
    tuple(p_train), batch_size=dpo_batch, shuffle=True, drop_last=True, allowed_max_length=L, pad_multiple=64
)
dpo_val = dpo.PreferenceLoader(tuple(p_val), batch_size=dpo_batch, allowed_max_length=L, pad_multiple=64)
start = dpo.evaluate_dpo(tuned, tuned, cfg, dpo_val.iter_epoch(0))
print(
    f"before DPO: loss {start['loss']:.4f} (log 2 = {math.log(2):.4f}), margin {start['reward_margin']:.4f}"
)
assert abs(start["loss"] - math.log(2)) < 1e-5 and abs(start["reward_margin"]) < 1e-6

dpo_tx = dpo.make_dpo_optimizer(learning_rate=5e-6 if not QUICK else 1e-3, weight_decay=0.01)
dpo_state = dpo.create_dpo_state(jax.tree.map(jnp.array, tuned), dpo_tx)
dpo_state, _, dpo_records = dpo.train_dpo(
    dpo_state,
    tuned,
    dpo_tx,
    cfg,
    dpo_train,
    dpo_val,
    beta=0.1,
    num_epochs=1,
    eval_freq=4 if QUICK else 5,
    eval_iter=1 if QUICK else 5,
)
for r in dpo_records:
    print(dpo.eval_line(max(1, math.ceil(r["epoch"])), r))
margins = np.array([r["train_reward_margin"] for r in dpo_records])
assert margins[-1] > margins[0], "DPO should move the policy towards the chosen answers"

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([r["step"] for r in dpo_records], margins, label="training")
ax.plot(
    [r["step"] for r in dpo_records], [r["val_reward_margin"] for r in dpo_records], "--", label="validation"
)
ax.set_xlabel("step")
ax.set_ylabel("reward margin (chosen − rejected)")
ax.legend()
save(fig, "ch07_dpo_margins.png")

# %%
print("ch07: all checks passed")
