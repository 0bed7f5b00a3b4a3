"""Training core: the loss falls, accumulation equals a big batch, schedules, evaluation, NaN stop."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.data import DataLoader, sliding_windows
from jaxgpt.loss import calc_loss_batch, calc_loss_loader, cross_entropy, dropout_rng
from jaxgpt.model import GPTModel
from jaxgpt.train import (
    Hooks,
    NonFiniteLossError,
    TrainConfig,
    TrainConfigError,
    create_train_state,
    epoch_batches,
    evaluate,
    jit_train_step,
    make_schedule,
    steps_per_epoch,
    total_train_steps,
    train,
    train_step,
)

V = 32
TINY = GPTConfig(vocab_size=V, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)


def cycle_loaders(batch_size: int, T: int = 8) -> tuple[DataLoader, DataLoader]:
    """A 24-token random cycle repeated: learnable, so a working trainer drives its loss down."""
    cycle = np.random.default_rng(0).integers(0, V, 24)
    ids = np.tile(cycle, 50)  # 1200 tokens
    train_x, train_y = sliding_windows(ids[:1000], T, T)
    val_x, val_y = sliding_windows(ids[1000:], T, T)
    return (
        DataLoader(train_x, train_y, batch_size, seed=1),
        DataLoader(val_x, val_y, batch_size, shuffle=False, drop_last=False),
    )


class Recorder(Hooks):
    def __init__(self, save_every: int = 0) -> None:
        self.steps, self.evals, self.samples, self.saved = [], [], [], []
        self.save_every = save_every

    def on_step(self, step, metrics, pos):
        self.steps.append((step, metrics["loss"]))

    def on_eval(self, record):
        self.evals.append(record)

    def on_epoch_end(self, epoch, sample):
        self.samples.append((epoch, sample))

    def should_save(self, step):
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, state, pos, final):
        self.saved.append(
            (int(state.step), final, bool(all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))))
        )


def test_tiny_model_learns_and_the_loop_keeps_its_books():
    train_loader, val_loader = cycle_loaders(batch_size=4)  # 125 windows -> 31 batches per epoch
    tcfg = TrainConfig(
        learning_rate=1e-2, batch_size=4, max_steps=40, eval_freq=10, eval_iter=3, sample_tokens=2
    )
    cfg = TINY.replace(drop_rate=0.1)
    state, tx = create_train_state(cfg, tcfg, jax.random.PRNGKey(0), total_train_steps(train_loader, tcfg))
    hooks = Recorder()
    state, pos, records = train(state, tx, cfg, tcfg, train_loader, val_loader, hooks=hooks)

    # An untrained model predicts ~uniformly: loss ln(V). The cycle is learnable: far below it after 40 steps.
    assert records[0]["val_loss"] == pytest.approx(math.log(V), abs=0.15)
    assert records[-1]["val_loss"] < 0.5 * math.log(V), records
    assert records[-1]["train_loss"] < 0.5 * math.log(V), records
    # Evaluations after step 1 and every eval_freq steps (the book's cadence), plus the last step.
    assert [r["step"] for r in records] == [1, 11, 21, 31, 40]
    assert [r["tokens_seen"] for r in records] == [s * 4 * 8 for s in (1, 11, 21, 31, 40)]
    assert hooks.evals == records
    assert [s for s, _ in hooks.steps] == list(range(1, 41))  # every step's metrics, read in order
    # 31 steps per epoch: one full epoch (with its sample), then 9 steps into the second and a last sample.
    assert [e for e, _ in hooks.samples] == [0, 1]
    assert (pos.epoch, pos.batch, pos.tokens_seen) == (1, 9, 40 * 32)
    assert int(state.step) == 40
    assert hooks.saved == [(40, True, True)]

    # Dropout is on in the step, and its key is fold_in(rng, step): the same step repeats exactly,
    # the next one draws a fresh mask (jit_train_step is cached: this is the step train() ran).
    step = jit_train_step(cfg, tx)
    x = jnp.asarray(np.random.default_rng(4).integers(0, V, (4, 8)))
    copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731
    _, m0 = step(copy(state), (x, x))
    _, m0_again = step(copy(state), (x, x))
    _, m1 = step(copy(state).replace(step=state.step + 1), (x, x))
    assert float(m0["loss"]) == float(m0_again["loss"])
    assert float(m0["loss"]) != float(m1["loss"])


def test_grad_accumulation_equals_one_big_batch():
    tx = optax.sgd(1.0)  # the update is the gradient itself, so params compare gradients
    tcfg = TrainConfig()
    state, _ = create_train_state(TINY, tcfg, jax.random.PRNGKey(1), 10)
    state = state.replace(opt_state=tx.init(state.params))
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, V, (2, 8, 8)), rng.integers(0, V, (2, 8, 8))  # (A, B, T)
    step = jax.jit(functools.partial(train_step, cfg=TINY, tx=tx))

    copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731
    accum, m_accum = step(copy(state), (jnp.asarray(x), jnp.asarray(y)))
    big, m_big = step(copy(state), (jnp.asarray(x.reshape(16, 8)), jnp.asarray(y.reshape(16, 8))))

    assert float(m_accum["loss"]) == pytest.approx(float(m_big["loss"]), rel=1e-5)
    assert float(m_accum["grad_norm"]) == pytest.approx(float(m_big["grad_norm"]), rel=1e-4)
    for (path, _), a, b in zip(
        jax.tree_util.tree_leaves_with_path(state.params),
        jax.tree.leaves(accum.params),
        jax.tree.leaves(big.params),
        strict=True,
    ):
        err = float(jnp.max(jnp.abs(a - b)))
        assert err < 1e-6, f"{jax.tree_util.keystr(path)}: accumulated vs big batch differ by {err}"


def test_train_step_differentiates_the_loss_it_is_given():
    # The plain way, full logits then cross-entropy with the same dropout keys, bound as loss_fn:
    # the same loss and the same SGD update as the default chunked train loss; twice it, twice
    # the loss.
    cfg = TINY.replace(drop_rate=0.5)

    def full_logits_loss(params, cfg, x, y, dropout_key):
        rngs = {"dropout": dropout_rng(dropout_key)}
        logits = GPTModel(cfg).apply({"params": params}, x, deterministic=False, rngs=rngs)
        return cross_entropy(logits, y)

    tx = optax.sgd(1.0)
    state, _ = create_train_state(cfg, TrainConfig(), jax.random.PRNGKey(3), 10)
    state = state.replace(opt_state=tx.init(state.params))
    rng = np.random.default_rng(4)
    batch = tuple(jnp.asarray(rng.integers(0, V, (4, 8))) for _ in range(2))
    copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731

    plain, m_plain = jit_train_step(cfg, tx, full_logits_loss)(copy(state), batch)
    default, m_default = jit_train_step(cfg, tx)(copy(state), batch)

    assert float(m_plain["loss"]) == pytest.approx(float(m_default["loss"]), rel=1e-6)
    assert float(m_plain["loss"]) != pytest.approx(float(calc_loss_batch(state.params, cfg, *batch)))
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(default.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    doubled = lambda *args: 2 * full_logits_loss(*args)  # noqa: E731
    _, m_doubled = jit_train_step(cfg, tx, doubled)(copy(state), batch)
    assert float(m_doubled["loss"]) == pytest.approx(2 * float(m_plain["loss"]), rel=1e-6)


def test_accumulation_groups_consecutive_batches_of_an_epoch():
    train_loader, _ = cycle_loaders(batch_size=4)  # 31 batches -> 15 groups of 2, the last batch left out
    tcfg = TrainConfig(batch_size=4, grad_accum=2)
    groups = list(epoch_batches(train_loader, tcfg, epoch=1, start=4))  # resume at microbatch 4
    plain = list(train_loader.iter_epoch(1))
    assert steps_per_epoch(train_loader, tcfg) == 15 and len(groups) == 13
    for i, (x, y) in enumerate(groups):
        assert x.shape == y.shape == (2, 4, 8)
        for j in range(2):
            np.testing.assert_array_equal(x[j], plain[4 + 2 * i + j][0])
            np.testing.assert_array_equal(y[j], plain[4 + 2 * i + j][1])


def test_schedule_warmup_then_cosine_to_min_lr():
    tcfg = TrainConfig(learning_rate=1e-3, warmup_steps=10, min_lr=1e-4)
    lr = make_schedule(tcfg, total_steps=110)
    # Appendix D: linear 0 -> peak over the warmup, then peak -> min along half a cosine.
    expected = {0: 0.0, 5: 5e-4, 10: 1e-3, 60: 1e-4 + 0.5 * (1e-3 - 1e-4), 110: 1e-4}
    for step, want in expected.items():
        assert float(lr(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step
    constant = make_schedule(TrainConfig(learning_rate=4e-4), total_steps=50)
    assert [float(constant(s)) for s in (0, 25, 50)] == pytest.approx([4e-4] * 3)


def test_evaluate_matches_the_books_calc_loss_loader():
    _, val_loader = cycle_loaders(batch_size=4)
    state, _ = create_train_state(TINY, TrainConfig(), jax.random.PRNGKey(5), 10)
    got = evaluate(state.params, TINY, val_loader, eval_iter=3)
    want = calc_loss_loader(state.params, TINY, val_loader, num_batches=3)
    assert got == pytest.approx(want, rel=1e-6)


def test_non_finite_loss_stops_before_saving_the_bad_state():
    train_loader, val_loader = cycle_loaders(batch_size=4)
    tcfg = TrainConfig(learning_rate=1e30, batch_size=4, max_steps=20, eval_freq=100, sample_tokens=0)
    state, tx = create_train_state(TINY, tcfg, jax.random.PRNGKey(0), 20)
    hooks = Recorder(save_every=1)
    with pytest.raises(NonFiniteLossError, match="non-finite training metrics at step"):
        train(state, tx, TINY, tcfg, train_loader, val_loader, hooks=hooks)
    assert hooks.saved, "the first step (finite loss) should have been saved"
    assert all(finite for _, _, finite in hooks.saved), hooks.saved
    assert not any(final for _, final, _ in hooks.saved)


def test_non_finite_params_are_never_saved_even_when_the_loss_was_finite():
    # An infinite learning rate: step 1's loss and gradient are finite (computed before the
    # update), its params are not. Checked before the save, so nothing is saved.
    train_loader, val_loader = cycle_loaders(batch_size=4)
    tcfg = TrainConfig(batch_size=4, max_steps=5, eval_freq=100, sample_tokens=0)
    state, _ = create_train_state(TINY, tcfg, jax.random.PRNGKey(0), 5)
    tx = optax.sgd(float("inf"))
    state = state.replace(opt_state=tx.init(state.params))
    hooks = Recorder(save_every=1)
    with pytest.raises(NonFiniteLossError, match="non-finite parameters at step 1"):
        train(state, tx, TINY, tcfg, train_loader, val_loader, hooks=hooks)
    assert hooks.saved == []
    assert [s for s, _ in hooks.steps] == [1] and math.isfinite(hooks.steps[0][1])


def test_a_finished_run_does_nothing():
    train_loader, val_loader = cycle_loaders(batch_size=4)
    tcfg = TrainConfig(batch_size=4, max_steps=3, sample_tokens=2)
    state, tx = create_train_state(TINY, tcfg, jax.random.PRNGKey(0), 3)
    hooks = Recorder(save_every=1)
    state, pos, records = train(state.replace(step=state.step + 3), tx, TINY, tcfg, train_loader, val_loader,
                                hooks=hooks)  # fmt: skip
    assert (records, hooks.steps, hooks.evals, hooks.samples, hooks.saved) == ([], [], [], [], [])
    assert int(state.step) == 3


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", 0),
        ("learning_rate", math.inf),
        ("learning_rate", math.nan),
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("grad_accum", -1),
        ("train_ratio", 1.0),
        ("min_lr", 1.0),
        ("grad_clip", math.inf),
        ("weight_decay", math.nan),
        ("sample_temperature", -1.0),
        ("sample_top_k", 0),
    ],
)
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(TrainConfigError, match=f"TrainConfig.{field} ") as info:
        TrainConfig(**{field: value})
    assert info.value.field == field
