"""Runs in a subprocess for tests/test_sharding.py, with JAX seeing several simulated CPU devices.

The device count must be fixed before JAX starts, and the rest of the suite runs with one
device in-process, so every multi-device check lives here. Usage:

    python tests/sharding_worker.py meshes OUT.json CKPT_DIR
    python tests/sharding_worker.py dist OUT.json PORT PROCESS_ID NUM_PROCESSES

Writes one JSON file with what it measured; the test decides what is right.
"""

from __future__ import annotations

import json
import os
import sys

DEVICES_PER_PROCESS = {"meshes": 8, "dist": 2}
# Backend optimisation off: compiling, not running, is the cost of these tiny steps (it halves
# it); every comparison is between runs under the same flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={DEVICES_PER_PROCESS[sys.argv[1]]}"
    + " --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

from jaxgpt import sharding  # noqa: E402
from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.train import TrainConfig, create_train_state, jit_train_step, train_step  # noqa: E402

CFG = GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)
TCFG = TrainConfig(batch_size=16, learning_rate=1e-2, grad_clip=1.0, seed=7)
STEPS = 2
MESHES = ["data=8", "fsdp=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2"]


def global_batches() -> list[tuple[np.ndarray, np.ndarray]]:
    """The same STEPS global batches (B=16, T=16) in every process and every mesh."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, size=(STEPS, TCFG.batch_size, CFG.context_length + 1))
    return [(t[:, :-1].astype(np.int32), t[:, 1:].astype(np.int32)) for t in tokens]


def new_state():
    return create_train_state(CFG, TCFG, jax.random.key_data(jax.random.key(TCFG.seed)), total_steps=STEPS)


@functools.cache
def _reference_state():
    """The one-device starting state and its optimizer, built once (each create_train_state
    compiles the model's init afresh). Never handed out itself: the steps donate their state."""
    return new_state()


def reference_state():
    """A fresh one-device copy of the starting state (the steps donate theirs) and the optimizer."""
    state, tx = _reference_state()
    return jax.tree_util.tree_map(jax.numpy.copy, state), tx


def run_single() -> tuple[list[float], object]:
    state, tx = reference_state()
    step = jit_train_step(CFG, tx)
    losses = []
    for x, y in global_batches():
        state, metrics = step(state, (jax.numpy.asarray(x), jax.numpy.asarray(y)))
        losses.append(float(metrics["loss"]))
    return losses, state


def run_mesh(
    spec: str, process_index: int = 0, process_count: int = 1, sharded_init: bool = True
) -> tuple[list[float], object, object]:
    mesh = sharding.make_mesh(spec)
    if sharded_init:  # each device creates only its shards
        _, tx = reference_state()
        state, shardings = sharding.init_sharded(lambda: new_state()[0], mesh)
    else:  # an existing one-device state moved onto the mesh (one compile less)
        state, tx = reference_state()
        state = sharding.shard_state(state, mesh)
        shardings = sharding.state_shardings(state, mesh)
    step = sharding.shard_train_step(functools.partial(train_step, cfg=CFG, tx=tx), mesh, shardings)
    local = TCFG.batch_size // process_count
    losses = []
    for x, y in global_batches():
        rows = slice(process_index * local, (process_index + 1) * local)  # this process's rows
        state, metrics = step(state, sharding.shard_batch((x[rows], y[rows]), mesh))
        losses.append(float(metrics["loss"]))
    return losses, state, shardings


def shard_shapes(state) -> dict[str, list[list[int]]]:
    p = state.params
    leaves = {
        "tok_emb": p["tok_emb"]["embedding"],
        "W_query": p["trf_blocks"]["att"]["W_query"]["kernel"],
        "ff_in": p["trf_blocks"]["ff"]["layers_0"]["kernel"],
        "ff_out": p["trf_blocks"]["ff"]["layers_2"]["kernel"],
        "mu_ff_in": state.opt_state[1][0].mu["trf_blocks"]["ff"]["layers_0"]["kernel"],
        "norm1_scale": p["trf_blocks"]["norm1"]["scale"],
    }
    return {k: [list(s.data.shape) for s in v.addressable_shards] for k, v in leaves.items()}


def max_abs_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(
        lambda u, v: float(
            np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)), initial=0.0)
        ),
        a,
        b,
    )
    return max(jax.tree_util.tree_leaves(diffs))


def meshes(out_path: str, ckpt_dir: str) -> None:
    out: dict[str, object] = {"n_devices": jax.device_count()}
    single_losses, single_state = run_single()
    out["single"] = single_losses
    out["losses"], out["param_diff"], out["shard_shapes"] = {}, {}, {}
    states = {}
    for spec in MESHES:
        losses, state, _ = run_mesh(spec, sharded_init=spec == "fsdp=8")
        out["losses"][spec] = losses
        out["param_diff"][spec] = max_abs_diff(single_state.params, state.params)
        out["shard_shapes"][spec] = shard_shapes(state)
        states[spec] = state

    # Save on fsdp=8 with the trainer's checkpoints (orbax), restore onto data=2,fsdp=4 and onto
    # one device with target shardings; the test process (one device) loads it once more.
    from jaxgpt.checkpoint import CheckpointManager, restore_checkpoint, save_checkpoint
    from jaxgpt.train import Position

    saved = states["fsdp=8"]
    mngr = CheckpointManager(ckpt_dir, keep=1)
    save_checkpoint(mngr, saved, CFG, TCFG, Position(epoch=0, batch=STEPS), total_steps=STEPS)
    np.savez(
        os.path.join(ckpt_dir, "saved_params.npz"),
        **{
            jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(saved.params)
        },
    )
    restored = {}
    for name, mesh in [
        ("data=2,fsdp=4", sharding.make_mesh("data=2,fsdp=4")),
        ("one_device", sharding.make_mesh("data=1", devices=jax.devices()[:1])),
    ]:
        state = restore_checkpoint(mngr, mesh=mesh)[0]
        restored[name] = {
            "max_abs_diff": max_abs_diff(saved, state),
            "devices": sorted({d.id for leaf in jax.tree_util.tree_leaves(state) for d in leaf.devices()}),
            "ff_in_shards": [
                list(s.data.shape)
                for s in state.params["trf_blocks"]["ff"]["layers_0"]["kernel"].addressable_shards
            ],
        }
    out["restored"] = restored
    with open(out_path, "w") as f:
        json.dump(out, f)


def dist(out_path: str, port: str, process_id: str, num_processes: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=int(num_processes), process_id=int(process_id)
    )
    spec = "data=2,fsdp=2"
    losses, state, _ = run_mesh(spec, jax.process_index(), jax.process_count())
    out = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "losses": losses,
        "ff_in_shards": [
            list(s.data.shape)
            for s in state.params["trf_blocks"]["ff"]["layers_0"]["kernel"].addressable_shards
        ],
    }
    with open(out_path, "w") as f:
        json.dump(out, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    {"meshes": meshes, "dist": dist}[sys.argv[1]](*sys.argv[2:])
