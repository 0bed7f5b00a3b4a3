"""Pretraining (book chapter 5, with appendix D's warmup, cosine decay and clipping) as pure functions.

The pieces, in the order a training run uses them:

  TrainConfig            frozen options of the optimisation and the loop
  make_optimizer         AdamW (+ linear warmup, cosine decay, global-norm clipping), all optax
  TrainState             params, optimizer state, step and the dropout key: a plain pytree
  create_train_state     a fresh state from a model config, a train config and a key
  train_step             one optimizer update: value_and_grad of the cross-entropy, dropout on
  evaluate               the book's evaluate_model: mean loss over at most eval_iter batches
  generate_sample        the continuation of a start text the book prints after each epoch
  train                  the book's train_model_simple, with hooks for logging and checkpoints

The corpus and its loaders are in :mod:`jaxgpt.data` (``prepare_data``); checkpoints of a run in
:mod:`jaxgpt.checkpoint` (``save_checkpoint``, ``restore_checkpoint``).

Shapes: ``A`` grad-accumulation microbatches, ``B`` batch size, ``T`` tokens per window.
Determinism: the dropout key of step ``s`` is ``fold_in(state.rng, s)`` and every epoch's data
order is a function of ``(seed, epoch)``, so a run resumed from a checkpoint takes exactly the
steps an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt import sharding
from jaxgpt.config import FrozenConfig, GPTConfig
from jaxgpt.data import DataLoader
from jaxgpt.generation import generate
from jaxgpt.loss import calc_loss_loader, train_loss
from jaxgpt.model import Params, init_params
from jaxgpt.tokenizer import text_to_token_ids, token_ids_to_text
from jaxgpt.xla import compiler_options

Array = jax.Array
Batch = tuple[Array, Array]
LossFn = Callable[[Params, GPTConfig, Array, Array, Array], Array]  # (params, cfg, x, y, dropout key)


class TrainConfigError(ValueError):
    """A :class:`TrainConfig` field has a bad value. ``field`` names it, so that a front end can
    name its own option instead (``--batch-size`` for ``batch_size``); ``problem`` says what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(f"TrainConfig.{field} {problem}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    sample_temperature: float = 0.0  # 0: greedy, as the book's generate_and_print_sample; > 0: sampled
    sample_top_k: int | None = None  # sample from the k most likely tokens only; None: all

    def __post_init__(self) -> None:
        def check(name: str, ok: Callable[[Any], bool], expected: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if allow_none and value is None:
                return
            if not _is_number(value) or not ok(value):
                raise TrainConfigError(name, f"must be {expected}, got {value!r}")

        integer = lambda v: isinstance(v, int)  # noqa: E731
        check("learning_rate", lambda v: v > 0, "a positive finite number")
        for name in ("beta1", "beta2"):
            check(name, lambda v: 0 <= v < 1, "in [0, 1)")
        for name in ("grad_accum", "batch_size", "num_epochs", "eval_freq", "eval_iter"):
            check(name, lambda v: integer(v) and v > 0, "a positive integer")
        for name in ("stride", "max_steps", "sample_top_k"):
            check(name, lambda v: integer(v) and v > 0, "a positive integer or None", allow_none=True)
        for name in ("grad_clip", "min_lr"):
            check(name, lambda v: v > 0, "a positive finite number or None", allow_none=True)
        for name in ("warmup_steps", "seed", "sample_tokens"):
            check(name, lambda v: integer(v) and v >= 0, "an integer >= 0")
        for name in ("weight_decay", "warmup_init_lr", "sample_temperature"):
            check(name, lambda v: v >= 0, "a finite number >= 0")
        check("train_ratio", lambda v: 0 < v < 1, "strictly between 0 and 1")
        if self.min_lr is not None and self.min_lr > self.learning_rate:
            raise TrainConfigError(
                "min_lr", f"must not exceed the learning rate ({self.learning_rate}), got {self.min_lr!r}"
            )


# Training options tuned per preset; a preset not listed trains with the book's TrainConfig().
# quickstart: the best validation loss we found for a few minutes on 2 CPU cores (a sweep over
# width, depth, batch and learning rate at that token budget: constant 1e-3 beat 4e-4 and cosine
# decay). 4 epochs = 488k tokens, about 5 minutes on 2 idle cores at ~1800 tokens/s.
# Its epoch samples are drawn (temperature 1, top-k 40) rather than greedy: a model this small
# greedily repeats its most likely token, a newline, and the sample would print blank.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "quickstart": TrainConfig(
        learning_rate=1e-3,
        warmup_steps=10,
        batch_size=8,
        num_epochs=4,
        eval_freq=40,
        eval_iter=5,
        sample_temperature=1.0,
        sample_top_k=40,
    ),
}


def default_train_config(preset: str) -> TrainConfig:
    """The training options the CLI starts from for ``preset``."""
    return TRAIN_PRESETS.get(preset, TrainConfig())


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
    cfg: GPTConfig, tcfg: TrainConfig, key: Array, total_steps: int, params: Params | None = None
) -> tuple[TrainState, optax.GradientTransformation]:
    """Fresh optimizer state, and params drawn from ``key`` unless ``params`` are given (to continue
    pretraining from loaded weights); also returns the optimizer itself."""
    init_key, dropout_key = jax.random.split(key)
    tx = make_optimizer(tcfg, total_steps)
    params = init_params(cfg, init_key) if params is None else params
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
    return jax.jit(step, donate_argnums=0, compiler_options=compiler_options(training=True))


# --------------------------------------------------------------------------------------------
# Evaluation and samples
# --------------------------------------------------------------------------------------------


def evaluate(params: Params, cfg: GPTConfig, loader: DataLoader, eval_iter: int) -> float:
    """Mean loss, dropout off, over the first ``eval_iter`` batches of ``loader`` (epoch-0 order):
    the book's ``calc_loss_loader(..., num_batches=eval_iter)``. An empty loader gives NaN."""
    return calc_loss_loader(params, cfg, loader.iter_epoch(0), num_batches=eval_iter)


def evaluate_model(
    params: Params, cfg: GPTConfig, train_loader: DataLoader, val_loader: DataLoader, eval_iter: int
) -> tuple[float, float]:
    """(train loss, validation loss), each over at most ``eval_iter`` batches (book 5.1.3)."""
    return evaluate(params, cfg, train_loader, eval_iter), evaluate(params, cfg, val_loader, eval_iter)


def generate_sample(
    params: Params,
    cfg: GPTConfig,
    start_context: str,
    max_new_tokens: int = 50,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: Array | None = None,
) -> str:
    """The continuation of ``start_context`` as one line, newlines shown as spaces (the book's
    generate_and_print_sample). Greedy by default; ``temperature`` > 0 samples with ``key``."""
    encoded = text_to_token_ids(start_context) % cfg.vocab_size  # (1, T); a toy vocab gets the ids folded in
    if temperature > 0:
        key = jax.random.PRNGKey(0) if key is None else key
        token_ids = generate(
            params, cfg, encoded, max_new_tokens, temperature=temperature, top_k=top_k, key=key
        )
    else:
        token_ids = generate(params, cfg, encoded, max_new_tokens)
    return token_ids_to_text(token_ids).replace("\n", " ")  # compact print format, as in the book


def generate_and_print_sample(
    params: Params, cfg: GPTConfig, start_context: str, max_new_tokens: int = 50
) -> None:
    print(generate_sample(params, cfg, start_context, max_new_tokens))


def epoch_sample(params: Params, cfg: GPTConfig, tcfg: TrainConfig, epoch: int) -> str:
    """The sample printed after epoch ``epoch``, as ``tcfg`` asks for it ("" when sample_tokens is 0).

    A sampled one draws with ``fold_in(PRNGKey(seed), epoch)``: a resumed run prints the same text.
    """
    if not tcfg.sample_tokens:
        return ""
    key = jax.random.fold_in(jax.random.PRNGKey(tcfg.seed), epoch)
    return generate_sample(
        params,
        cfg,
        tcfg.start_context,
        tcfg.sample_tokens,
        temperature=tcfg.sample_temperature,
        top_k=tcfg.sample_top_k,
        key=key,
    )


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or parameter; that state is not saved."""


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


@jax.jit
def _params_finite(params: Params) -> Array:
    return jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))


class _Metrics:
    """The metrics of the last step dispatched, read one step late (so the host never waits for
    the device) and checked to be finite before anyone sees them."""

    def __init__(self, hooks: Hooks, pos: Position) -> None:
        self.hooks, self.pos, self.pending = hooks, pos, None

    def push(self, step: int, metrics: dict[str, Array]) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        values = {k: float(v) for k, v in metrics.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise _non_finite(step, "training metrics", f": {values}")
        self.hooks.on_step(step, values, self.pos)


def _non_finite(step: int, what: str, detail: str = "") -> NonFiniteLossError:
    return NonFiniteLossError(
        f"non-finite {what} at step {step}{detail}. Training stopped; the state after this step was not "
        "saved, so the last checkpoint is the last good one. Try a lower learning rate, warmup "
        "(--warmup-steps) or gradient clipping (--grad-clip)."
    )


def _on_mesh(
    state: TrainState, tx: optax.GradientTransformation, cfg: GPTConfig, tcfg: TrainConfig, mesh: Any
) -> tuple[TrainState, Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]]:
    """The state placed on ``mesh`` and the same train step jitted with the mesh's shardings."""
    if tcfg.grad_accum > 1 and jax.process_count() > 1:  # epoch_batches stacks on the host
        raise ValueError(
            "grad_accum > 1 is not supported with several processes yet; use a larger mesh batch"
        )
    state = sharding.shard_state(state, mesh)
    step = functools.partial(train_step, cfg=cfg, tx=tx)
    shardings = sharding.state_shardings(state, mesh)
    return state, sharding.shard_train_step(step, mesh, shardings, accumulate=tcfg.grad_accum > 1)


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
    steps, or earlier when ``hooks.should_stop`` says so; a run already at its last step does
    nothing. Returns the final state, position and the evaluation records ``{"step", "epoch"
    (fractional), "tokens_seen", "train_loss", "val_loss", "lr"}``. Every state handed to
    ``hooks.save`` has finite params; a non-finite loss, gradient or parameter raises
    NonFiniteLossError. The caller's ``state`` is donated: use only the returned one.

    With a ``mesh`` (``jaxgpt.sharding.make_mesh``) the same step runs sharded over its devices:
    state by the sharding rules, batches split over data x fsdp (see ``jaxgpt/sharding.py``).
    """
    pos = dataclasses.replace(pos) if pos is not None else Position()
    hooks = hooks if hooks is not None else Hooks()
    total_steps = total_train_steps(train_loader, tcfg)
    batches_per_epoch = steps_per_epoch(train_loader, tcfg) * tcfg.grad_accum
    if batches_per_epoch == 0:
        raise ValueError(
            f"the training split has {len(train_loader)} batches, fewer than grad_accum={tcfg.grad_accum}"
        )
    step = int(state.step)
    if step >= total_steps:
        return state, pos, []
    schedule = make_schedule(tcfg, total_steps)
    step_fn = jit_train_step(cfg, tx)
    if mesh is not None:  # scale-out: the same train_step, jitted with the mesh's shardings
        state, step_fn = _on_mesh(state, tx, cfg, tcfg, mesh)
        train_loader, val_loader = (
            sharding.MeshLoader(train_loader, mesh),
            sharding.MeshLoader(val_loader, mesh),
        )
    metrics, records = _Metrics(hooks, pos), []

    def evaluate_now() -> None:
        train_l, val_l = evaluate_model(state.params, cfg, train_loader, val_loader, tcfg.eval_iter)
        epoch = pos.epoch + pos.batch / batches_per_epoch  # fractional, from 0
        record = {"step": step, "epoch": epoch, "tokens_seen": pos.tokens_seen}
        records.append({**record, "train_loss": train_l, "val_loss": val_l, "lr": float(schedule(step - 1))})
        hooks.on_eval(records[-1])

    def save(final: bool) -> None:
        metrics.flush()  # never save a state whose step was not finite
        if not bool(_params_finite(state.params)):
            raise _non_finite(step, "parameters")
        hooks.save(state, pos, final)

    hooks.on_start(state, pos, total_steps)
    stopped = False
    while step < total_steps and not stopped:
        for inputs, targets in epoch_batches(train_loader, tcfg, pos.epoch, pos.batch):
            state, step_metrics = step_fn(state, (jnp.asarray(inputs), jnp.asarray(targets)))
            step += 1
            pos.batch += tcfg.grad_accum
            pos.tokens_seen += int(inputs.size)
            metrics.push(step, step_metrics)  # reads the previous step's, ready by now
            if (step - 1) % tcfg.eval_freq == 0:  # as the book: after the first step, then every eval_freq
                evaluate_now()
            if hooks.should_save(step):
                save(final=False)
            stopped = step < total_steps and hooks.should_stop(step)
            if step >= total_steps or stopped:
                break
        if pos.batch >= batches_per_epoch or (step >= total_steps and not stopped):
            metrics.flush()  # the book prints a sample after each epoch; max_steps ends with one too
            hooks.on_epoch_end(pos.epoch, epoch_sample(state.params, cfg, tcfg, pos.epoch))
        if pos.batch >= batches_per_epoch:
            pos.epoch, pos.batch = pos.epoch + 1, 0

    metrics.flush()
    if not stopped and (not records or records[-1]["step"] != step):  # the last step's evaluation
        evaluate_now()
    save(final=True)
    return state, pos, records
