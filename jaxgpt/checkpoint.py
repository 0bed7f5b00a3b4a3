"""Checkpoints of a training run with orbax: the train state, the configs and the data position.

A run directory holds ``checkpoints/<step>/`` with three items:

  params   the model parameters (all a user needs for generation, see :func:`load_checkpoint`)
  state    the optimizer state, the step and the dropout key
  meta     JSON: model config, train config, data position (epoch, batch, tokens seen), step

Orbax writes each step into a temporary directory and renames it when complete, so a crash in
the middle of a save leaves the earlier checkpoints as they were and no half-written step is
ever listed. Like nanoGPT, the model config travels with the weights, so loading needs nothing
but the path.

:func:`save_checkpoint` and :func:`restore_checkpoint` store and restore a whole
:class:`jaxgpt.train.TrainState` with its configs and data position; :func:`load_checkpoint`
reads only what generation needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxgpt import sharding
from jaxgpt.config import GPTConfig
from jaxgpt.model import Params
from jaxgpt.train import Position, TrainConfig, TrainState, create_train_state, make_optimizer

CHECKPOINT_SUBDIR = "checkpoints"
_ITEMS = ("params", "state", "meta")
FORMAT = "jaxgpt-train-1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the run asking for it."""


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax logs every save and restore through absl at INFO/WARNING: silence it while we call it."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _all_finite(tree: Any) -> bool:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


def _options(keep: int | None, read_only: bool) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=False,  # the loop waits for each save: simple, and SIGINT-safe
    )


def _is_step_dir(path: Path) -> bool:
    return path.name.isdigit() and (path / "meta").is_dir()


def resolve(path: str | Path) -> tuple[Path, int | None]:
    """(checkpoint root, step or None for the latest) from a run dir, its checkpoints dir or a step dir."""
    path = Path(path).absolute()  # orbax needs absolute paths
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if _is_step_dir(path):
        return path.parent, int(path.name)
    if (path / CHECKPOINT_SUBDIR).is_dir():
        return path / CHECKPOINT_SUBDIR, None
    return path, None


class CheckpointManager:
    """Saves and restores the checkpoints of one run directory (a thin layer over orbax's)."""

    def __init__(self, run_dir: str | Path, keep: int | None = None, read_only: bool = False) -> None:
        # orbax's tensorstore backend accepts absolute paths only (`runs/x` fails at the first save)
        self.root = Path(run_dir).absolute() / CHECKPOINT_SUBDIR
        with _quiet_orbax():
            self._mngr = ocp.CheckpointManager(
                self.root, options=_options(keep, read_only), item_names=_ITEMS
            )

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.root / str(step)

    def save(self, step: int, params: Params, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write step ``step`` atomically (waits until it is on disk); older steps beyond ``keep`` go.

        A step already on disk is left as it is (a run saves each step's state only once).
        """
        if step in self._mngr.all_steps():
            return self.step_dir(step)
        if jax.process_index() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        with _quiet_orbax():
            self._mngr.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave({"format": FORMAT, "step": step, **meta}),
                ),
                force=True,
            )
            self._mngr.wait_until_finished()
        return self.step_dir(step)

    def _pick(self, step: int | None) -> tuple[int, list[int]]:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.root}: it holds no completed step directory")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.root}; it has steps {steps}")
        return step, steps

    def _damaged(self, step: int, steps: list[int], e: Exception) -> CheckpointError:
        others = [s for s in steps if s != step]
        return CheckpointError(
            f"checkpoint step {step} in {self.root} could not be read ({type(e).__name__}: {e}). "
            f"Nothing was changed; the other checkpoints there are steps {others}. Move the "
            f"damaged directory {self.step_dir(step)} away to resume from an earlier one."
        )

    def read_meta(self, step: int | None = None) -> tuple[int, dict[str, Any]]:
        """-> (step, meta) of ``step`` (default: the latest), reading no arrays."""
        step, steps = self._pick(step)
        try:
            with _quiet_orbax():
                meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"its meta item is not a {FORMAT} record")
        except Exception as e:  # orbax raises many types for a damaged directory; name the step
            raise self._damaged(step, steps, e) from e
        return step, meta

    def restore(
        self,
        step: int | None = None,
        params_like: Params | None = None,
        state_like: dict[str, Any] | None = None,
    ) -> tuple[int, Params, dict[str, Any] | None, dict[str, Any]]:
        """-> (step, params, state or None, meta) of ``step`` (default: the latest).

        ``params_like``/``state_like`` give the tree structure to restore into; without
        ``state_like`` the optimizer state is not read at all.
        """
        step, meta = self.read_meta(step)
        steps = self.all_steps()
        if params_like is None:  # no target: each array whole on one device, whatever mesh saved it
            params_like = _whole_on_one_device(self.step_dir(step) / "params")
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(params_like)}
        if state_like is not None:
            items["state"] = ocp.args.StandardRestore(state_like)
        try:
            with _quiet_orbax():
                restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
            params = _like(restored["params"], params_like)
            state = _like(restored["state"], state_like) if state_like is not None else None
        except Exception as e:
            raise self._damaged(step, steps, e) from e
        return step, params, state, meta


def _whole_on_one_device(item_dir: Path) -> Any:
    """Shapes and dtypes of the arrays saved in ``item_dir``, each placed whole on this process's
    first device: a restore target for a checkpoint written by a sharded run on any mesh (orbax
    refuses to guess one when the saving devices are not all present)."""
    try:
        with _quiet_orbax():
            saved = ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree
    except Exception:  # unreadable metadata: let the restore itself report the damage
        return None
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)


def _like(tree: Any, like: Any) -> Any:
    """``tree`` in the structure of ``like`` (orbax returns optax's namedtuples as plain tuples)."""
    if like is None:
        return tree
    leaves, like_def = jax.tree.leaves(tree), jax.tree.structure(like)
    if len(leaves) != like_def.num_leaves:
        raise ValueError(f"the checkpoint has {len(leaves)} arrays where {like_def.num_leaves} were expected")
    for got, want in zip(leaves, jax.tree.leaves(like), strict=True):
        if np.shape(got) != np.shape(want):
            raise ValueError(
                f"an array of shape {np.shape(got)} was found where {np.shape(want)} was expected"
            )
    return jax.tree.unflatten(like_def, leaves)


def _lora_alpha(meta: Any) -> float | None:
    """The LoRA scale of a classifier run trained with adapters (``scripts/finetune_classifier.py
    --lora-rank``), else None."""
    settings = meta.get("settings") if isinstance(meta, dict) else None
    if not isinstance(settings, dict) or settings.get("lora_rank") is None:
        return None
    return float(settings["lora_alpha"])


def load_checkpoint(path: str | Path) -> tuple[GPTConfig, Params]:
    """(model config, params) from a run directory (its latest step) or one step directory.

    Needs no trainer and reads no optimizer state: ``cfg, params = load_checkpoint("runs/x")``,
    then ``jaxgpt.generate(params, cfg, ids, 50)``. A classifier run of
    ``scripts/finetune_classifier.py`` gives its params with the classification head
    (``jaxgpt.classifier_classes`` says how many classes); a LoRA run gives the adapted model, its
    adapters merged into the frozen weights (``jaxgpt.merge_lora``).
    """
    root, step = resolve(path)
    mngr = CheckpointManager.__new__(CheckpointManager)
    mngr.root = root
    try:
        with _quiet_orbax():
            mngr._mngr = ocp.CheckpointManager(root, options=_options(None, True), item_names=_ITEMS)
    except Exception as e:
        raise CheckpointError(f"{root} is not a checkpoint directory ({type(e).__name__}: {e})") from e
    step, meta = mngr.read_meta(step)
    lora_alpha = _lora_alpha(meta)
    # a LoRA run keeps its adapters beside the optimizer state: read that item too
    state_like = _whole_on_one_device(mngr.step_dir(step) / "state") if lora_alpha is not None else None
    step, params, state, meta = mngr.restore(step, state_like=state_like)
    try:
        cfg = GPTConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the model config saved in {root} is unusable: {e}") from e
    if lora_alpha is not None:  # a LoRA classifier run: the frozen weights, and the adapters in the state
        from jaxgpt.lora import merge_lora

        adapters = state.get("adapters") if isinstance(state, dict) else None
        if not adapters:
            raise CheckpointError(f"checkpoint step {step} in {root} is a LoRA run without its adapters")
        params = merge_lora(params, adapters, lora_alpha)
    if not _all_finite(params):
        raise CheckpointError(
            f"checkpoint step {step} in {root} holds non-finite (NaN or infinite) parameters"
        )
    return cfg, params


# --------------------------------------------------------------------------------------------
# The whole train state of a run
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
