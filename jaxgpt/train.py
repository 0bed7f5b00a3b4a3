"""Pretraining (book chapter 5, with appendix D's warmup, cosine decay and clipping) as pure functions.

The pieces, in the order a training run uses them:

  TrainConfig            frozen options of the optimisation and the loop
  make_optimizer         AdamW (+ linear warmup, cosine decay, global-norm clipping), all optax
  TrainState             params, optimizer state, step and the dropout key: a plain pytree
  create_train_state     a fresh state from a model config, a train config and a key
  train_step             one optimizer update: value_and_grad of the cross-entropy, dropout on
  evaluate               the book's evaluate_model: mean loss over at most eval_iter batches
  generate_and_print_sample   greedy continuation of a start text, as the book prints it
  train                  the book's train_model_simple, with hooks for logging and checkpoints

Shapes: ``A`` grad-accumulation microbatches, ``B`` batch size, ``T`` tokens per window.
Determinism: the dropout key of step ``s`` is ``fold_in(state.rng, s)`` and every epoch's data
order is a function of ``(seed, epoch)``, so a run resumed from a checkpoint takes exactly the
steps an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt import sharding
from jaxgpt.checkpoint import CheckpointError, CheckpointManager
from jaxgpt.config import FrozenConfig, GPTConfig
from jaxgpt.data import DataLoader, sliding_windows, train_val_split
from jaxgpt.generation import generate
from jaxgpt.loss import calc_loss_batch, train_loss
from jaxgpt.model import Params, init_params
from jaxgpt.tokenizer import EOT_TEXT, get_tokenizer, text_to_token_ids, token_ids_to_text
from jaxgpt.xla import compiler_options

Array = jax.Array
Batch = tuple[Array, Array]
LossFn = Callable[[Params, GPTConfig, Array, Array, Array], Array]  # (params, cfg, x, y, dropout key)


@dataclass(frozen=True)
class TrainConfig(FrozenConfig):
    """Options of one training run (the book's ``OTHER_SETTINGS`` plus appendix D).

    One optimizer step consumes ``grad_accum`` batches of ``batch_size`` windows, so it sees
    ``grad_accum * batch_size * T`` tokens. ``max_steps`` (when set) overrides ``num_epochs``.
    """

    learning_rate: float = 4e-4  # peak learning rate of AdamW (the book's 0.0004)
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0  # linear warmup from warmup_init_lr to learning_rate (appendix D.1)
    warmup_init_lr: float = 0.0
    min_lr: float | None = None  # cosine decay to min_lr after warmup (appendix D.2); None: constant
    grad_clip: float | None = None  # clip gradients to this global L2 norm (appendix D.3); None: off
    grad_accum: int = 1  # microbatches averaged per optimizer step
    batch_size: int = 2  # windows per microbatch (the book uses 2)
    stride: int | None = None  # distance between window starts; None: the context length (no overlap)
    train_ratio: float = 0.9  # first 90% of the tokens train, the rest validates (book 5.1)
    num_epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps, whatever num_epochs says
    eval_freq: int = 5  # evaluate after step 1 and every eval_freq steps after it (book: 5)
    eval_iter: int = 5  # batches per split in each evaluation (book: 5)
    seed: int = 123  # model init, dropout and data order (the book's torch.manual_seed(123))
    start_context: str = "Every effort moves you"
    sample_tokens: int = 50  # tokens generated for the sample after each epoch; 0: no samples

    def __post_init__(self) -> None:
        positive = (
            "learning_rate",
            "grad_accum",
            "batch_size",
            "num_epochs",
            "eval_freq",
            "eval_iter",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {value!r}")
        for name in ("stride", "max_steps", "grad_clip", "min_lr"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ValueError(f"TrainConfig.{name} must be positive or None, got {value!r}")
        for name in ("weight_decay", "warmup_steps", "warmup_init_lr", "seed", "sample_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {value!r}")
        if not 0.0 < self.train_ratio < 1.0:
            raise ValueError(
                f"TrainConfig.train_ratio must be strictly between 0 and 1, got {self.train_ratio!r}"
            )
        if self.min_lr is not None and self.min_lr > self.learning_rate:
            raise ValueError(
                f"TrainConfig.min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})"
            )


# Training options tuned per preset; a preset not listed trains with the book's TrainConfig().
# quickstart: the best validation loss we found for a few minutes on 2 CPU cores (a sweep over
# width, depth, batch and learning rate at that token budget: constant 1e-3 beat 4e-4 and cosine
# decay). 4 epochs = 488k tokens, about 5 minutes on 2 idle cores at ~1800 tokens/s.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "quickstart": TrainConfig(
        learning_rate=1e-3, warmup_steps=10, batch_size=8, num_epochs=4, eval_freq=40, eval_iter=5
    ),
}


def default_train_config(preset: str) -> TrainConfig:
    """The training options the CLI starts from for ``preset``."""
    return TRAIN_PRESETS.get(preset, TrainConfig())


# --------------------------------------------------------------------------------------------
# Data: text files -> train and validation loaders (book 5.1.2)
# --------------------------------------------------------------------------------------------


class DataError(ValueError):
    """The training text or its windows cannot make a run (named before training starts)."""


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data directory {path} holds no .txt files")
        return files
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data path {path} is neither a file nor a directory")
    return [path]


def load_corpus(paths: Sequence[str | Path]) -> str:
    """The UTF-8 text of each file (a directory gives its .txt files, sorted), documents joined
    by ``<|endoftext|>`` as GPT-2's training data separates them.

    Raises DataError naming the file that is missing, unreadable, not UTF-8 or empty.
    """
    if not paths:
        raise DataError("no data paths given")
    texts = []
    for path in paths:
        for file in _text_files(Path(path)):
            try:
                raw = file.read_bytes()
            except OSError as e:
                raise DataError(f"data file {file} cannot be read: {e.strerror or e}") from e
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"data file {file} is not UTF-8 text (byte {e.start} is {raw[e.start : e.start + 1]!r}); "
                    "convert it, e.g. with iconv -t utf-8"
                ) from e
            if not text.strip():
                raise DataError(f"data file {file} is empty")
            texts.append(text)
    return f"\n{EOT_TEXT}\n".join(texts)


@dataclass(frozen=True)
class Data:
    """The loaders of a run plus what describes them (stored with the run to check a resume)."""

    train_loader: DataLoader
    val_loader: DataLoader
    train_tokens: int
    val_tokens: int
    fingerprint: str  # sha256 of the train and validation token ids


def prepare_data(text: str, context_length: int, tcfg: TrainConfig) -> Data:
    """Split ``text`` 90/10 (book 5.1.2), tokenize, cut windows of ``context_length`` tokens.

    The training loader shuffles with ``tcfg.seed`` and drops a last short batch; the
    validation loader keeps its order and every window. Raises DataError when either split has
    no window, or the training split has fewer windows than one step needs.
    """
    tokenizer = get_tokenizer()
    train_text, val_text = train_val_split(text, tcfg.train_ratio)
    train_ids = np.asarray(tokenizer.encode(train_text, allowed_special={EOT_TEXT}), np.int32)
    val_ids = np.asarray(tokenizer.encode(val_text, allowed_special={EOT_TEXT}), np.int32)
    stride = context_length if tcfg.stride is None else tcfg.stride
    need = context_length + 1
    if len(train_ids) < need or len(val_ids) < need:
        raise DataError(
            f"corpus too small: the training split has {len(train_ids)} tokens and the validation split "
            f"{len(val_ids)}, but each needs at least context_length + 1 = {need} for one window; "
            "give more text or a smaller --context-length"
        )
    train_x, train_y = sliding_windows(train_ids, context_length, stride)
    val_x, val_y = sliding_windows(val_ids, context_length, stride)
    per_step = tcfg.batch_size * tcfg.grad_accum
    if per_step > len(train_x):
        raise DataError(
            f"batch too large: a step takes batch_size x grad_accum = {tcfg.batch_size} x {tcfg.grad_accum}"
            f" = {per_step} windows, but the training split has only {len(train_x)} windows of "
            f"{context_length} tokens (stride {stride}); lower --batch-size/--grad-accum or give more text"
        )
    digest = hashlib.sha256(train_ids.tobytes() + b"|" + val_ids.tobytes()).hexdigest()
    return Data(
        train_loader=DataLoader(
            train_x, train_y, tcfg.batch_size, shuffle=True, drop_last=True, seed=tcfg.seed
        ),
        val_loader=DataLoader(val_x, val_y, tcfg.batch_size, shuffle=False, drop_last=False),
        train_tokens=len(train_ids),
        val_tokens=len(val_ids),
        fingerprint=digest,
    )


# --------------------------------------------------------------------------------------------
# Optimizer and state
# --------------------------------------------------------------------------------------------


def make_schedule(tcfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per step: linear warmup, then constant or cosine decay to ``min_lr``."""
    warmup = min(tcfg.warmup_steps, total_steps)
    if tcfg.min_lr is None:
        after = optax.constant_schedule(tcfg.learning_rate)
    else:
        after = optax.cosine_decay_schedule(
            tcfg.learning_rate,
            decay_steps=max(total_steps - warmup, 1),
            alpha=tcfg.min_lr / tcfg.learning_rate,
        )
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(tcfg.warmup_init_lr, tcfg.learning_rate, transition_steps=warmup)
    return optax.join_schedules([ramp, after], boundaries=[warmup])


@functools.lru_cache(maxsize=16)
def make_optimizer(tcfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the schedule of :func:`make_schedule`, after optional global-norm clipping.

    Cached: the same options give the same object, so its jitted train step is reused.
    """
    adamw = optax.adamw(
        make_schedule(tcfg, total_steps), b1=tcfg.beta1, b2=tcfg.beta2, weight_decay=tcfg.weight_decay
    )
    if tcfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), adamw)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (what a checkpoint stores).

    ``rng`` is a raw ``uint32[2]`` key; the dropout key of a step is ``fold_in(rng, step)``.
    """

    params: Params
    opt_state: optax.OptState
    step: Array  # () int32, optimizer updates done so far
    rng: Array  # (2,) uint32


def create_train_state(
    cfg: GPTConfig, tcfg: TrainConfig, key: Array, total_steps: int
) -> tuple[TrainState, optax.GradientTransformation]:
    """Fresh params (from ``key``) and optimizer state; also returns the optimizer itself."""
    init_key, dropout_key = jax.random.split(key)
    tx = make_optimizer(tcfg, total_steps)
    params = init_params(cfg, init_key)
    state = TrainState(
        params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=dropout_key
    )
    return state, tx


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------


def train_step(
    state: TrainState,
    batch: Batch,
    rng: Array | None = None,
    *,
    cfg: GPTConfig,
    tx: optax.GradientTransformation,
    loss_fn: LossFn = train_loss,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update -> (new state, metrics {"loss", "grad_norm"} as device scalars).

    ``batch`` is ``(inputs, targets)``, each (B, T), or (A, B, T) for A accumulated microbatches
    whose gradients are averaged (the same update as one batch of A*B windows, without holding
    its activations). ``rng`` is the base dropout key, ``state.rng`` when None. Bind ``cfg`` and
    ``tx`` with ``functools.partial`` and jit once, donating the state (see :func:`jit_train_step`).
    ``loss_fn(params, cfg, inputs, targets, dropout_key)`` is what gets differentiated:
    :func:`jaxgpt.loss.train_loss` (the book's loss with dropout on) unless another is bound.
    """
    inputs, targets = batch
    base_key = state.rng if rng is None else rng
    step_key = jax.random.fold_in(base_key, state.step)
    grad_fn = jax.value_and_grad(loss_fn)  # by default loss.py's: dropout on, logits never held whole

    if inputs.ndim == 2:
        loss, grads = grad_fn(state.params, cfg, inputs, targets, step_key)
    elif inputs.ndim == 3:
        A = inputs.shape[0]

        def micro(
            carry: tuple[Array, Params], xs: tuple[Array, Array, Array]
        ) -> tuple[tuple[Array, Params], None]:
            loss_sum, grad_sum = carry
            i, x, y = xs
            loss, grads = grad_fn(state.params, cfg, x, y, jax.random.fold_in(step_key, i))
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (jnp.zeros((), jnp.float32), zeros)
        (loss_sum, grad_sum), _ = jax.lax.scan(micro, init, (jnp.arange(A), inputs, targets))
        loss = loss_sum / A
        grads = jax.tree.map(lambda g: g / A, grad_sum)
    else:
        raise ValueError(f"batch inputs must be (B, T) or (A, B, T), got shape {inputs.shape}")

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))  # before any clipping
    return new_state, {"loss": loss, "grad_norm": grad_norm}


@functools.lru_cache(maxsize=16)
def jit_train_step(
    cfg: GPTConfig, tx: optax.GradientTransformation, loss_fn: LossFn = train_loss
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """:func:`train_step` with ``cfg``, ``tx`` and ``loss_fn`` bound, jitted once, the state's
    buffers donated (with :func:`jaxgpt.xla.compiler_options`)."""
    step = functools.partial(train_step, cfg=cfg, tx=tx, loss_fn=loss_fn)
    return jax.jit(step, donate_argnums=0, compiler_options=compiler_options())


# --------------------------------------------------------------------------------------------
# Evaluation and samples
# --------------------------------------------------------------------------------------------


def evaluate(params: Params, cfg: GPTConfig, loader: DataLoader, eval_iter: int) -> float:
    """Mean loss, dropout off, over the first ``eval_iter`` batches of ``loader`` (epoch-0 order).

    The book's ``calc_loss_loader(..., num_batches=eval_iter)``; the sum stays on the device and
    is read once. An empty loader gives NaN, as in the book.
    """
    total, count = jnp.zeros((), jnp.float32), 0
    for input_batch, target_batch in loader.iter_epoch(0):
        if count >= eval_iter:
            break
        total = total + calc_loss_batch(params, cfg, jnp.asarray(input_batch), jnp.asarray(target_batch))
        count += 1
    return float(total) / count if count else math.nan


def evaluate_model(
    params: Params, cfg: GPTConfig, train_loader: DataLoader, val_loader: DataLoader, eval_iter: int
) -> tuple[float, float]:
    """(train loss, validation loss), each over at most ``eval_iter`` batches (book 5.1.3)."""
    return evaluate(params, cfg, train_loader, eval_iter), evaluate(params, cfg, val_loader, eval_iter)


def generate_sample(params: Params, cfg: GPTConfig, start_context: str, max_new_tokens: int = 50) -> str:
    """Greedy continuation of ``start_context``, as one line (the book's generate_and_print_sample)."""
    encoded = text_to_token_ids(start_context) % cfg.vocab_size  # (1, T); a toy vocab gets the ids folded in
    token_ids = generate(params, cfg, encoded, max_new_tokens)
    return token_ids_to_text(token_ids).replace("\n", " ")  # compact print format, as in the book


def generate_and_print_sample(
    params: Params, cfg: GPTConfig, start_context: str, max_new_tokens: int = 50
) -> None:
    print(generate_sample(params, cfg, start_context, max_new_tokens))


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the state after it is not saved."""


@dataclass
class Position:
    """Where the loop is: the epoch and the next batch index in it, plus tokens seen so far."""

    epoch: int = 0
    batch: int = 0  # index of the next (micro)batch of this epoch
    tokens_seen: int = 0


class Hooks:
    """Callbacks of :func:`train`; subclass and override what you need (all default to nothing).

    ``on_step`` gets the metrics of the step *before* the last one dispatched (floats), so reading
    them never makes the host wait for the device; ``should_stop`` is asked after every step.
    """

    def on_start(self, state: TrainState, pos: Position, total_steps: int) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float], pos: Position) -> None: ...
    def on_eval(self, record: dict[str, Any]) -> None: ...
    def on_epoch_end(self, epoch: int, sample: str) -> None: ...
    def save(self, state: TrainState, pos: Position, final: bool) -> None: ...
    def should_save(self, step: int) -> bool:
        return False

    def should_stop(self, step: int) -> bool:
        return False


def steps_per_epoch(loader: DataLoader, tcfg: TrainConfig) -> int:
    """Optimizer steps in one pass over ``loader`` (a last incomplete accumulation group is dropped)."""
    return len(loader) // tcfg.grad_accum


def total_train_steps(loader: DataLoader, tcfg: TrainConfig) -> int:
    return tcfg.max_steps if tcfg.max_steps is not None else tcfg.num_epochs * steps_per_epoch(loader, tcfg)


def epoch_batches(
    loader: DataLoader, tcfg: TrainConfig, epoch: int, start: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The batches of one epoch from microbatch ``start`` on, stacked to (A, B, T) when accumulating."""
    n = steps_per_epoch(loader, tcfg) * tcfg.grad_accum
    it = loader.iter_epoch(epoch, start)
    for _ in range(start, n, tcfg.grad_accum):
        group = [next(it) for _ in range(tcfg.grad_accum)]
        if tcfg.grad_accum == 1:
            yield group[0]
        else:
            yield np.stack([x for x, _ in group]), np.stack([y for _, y in group])


def _read(metrics: dict[str, Array]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _check_finite(step: int, metrics: dict[str, float]) -> None:
    if not all(math.isfinite(v) for v in metrics.values()):
        raise NonFiniteLossError(
            f"non-finite training metrics at step {step}: {metrics}. Training stopped; the state after "
            "this step was not saved, so the last checkpoint is the last good one. Try a lower "
            "learning rate, warmup (--warmup-steps) or gradient clipping (--grad-clip)."
        )


def train(
    state: TrainState,
    tx: optax.GradientTransformation,
    cfg: GPTConfig,
    tcfg: TrainConfig,
    train_loader: DataLoader,
    val_loader: DataLoader,
    pos: Position | None = None,
    hooks: Hooks | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[TrainState, Position, list[dict[str, Any]]]:
    """The book's ``train_model_simple``: epochs of train steps, evaluations, a sample per epoch.

    Starts at ``pos`` (a resumed run's data position) and stops after ``total_train_steps``
    steps, or earlier when ``hooks.should_stop`` says so. Returns the final state, position and
    the evaluation records ``{"step", "epoch" (fractional), "tokens_seen", "train_loss",
    "val_loss", "lr"}``.
    The caller's ``state`` is donated: use only the returned one.

    With a ``mesh`` (``jaxgpt.sharding.make_mesh``) the same step runs sharded over its devices:
    state by the sharding rules, batches split over data x fsdp (see ``jaxgpt/sharding.py``).
    """
    pos = dataclasses.replace(pos) if pos is not None else Position()
    hooks = hooks if hooks is not None else Hooks()
    total_steps = total_train_steps(train_loader, tcfg)
    per_epoch = steps_per_epoch(train_loader, tcfg)
    if per_epoch == 0:
        raise ValueError(
            f"the training split has {len(train_loader)} batches, fewer than grad_accum={tcfg.grad_accum}"
        )
    schedule = make_schedule(tcfg, total_steps)
    step_fn = jit_train_step(cfg, tx)
    if mesh is not None:  # scale-out: the same train_step, jitted with the mesh's shardings
        if tcfg.grad_accum > 1 and jax.process_count() > 1:  # _epoch_batches stacks on the host
            raise ValueError(
                "grad_accum > 1 is not supported with several processes yet; use a larger mesh batch"
            )
        state = sharding.shard_state(state, mesh)
        shardings = sharding.state_shardings(state, mesh)
        step_fn = sharding.shard_train_step(
            functools.partial(train_step, cfg=cfg, tx=tx), mesh, shardings, accumulate=tcfg.grad_accum > 1
        )
        train_loader = sharding.MeshLoader(train_loader, mesh)
        val_loader = sharding.MeshLoader(val_loader, mesh)
    records: list[dict[str, Any]] = []

    step = int(state.step)
    hooks.on_start(state, pos, total_steps)
    pending: tuple[int, dict[str, Array]] | None = None  # last step's metrics, not yet read

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            s, m = pending
            pending = None
            values = _read(m)
            _check_finite(s, values)
            hooks.on_step(s, values, pos)

    def eval_now(s: int) -> None:
        train_l, val_l = evaluate_model(state.params, cfg, train_loader, val_loader, tcfg.eval_iter)
        record = {
            "step": s,
            "epoch": pos.epoch + pos.batch / (per_epoch * tcfg.grad_accum),  # fractional, from 0
            "tokens_seen": pos.tokens_seen,
            "train_loss": train_l,
            "val_loss": val_l,
            "lr": float(schedule(s - 1)),
        }
        records.append(record)
        hooks.on_eval(record)

    def sample_now() -> None:
        flush()
        sample = (
            generate_sample(state.params, cfg, tcfg.start_context, tcfg.sample_tokens)
            if tcfg.sample_tokens
            else ""
        )
        hooks.on_epoch_end(pos.epoch, sample)

    stopped, ended_epoch = False, False
    while step < total_steps and not stopped:
        for input_batch, target_batch in epoch_batches(train_loader, tcfg, pos.epoch, pos.batch):
            state, metrics = step_fn(state, (jnp.asarray(input_batch), jnp.asarray(target_batch)))
            step += 1
            flush()  # the previous step's metrics: ready by now, while this step runs
            pending = (step, metrics)
            pos.batch += tcfg.grad_accum
            pos.tokens_seen += int(input_batch.size)
            if (step - 1) % tcfg.eval_freq == 0:  # as the book: after the first step, then every eval_freq
                eval_now(step)
            if hooks.should_save(step):
                flush()  # never save a state whose step was not finite
                hooks.save(state, pos, final=False)
            if step >= total_steps:
                break
            if hooks.should_stop(step):
                stopped = True
                break
        ended_epoch = pos.batch >= per_epoch * tcfg.grad_accum
        if ended_epoch:  # the book prints a sample after each epoch
            sample_now()
            pos.epoch, pos.batch = pos.epoch + 1, 0

    flush()
    if not stopped:
        if not ended_epoch:  # max_steps ended the run inside an epoch: one last sample
            sample_now()
        if not records or records[-1]["step"] != step:
            eval_now(step)
    hooks.save(state, pos, final=True)
    return state, pos, records


# --------------------------------------------------------------------------------------------
# Checkpoints of the whole run
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    mngr: CheckpointManager,
    state: TrainState,
    cfg: GPTConfig,
    tcfg: TrainConfig,
    pos: Position,
    total_steps: int,
    extra: dict[str, Any] | None = None,
) -> str:
    """Save ``state`` with the configs and data position as step ``state.step``; returns its path."""
    step = int(state.step)
    meta = {
        "model_config": cfg.to_dict(),
        "train_config": tcfg.to_dict(),
        "position": dataclasses.asdict(pos),
        "total_steps": total_steps,
        **(extra or {}),
    }
    opt = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}
    return str(mngr.save(step, state.params, opt, meta))


def restore_checkpoint(
    mngr: CheckpointManager, step: int | None = None, mesh: jax.sharding.Mesh | None = None
) -> tuple[TrainState, optax.GradientTransformation, GPTConfig, TrainConfig, Position, dict[str, Any]]:
    """The run saved in ``mngr`` at ``step`` (default latest) -> (state, tx, cfg, tcfg, pos, meta).

    The configs come from the checkpoint; the optimizer is rebuilt from them and the saved
    state restored into its structure, so training continues exactly where it stopped.
    With a ``mesh``, every array is read straight into its shards on that mesh, whatever mesh
    (or single device) saved it.
    """
    step, meta = mngr.read_meta(step)
    try:
        cfg = GPTConfig.from_dict(meta["model_config"])
        tcfg = TrainConfig.from_dict(meta["train_config"])
        pos = Position(**meta["position"])
        total_steps = int(meta["total_steps"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.root} has an unusable meta record: {e}"
        ) from e
    template = jax.eval_shape(lambda: create_train_state(cfg, tcfg, jax.random.PRNGKey(0), total_steps)[0])
    tx = make_optimizer(tcfg, total_steps)
    like = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), template)  # structure and shapes only
    if mesh is not None:  # shapes plus target shardings: orbax restores onto the mesh
        like = sharding.abstract_state(template, sharding.state_shardings(template, mesh))
    opt_like = {"opt_state": like.opt_state, "step": like.step, "rng": like.rng}
    _, params, opt, _ = mngr.restore(step, params_like=like.params, state_like=opt_like)
    state = TrainState(params=params, opt_state=opt["opt_state"], step=opt["step"], rng=opt["rng"])
    if int(state.step) != step:
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.root} holds a state of step {int(state.step)}"
        )
    return state, tx, cfg, tcfg, pos, meta
