"""Checkpoints: resume is bit-identical, load_checkpoint round trip, keep-last-k, atomic, corrupt ones."""

import logging
import math
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgpt.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from jaxgpt.config import GPTConfig
from jaxgpt.data import DataLoader, sliding_windows
from jaxgpt.train import Hooks, Position, TrainConfig, create_train_state, total_train_steps, train

V = 32
CFG = GPTConfig(vocab_size=V, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.1)
# Warmup + cosine + clipping: the optimizer state and schedule position must survive the resume too.
TCFG = TrainConfig(
    learning_rate=5e-3,
    warmup_steps=3,
    min_lr=1e-4,
    grad_clip=1.0,
    batch_size=4,
    max_steps=12,
    eval_freq=5,
    eval_iter=2,
    sample_tokens=0,
)


def loaders() -> tuple[DataLoader, DataLoader]:
    ids = np.random.default_rng(0).integers(0, V, 500)
    train_x, train_y = sliding_windows(ids[:400], 8, 8)  # 49 windows -> 12 batches: an epoch is 12 steps
    val_x, val_y = sliding_windows(ids[400:], 8, 8)
    return DataLoader(train_x, train_y, 4, seed=7), DataLoader(
        val_x, val_y, 4, shuffle=False, drop_last=False
    )


class Saver(Hooks):
    """Saves through a CheckpointManager like the CLI; optionally asks to stop after a step."""

    def __init__(self, mngr, stop_at=None, total=12):
        self.mngr, self.stop_at, self.total = mngr, stop_at, total

    def should_save(self, step):
        return step % 4 == 0

    def save(self, state, pos, final):
        save_checkpoint(self.mngr, state, CFG, TCFG, pos, self.total)

    def should_stop(self, step):
        return step == self.stop_at


def leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One full 12-step run with checkpoints at 4, 8, 12 (the last two kept)."""
    run_dir = tmp_path_factory.mktemp("full")
    train_loader, val_loader = loaders()
    total = total_train_steps(train_loader, TCFG)
    state, tx = create_train_state(CFG, TCFG, jax.random.PRNGKey(TCFG.seed), total)
    mngr = CheckpointManager(run_dir, keep=2)
    state, pos, _ = train(state, tx, CFG, TCFG, train_loader, val_loader, hooks=Saver(mngr, total=total))
    return run_dir, jax.device_get(state), pos


def test_interrupted_and_resumed_run_ends_bit_identical(uninterrupted, tmp_path):
    _, full_state, full_pos = uninterrupted
    train_loader, val_loader = loaders()
    state, tx = create_train_state(CFG, TCFG, jax.random.PRNGKey(TCFG.seed), 12)
    mngr = CheckpointManager(tmp_path, keep=2)
    state, pos, _ = train(state, tx, CFG, TCFG, train_loader, val_loader, hooks=Saver(mngr, stop_at=6))
    assert int(state.step) == 6 and mngr.all_steps() == [4, 6]  # stopped mid-epoch, saved on the way out
    del state

    # A fresh manager and process-like restore: configs, optimizer state, rng and data position from disk.
    mngr = CheckpointManager(tmp_path, keep=2)
    state, tx, cfg, tcfg, pos, _ = restore_checkpoint(mngr)
    assert (cfg, tcfg, int(state.step), pos.batch) == (CFG, TCFG, 6, 6)
    state, pos, _ = train(state, tx, cfg, tcfg, train_loader, val_loader, pos, hooks=Saver(mngr))

    assert leaves_equal(state.params, full_state.params), "resumed params differ from the uninterrupted run"
    assert leaves_equal(state.opt_state, full_state.opt_state)
    assert pos == full_pos


def test_load_checkpoint_from_run_dir_and_step_dir(uninterrupted):
    run_dir, full_state, _ = uninterrupted
    cfg, params = load_checkpoint(run_dir)  # latest step
    assert cfg == CFG
    assert leaves_equal(params, full_state.params)
    assert jax.tree.structure(params) == jax.tree.structure(full_state.params)
    cfg8, params8 = load_checkpoint(run_dir / "checkpoints" / "8")
    assert cfg8 == CFG and not leaves_equal(params8, full_state.params)


def test_keeps_only_the_last_k(uninterrupted):
    run_dir, _, _ = uninterrupted
    assert CheckpointManager(run_dir).all_steps() == [8, 12]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["12", "8"]


def test_a_half_written_step_is_never_listed(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    # What a crash in the middle of saving step 16 leaves: orbax's temporary directory, not yet renamed.
    partial = run_dir / "checkpoints" / "16.orbax-checkpoint-tmp-1234567"
    shutil.copytree(run_dir / "checkpoints" / "12", partial)
    assert CheckpointManager(run_dir).all_steps() == [8, 12]
    _, params = load_checkpoint(run_dir)
    assert leaves_equal(params, uninterrupted[1].params)


def test_a_corrupt_latest_checkpoint_is_a_clear_error_and_others_are_untouched(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    damaged = run_dir / "checkpoints" / "12" / "params"
    for f in damaged.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage")
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    with pytest.raises(CheckpointError, match=r"checkpoint step 12 .* could not be read.*steps \[8\]"):
        restore_checkpoint(CheckpointManager(run_dir, keep=2))
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(run_dir)
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    cfg, params = load_checkpoint(run_dir / "checkpoints" / "8")  # the earlier one still loads
    assert cfg == CFG and all(math.isfinite(float(np.abs(p).sum())) for p in jax.tree.leaves(params))


def test_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        restore_checkpoint(CheckpointManager(tmp_path))


def test_relative_run_directories_save_and_load(tmp_path, monkeypatch):
    """`python scripts/train.py` writes under the relative `runs/...`; orbax itself wants absolute paths."""
    monkeypatch.chdir(tmp_path)
    state, _ = create_train_state(CFG, TCFG, jax.random.PRNGKey(0), 12)
    mngr = CheckpointManager("runs/rel", keep=1)
    save_checkpoint(mngr, state, CFG, TCFG, Position(epoch=0, batch=0), 12)
    cfg, params = load_checkpoint("runs/rel")
    assert cfg == CFG and leaves_equal(params, state.params)
    cfg, params = load_checkpoint("runs/rel/checkpoints/0")
    assert leaves_equal(params, state.params)


def test_non_finite_params_are_refused_on_load(tmp_path):
    state, _ = create_train_state(CFG, TCFG, jax.random.PRNGKey(0), 12)
    nan_params = jax.tree.map(lambda p: p * np.nan, state.params)
    save_checkpoint(CheckpointManager(tmp_path), state.replace(params=nan_params), CFG, TCFG, Position(), 12)
    with pytest.raises(CheckpointError, match="holds non-finite"):
        load_checkpoint(tmp_path)


def test_importing_the_module_leaves_logging_alone():
    code = (
        "import logging; logging.getLogger('absl').setLevel(logging.DEBUG); import jaxgpt.checkpoint; "
        "print(logging.getLogger('absl').level)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(logging.DEBUG)
