"""Preference tuning with DPO (the book's bonus material to chapter 7) as pure functions.

Direct Preference Optimization (Rafailov et al., 2023) moves a model towards the ``chosen``
response of each entry and away from the ``rejected`` one, measured against a frozen copy of
the starting model (the *reference*). The pieces, in the order a run uses them:

  read_preference_data    the JSON list of entries, checked (PreferenceDataError names entry and field)
  split_preference_data   the book's 85/10/5 split: training, then test, then validation entries
  encode_preference_data  token ids of the prompt, prompt + chosen, prompt + rejected
  collate_preference      the book's ``custom_collate_fn``: padded ids and the masks of the response
  PreferenceLoader        batches of a split; epoch ``e``'s order is a function of ``(seed, e)``
  sequence_logprobs       the book's ``compute_logprobs``: mean log-probability of the response
  dpo_loss                the book's ``compute_dpo_loss``, with the reward of every pair
  dpo_batch_loss          policy and reference on one batch -> loss and rewards
  dpo_train_step          one AdamW update; the reference params are a frozen input
  evaluate_dpo            the book's ``compute_dpo_loss_loader``, plus the preference accuracy
  train_dpo               the book's ``train_model_dpo_simple``, resumable

Shapes: ``B`` pairs per batch, ``T`` tokens per padded sequence, ``V`` vocabulary size.
The rewards are the book's: the policy's minus the reference's mean response log-probability
(not multiplied by ``beta``); the reward margin is chosen minus rejected, and the preference
accuracy the fraction of pairs whose chosen reward exceeds their rejected reward.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.config import GPTConfig
from jaxgpt.data import BatchOrder
from jaxgpt.instruct import PROMPT_STYLES, format_input, format_prompt
from jaxgpt.model import GPTModel, Params
from jaxgpt.tokenizer import get_tokenizer
from jaxgpt.train import Hooks, NonFiniteLossError, Position, TrainState
from jaxgpt.xla import compiler_options

Array = jax.Array
Batch = Mapping[str, Array]  # chosen, rejected (B, T) int32; chosen_mask, rejected_mask (B, T) bool
PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>, the book's padding
REQUIRED_FIELDS = ("instruction", "chosen", "rejected")
OPTIONAL_FIELDS = ("input", "output")
METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "accuracy")


class PreferenceDataError(ValueError):
    """A preference file or entry is unusable; the message names the file, the entry and the field."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def read_preference_data(source: str | Path | Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The entries of a preference file (a JSON list) or of a list already loaded, checked.

    Each entry needs ``instruction``, ``chosen`` and ``rejected`` as strings; ``input`` and
    ``output`` are optional strings (the book's file has all five). Raises PreferenceDataError
    naming the file, the entry's index and the field for anything else, and for an empty list.
    """
    where = "the data"
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PreferenceDataError(f"{where} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PreferenceDataError(f"{where} cannot be read: {e}") from None
        if not text.strip():
            raise PreferenceDataError(f"{where} is empty: expected a JSON list of preference entries")
        try:
            source = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreferenceDataError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(source, (list, tuple)):
        raise PreferenceDataError(f"{where} holds a {type(source).__name__}, not a list of entries")
    if not source:
        raise PreferenceDataError(f"{where} holds no entries")
    entries = []
    for i, entry in enumerate(source):
        if not isinstance(entry, Mapping):
            raise PreferenceDataError(f"{where}: entry {i} is a {type(entry).__name__}, not an object")
        for field in REQUIRED_FIELDS:
            if field not in entry:
                raise PreferenceDataError(f"{where}: entry {i} has no {field!r}")
        for field in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            value = entry.get(field, "")
            if not isinstance(value, str):
                raise PreferenceDataError(
                    f"{where}: entry {i} field {field!r} is a {type(value).__name__}, not a string"
                )
        entries.append({k: entry.get(k, "") for k in REQUIRED_FIELDS + OPTIONAL_FIELDS})
    return entries


def split_preference_data(
    entries: Sequence[Mapping[str, str]], train_frac: float = 0.85, test_frac: float = 0.10
) -> tuple[list, list, list]:
    """(train, validation, test) as the book cuts them: the first 85%, then 10% for testing,
    the rest (5%) for validation, in file order."""
    n_train, n_test = int(len(entries) * train_frac), int(len(entries) * test_frac)
    train, test = list(entries[:n_train]), list(entries[n_train : n_train + n_test])
    return train, list(entries[n_train + n_test :]), test


def encode_preference_data(
    entries: Iterable[Mapping[str, str]], style: str = "alpaca", tokenizer: Any = None
) -> list[dict[str, list[int]]]:
    """Token ids per entry, as the book's ``PreferenceDataset`` holds them.

    ``prompt``: the instruction (and input) alone; ``chosen`` / ``rejected``: the prompt, the
    response marker and that response. No end-of-text token is appended (the book's DPO data has none).
    """
    tokenizer = get_tokenizer() if tokenizer is None else tokenizer
    out = []
    for entry in entries:
        prompt = format_prompt(entry, style)
        out.append(
            {
                "prompt": tokenizer.encode(format_input(entry, style)),
                "chosen": tokenizer.encode(prompt + entry["chosen"]),
                "rejected": tokenizer.encode(prompt + entry["rejected"]),
            }
        )
    return out


def response_start(item: Mapping[str, Sequence[int]]) -> int:
    """Index of the first token the log-probabilities count: the book masks the prompt and the
    two tokens after it (``"\\n\\n"`` and ``"###"`` of the Alpaca marker), so ``" Response:\\n"``
    and the response itself count."""
    return len(item["prompt"]) + 2


def check_fits(
    items: Sequence[Mapping[str, Sequence[int]]], allowed_max_length: int, where: str = ""
) -> None:
    """Raise PreferenceDataError for the first item whose chosen or rejected response has no
    token left within ``allowed_max_length`` (its log-probability would be 0 / 0)."""
    for i, item in enumerate(items):
        for key in ("chosen", "rejected"):
            if min(len(item[key]), allowed_max_length) <= response_start(item):
                raise PreferenceDataError(
                    f"{where}entry {i}: its prompt takes {len(item['prompt'])} tokens and leaves "
                    f"no {key} response token within the allowed length {allowed_max_length}"
                )


def padded_length(longest: int, allowed_max_length: int | None = None, pad_multiple: int = 1) -> int:
    """Padded length of a batch whose longest sequence has ``longest`` tokens: one more (as the
    book's collate), rounded up to a multiple of ``pad_multiple`` so batches of varying length
    share a few shapes (each shape compiles once), at most ``allowed_max_length``."""
    length = longest + 1
    length = -(-length // pad_multiple) * pad_multiple
    return length if allowed_max_length is None else min(length, allowed_max_length)


def collate_preference(
    items: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int = PAD_TOKEN_ID,
    allowed_max_length: int | None = None,
    mask_prompt_tokens: bool = True,
    pad_multiple: int = 1,
) -> dict[str, np.ndarray]:
    """One batch of pairs: the book's ``custom_collate_fn`` as NumPy arrays.

    ``chosen`` and ``rejected`` (B, T) int32 are padded with ``pad_token_id`` to one common
    length (see :func:`padded_length`) and cut at ``allowed_max_length``; ``chosen_mask`` and
    ``rejected_mask`` (B, T) bool are True on the tokens whose log-probability counts: not the
    padding, and with ``mask_prompt_tokens`` not the prompt (:func:`response_start`). Padding
    beyond the book's length changes no log-probability: it is masked and, the model being
    causal, unseen by the tokens before it.
    """
    if not items:
        raise ValueError("a batch needs at least one entry")
    longest = max(len(item[key]) for item in items for key in ("chosen", "rejected"))
    T = padded_length(longest, allowed_max_length, pad_multiple)
    B = len(items)
    batch: dict[str, np.ndarray] = {}
    for key in ("chosen", "rejected"):
        ids = np.full((B, T), pad_token_id, np.int32)
        mask = np.zeros((B, T), bool)
        for i, item in enumerate(items):
            seq = list(item[key])[:T]
            ids[i, : len(seq)] = seq
            mask[i, response_start(item) if mask_prompt_tokens else 0 : len(seq)] = True
        batch[key], batch[f"{key}_mask"] = ids, mask
    return batch


@dataclasses.dataclass(frozen=True, eq=False)
class PreferenceLoader(BatchOrder):
    """Batches (dicts of :func:`collate_preference`) of encoded entries.

    The book trains with ``shuffle=True, drop_last=True`` and evaluates with neither; epoch
    ``e``'s order is ``default_rng([seed, e])``'s (see :class:`jaxgpt.data.BatchOrder`), so
    ``(epoch, batch)`` is the whole data position of a run. ``pad_multiple`` buckets the padded
    lengths (1: the book's exact lengths).
    """

    items: tuple
    batch_size: int = 8
    shuffle: bool = False
    drop_last: bool = False
    seed: int = 123
    allowed_max_length: int | None = None
    pad_multiple: int = 1
    pad_token_id: int = PAD_TOKEN_ID

    def __post_init__(self) -> None:
        self.check_batching()
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be a positive integer, got {self.pad_multiple}")

    @property
    def num_windows(self) -> int:
        return len(self.items)

    def iter_epoch(self, epoch: int = 0, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for rows in self.batch_indices(epoch, start):  # (B,)
            yield collate_preference(
                [self.items[r] for r in rows],
                self.pad_token_id,
                self.allowed_max_length,
                pad_multiple=self.pad_multiple,
            )


def fingerprint(items: Sequence[Mapping[str, Sequence[int]]]) -> str:
    """A short hash of encoded entries: a resumed run checks it reads the same data."""
    h = hashlib.sha256()
    for item in items:
        for key in ("prompt", "chosen", "rejected"):
            h.update(np.asarray(item[key], np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Log-probabilities and the loss
# --------------------------------------------------------------------------------------------


def sequence_logprobs(logits: Array, ids: Array, mask: Array) -> Array:
    """Mean log-probability of the masked tokens of each row (the book's ``compute_logprobs``).

    ``logits`` (B, T, V) predict ``ids`` (B, T) shifted by one; ``mask`` (B, T) marks the
    tokens that count (position t counts the prediction of ``ids[:, t]``). Returns (B,) float32.
    """
    logits = logits[:, :-1].astype(jnp.float32)  # (B, T-1, V): the last position predicts nothing
    labels, m = ids[:, 1:], mask[:, 1:].astype(jnp.float32)  # (B, T-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]  # (B, T-1)
    token_logprobs = picked - jax.nn.logsumexp(logits, axis=-1)  # log_softmax at the label
    return (token_logprobs * m).sum(-1) / m.sum(-1)  # (B,)


def dpo_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    reference_chosen: Array,
    reference_rejected: Array,
    beta: float = 0.1,
) -> tuple[Array, Array, Array]:
    """DPO's loss (eq. 7 of the paper) from the (B,) log-probabilities -> (loss, chosen rewards
    (B,), rejected rewards (B,)). The loss is the batch mean; the rewards carry no gradient.
    The book's ``compute_dpo_loss`` returns the same loss and the means of these rewards."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)  # (B,)
    loss = -jax.nn.log_sigmoid(beta * logits).mean()
    chosen_rewards = jax.lax.stop_gradient(policy_chosen - reference_chosen)
    rejected_rewards = jax.lax.stop_gradient(policy_rejected - reference_rejected)
    return loss, chosen_rewards, rejected_rewards


def batch_logprobs(
    params: Params, cfg: GPTConfig, batch: Batch, dropout_key: Array | None = None
) -> tuple[Array, Array]:
    """(chosen, rejected) mean response log-probabilities (B,) of a model on one batch.

    Both halves go through the model as one (2B, T) batch. Dropout is on only with a
    ``dropout_key`` (and a non-zero ``cfg.drop_rate``).
    """
    B = batch["chosen"].shape[0]
    ids = jnp.concatenate([batch["chosen"], batch["rejected"]])  # (2B, T)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])  # (2B, T)
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    logits = GPTModel(cfg).apply({"params": params}, ids, deterministic=dropout_key is None, rngs=rngs)
    logprobs = sequence_logprobs(logits, ids, mask)  # (2B,)
    return logprobs[:B], logprobs[B:]


def dpo_batch_loss(
    params: Params,
    ref_params: Params,
    cfg: GPTConfig,
    batch: Batch,
    beta: float = 0.1,
    dropout_key: Array | None = None,
) -> tuple[Array, tuple[Array, Array]]:
    """The book's ``compute_dpo_loss_batch`` -> (loss, (chosen rewards, rejected rewards)).

    The reference runs without dropout and without gradient; ``dropout_key`` is the policy's.
    """
    ref_chosen, ref_rejected = batch_logprobs(jax.lax.stop_gradient(ref_params), cfg, batch)
    chosen, rejected = batch_logprobs(params, cfg, batch, dropout_key)
    loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    return loss, (chosen_rewards, rejected_rewards)


def reward_metrics(loss: Array, chosen_rewards: Array, rejected_rewards: Array) -> dict[str, Array]:
    """Loss, mean rewards, mean reward margin and preference accuracy of one batch."""
    return {
        "loss": loss,
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "accuracy": (chosen_rewards > rejected_rewards).astype(jnp.float32).mean(),
    }


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def make_dpo_optimizer(
    learning_rate: float = 5e-6, weight_decay: float = 0.01
) -> optax.GradientTransformation:
    """The book's ``torch.optim.AdamW(policy_model.parameters(), lr=5e-6, weight_decay=0.01)``.

    Cached: the same options give the same object, so its jitted train step is reused.
    """
    return optax.adamw(learning_rate, weight_decay=weight_decay)


def create_dpo_state(params: Params, tx: optax.GradientTransformation, seed: int = 123) -> TrainState:
    """The policy's train state: its params (a copy of the starting weights), fresh AdamW state,
    step 0 and the dropout key of ``seed``. The reference keeps no state at all."""
    params = jax.tree.map(jnp.array, params)  # its own buffers: the step donates them
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
    )


def dpo_train_step(
    state: TrainState,
    batch: Batch,
    ref_params: Params,
    *,
    cfg: GPTConfig,
    tx: optax.GradientTransformation,
    beta: float = 0.1,
) -> tuple[TrainState, dict[str, Array]]:
    """One AdamW update of the policy -> (new state, metrics of :func:`reward_metrics`).

    ``ref_params`` is an input like the batch: no optimizer state, no gradient, never changed.
    Step ``s`` draws the policy's dropout with ``fold_in(state.rng, s)``, so a resumed run
    draws the same masks.
    """
    key = jax.random.fold_in(state.rng, state.step) if cfg.drop_rate > 0 else None

    def loss_fn(params: Params) -> tuple[Array, tuple[Array, Array]]:
        return dpo_batch_loss(params, ref_params, cfg, batch, beta, key)

    (loss, (chosen_rewards, rejected_rewards)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    return new_state, reward_metrics(loss, chosen_rewards, rejected_rewards)


@functools.lru_cache(maxsize=16)
def jit_dpo_train_step(
    cfg: GPTConfig, tx: optax.GradientTransformation, beta: float = 0.1
) -> Callable[[TrainState, Batch, Params], tuple[TrainState, dict[str, Array]]]:
    """:func:`dpo_train_step` with its options bound, jitted once, the state's buffers donated."""
    step = functools.partial(dpo_train_step, cfg=cfg, tx=tx, beta=beta)
    return jax.jit(step, donate_argnums=0, compiler_options=compiler_options(training=True))


@functools.partial(jax.jit, static_argnames=("cfg", "beta"))
def _eval_batch(params: Params, ref_params: Params, batch: Batch, cfg: GPTConfig, beta: float) -> dict:
    loss, (chosen, rejected) = dpo_batch_loss(params, ref_params, cfg, batch, beta)
    return {"loss": loss, "chosen": chosen, "rejected": rejected}


# --------------------------------------------------------------------------------------------
# Evaluation and the loop
# --------------------------------------------------------------------------------------------


def evaluate_dpo(
    params: Params,
    ref_params: Params,
    cfg: GPTConfig,
    batches: Iterable[Batch],
    beta: float = 0.1,
    num_batches: int | None = None,
) -> dict[str, float]:
    """The book's ``compute_dpo_loss_loader``: loss and rewards averaged over the first
    ``num_batches`` batches (all when None), dropout off; plus the reward margin and the
    preference accuracy over all their pairs. No batch gives NaN everywhere."""
    sums = dict.fromkeys(("loss", "chosen_reward", "rejected_reward"), 0.0)
    correct = pairs = n = 0
    for batch in batches:
        if num_batches is not None and n >= num_batches:
            break
        out = _eval_batch(params, ref_params, {k: jnp.asarray(v) for k, v in batch.items()}, cfg, beta)
        chosen, rejected = np.asarray(out["chosen"]), np.asarray(out["rejected"])
        sums["loss"] += float(out["loss"])
        sums["chosen_reward"] += float(chosen.mean())
        sums["rejected_reward"] += float(rejected.mean())
        correct, pairs, n = correct + int((chosen > rejected).sum()), pairs + chosen.size, n + 1
    if n == 0:
        return dict.fromkeys(METRICS, math.nan)
    result = {k: v / n for k, v in sums.items()}
    result["reward_margin"] = result["chosen_reward"] - result["rejected_reward"]
    result["accuracy"] = correct / pairs
    return result


def train_dpo(
    state: TrainState,
    ref_params: Params,
    tx: optax.GradientTransformation,
    cfg: GPTConfig,
    train_loader: PreferenceLoader,
    val_loader: PreferenceLoader,
    *,
    beta: float = 0.1,
    num_epochs: int = 1,
    eval_freq: int = 5,
    eval_iter: int = 5,
    pos: Position | None = None,
    hooks: Hooks | None = None,
    sample: Callable[[Params], str] | None = None,
) -> tuple[TrainState, Position, list[dict[str, Any]]]:
    """The book's ``train_model_dpo_simple``: epochs of DPO steps with evaluations.

    Evaluates after the first step and every ``eval_freq`` steps (the book's ``global_step %
    eval_freq == 0``) on the first ``eval_iter`` batches of each loader, and after the last
    step; returns the final state, position and the evaluation records (``step``, ``epoch``,
    ``tokens_seen`` and ``train_``/``val_`` + each of :data:`METRICS`). ``tokens_seen`` counts
    the chosen and rejected tokens without padding. Starts at ``pos`` (a resumed run's) and
    stops early when ``hooks.should_stop`` says so (then saves through ``hooks.save``, as at the
    end); a non-finite loss or reward raises NonFiniteLossError before that state is saved.
    ``sample(params)``, when given, is printed through ``hooks.on_epoch_end`` after each epoch.
    The caller's ``state`` is donated: use only the returned one.
    """
    pos = dataclasses.replace(pos) if pos is not None else Position()
    hooks = hooks if hooks is not None else Hooks()
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise ValueError(f"the training split has {train_loader.num_windows} pairs, fewer than one batch")
    total_steps = num_epochs * batches_per_epoch
    step, records = int(state.step), []
    if step >= total_steps:
        return state, pos, records
    step_fn = jit_dpo_train_step(cfg, tx, beta)

    def evaluate_now() -> None:
        record = {
            "step": step,
            "epoch": pos.epoch + pos.batch / batches_per_epoch,
            "tokens_seen": pos.tokens_seen,
        }
        for name, loader in (("train", train_loader), ("val", val_loader)):
            result = evaluate_dpo(state.params, ref_params, cfg, loader.iter_epoch(0), beta, eval_iter)
            record.update({f"{name}_{k}": v for k, v in result.items()})
        records.append(record)
        hooks.on_eval(record)

    hooks.on_start(state, pos, total_steps)
    stopped = False
    while step < total_steps and not stopped:
        for batch in train_loader.iter_epoch(pos.epoch, pos.batch):
            state, metrics = step_fn(state, {k: jnp.asarray(v) for k, v in batch.items()}, ref_params)
            values = {k: float(v) for k, v in metrics.items()}
            step += 1
            if not all(math.isfinite(v) for v in values.values()):
                raise NonFiniteLossError(
                    f"non-finite DPO metrics at step {step}: {values}. Training stopped; this state "
                    "was not saved. Try a lower learning rate."
                )
            pos.batch += 1
            pos.tokens_seen += _real_tokens(batch)
            hooks.on_step(step, values, pos)
            if (step - 1) % eval_freq == 0:
                evaluate_now()
            if hooks.should_save(step):
                hooks.save(state, pos, False)
            stopped = step < total_steps and hooks.should_stop(step)
            if stopped:
                break
        if pos.batch >= batches_per_epoch:
            if sample is not None:
                hooks.on_epoch_end(pos.epoch, sample(state.params))
            pos.epoch, pos.batch = pos.epoch + 1, 0
    if not stopped and (not records or records[-1]["step"] != step):
        evaluate_now()  # the state returned is always evaluated
    hooks.save(state, pos, True)
    return state, pos, records


def _real_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Tokens of a batch's chosen and rejected sequences without the padding."""
    return sum(int((np.asarray(batch[k]) != PAD_TOKEN_ID).sum()) for k in ("chosen", "rejected"))


def eval_line(epoch: int, record: Mapping[str, Any]) -> str:
    """The book's evaluation line: ``Ep 1 (Step 000000): Train loss ..., Val loss ..., Train
    reward margins ..., Val reward margins ...``."""
    return (
        f"Ep {epoch} (Step {record['step'] - 1:06d}): "
        f"Train loss {record['train_loss']:.3f}, Val loss {record['val_loss']:.3f}, "
        f"Train reward margins {record['train_reward_margin']:.3f}, "
        f"Val reward margins {record['val_reward_margin']:.3f}"
    )


__all__ = [
    "PROMPT_STYLES",
    "PreferenceDataError",
    "PreferenceLoader",
    "batch_logprobs",
    "check_fits",
    "collate_preference",
    "create_dpo_state",
    "dpo_batch_loss",
    "dpo_loss",
    "dpo_train_step",
    "encode_preference_data",
    "eval_line",
    "evaluate_dpo",
    "jit_dpo_train_step",
    "make_dpo_optimizer",
    "read_preference_data",
    "reward_metrics",
    "sequence_logprobs",
    "split_preference_data",
    "train_dpo",
]
