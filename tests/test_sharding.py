"""The train step on a mesh: same losses as one device, params really sharded, checkpoints that
move between meshes, and two real processes joined by ``jax.distributed``.

JAX fixes its device count when it starts, and this suite runs with one CPU device, so the
multi-device runs happen in subprocesses (``tests/sharding_worker.py``) that set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before importing JAX.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt import sharding

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("sharding_worker.py")
TOL = 1e-5  # float32 sums in another order: losses agree to a few ulps, not bit for bit


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs: list[subprocess.Popen]) -> None:
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            assert p.returncode == 0, f"worker {p.args[2:]} failed:\n{stdout}\n{stderr[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """All subprocesses at once (compiling is mostly single-threaded, so they share the cores).

    One 8-device process tries the meshes; two 2-device processes joined by jax.distributed
    on localhost train on a data=2,fsdp=2 mesh that spans both.
    """
    tmp = tmp_path_factory.mktemp("sharding")
    port = _free_port()

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = [start("meshes", str(tmp / "meshes.json"), str(tmp))]
    procs += [start("dist", str(tmp / f"p{i}.json"), str(port), str(i), "2") for i in range(2)]
    _wait(procs)
    return {
        "meshes": json.loads((tmp / "meshes.json").read_text()),
        "dist": [json.loads((tmp / f"p{i}.json").read_text()) for i in range(2)],
        "ckpt_dir": str(tmp),
    }


@pytest.fixture(scope="module")
def meshes(runs) -> dict:
    return runs["meshes"]


@pytest.mark.parametrize("spec", ["data=8", "fsdp=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2"])
def test_mesh_training_matches_one_device(meshes, spec):
    assert meshes["n_devices"] == 8
    single, sharded = np.array(meshes["single"]), np.array(meshes["losses"][spec])
    diff = np.max(np.abs(single - sharded))
    assert diff < TOL, f"{spec}: losses {sharded} vs one device {single} (max diff {diff:.2e})"
    # Params after STEPS=2 AdamW steps at lr 1e-2 (tests/sharding_worker.py). Adam divides by
    # sqrt(v) + eps, so for a unit whose gradient is near zero (a quiet GELU unit) a few-ulp change
    # in the summed gradient moves its weights by a visible fraction of lr; 2% of the largest
    # possible movement (lr * steps) still catches any real error, which moves params by ~lr.
    bound = 0.02 * 1e-2 * 2
    assert meshes["param_diff"][spec] < bound, f"{spec}: params differ by {meshes['param_diff'][spec]:.2e}"


# Each device's shard of a few leaves (emb_dim 32, 4 heads, n_layers 2, vocab 96, MLP 128): fsdp
# splits emb_dim, tensor splits vocabulary, heads' width and MLP width; LayerNorm vectors stay whole.
SHARD_SHAPES = {
    "fsdp=8": {
        "tok_emb": [96, 4],
        "W_query": [2, 4, 32],
        "ff_in": [2, 4, 128],
        "ff_out": [2, 128, 4],
        "mu_ff_in": [2, 4, 128],  # AdamW's first moment follows its param
        "norm1_scale": [2, 32],
    },
    "data=2,fsdp=4": {"ff_in": [2, 8, 128]},
    "data=8": {"ff_in": [2, 32, 128]},  # pure data parallelism: replicated
    "data=2,fsdp=2,tensor=2": {
        "tok_emb": [48, 16],
        "W_query": [2, 16, 16],
        "ff_in": [2, 16, 64],
        "ff_out": [2, 64, 16],
        "mu_ff_in": [2, 16, 64],
        "norm1_scale": [2, 32],
    },
}


@pytest.mark.parametrize("spec", sorted(SHARD_SHAPES))
def test_params_and_optimizer_state_are_really_sharded(meshes, spec):
    got = meshes["shard_shapes"][spec]
    for leaf, shape in SHARD_SHAPES[spec].items():
        assert got[leaf] == [shape] * 8, f"{spec} {leaf}: shards {got[leaf]}, expected 8 x {shape}"


def test_checkpoint_restores_onto_another_mesh_and_one_device(meshes):
    other, single = meshes["restored"]["data=2,fsdp=4"], meshes["restored"]["one_device"]
    assert other["max_abs_diff"] == 0.0 and single["max_abs_diff"] == 0.0
    assert other["ff_in_shards"] == [[2, 8, 128]] * 8 and other["devices"] == list(range(8))
    assert single["ff_in_shards"] == [[2, 32, 128]] and single["devices"] == [0]


def test_checkpoint_of_a_sharded_run_loads_on_one_device_for_generation(runs):
    from jaxgpt.checkpoint import load_checkpoint

    cfg, params = load_checkpoint(runs["ckpt_dir"])  # what scripts/generate.py does, one device here
    assert cfg.emb_dim == 32 and cfg.n_layers == 2
    saved = np.load(Path(runs["ckpt_dir"]) / "saved_params.npz")
    loaded = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    assert sorted(loaded) == sorted(saved.files)
    for name in saved.files:
        np.testing.assert_array_equal(loaded[name], saved[name], err_msg=name)


def test_two_processes_with_jax_distributed_match_one_device(runs):
    single = np.array(runs["meshes"]["single"])
    for r in runs["dist"]:
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 4, 2)
        diff = np.max(np.abs(np.array(r["losses"]) - single))
        assert diff < TOL, f"process {r['process_index']}: {r['losses']} vs one device {single.tolist()}"
        assert r["ff_in_shards"] == [[2, 16, 128]] * 2  # fsdp=2 halves emb_dim on each local device


# ---- in-process, one device: the pieces that need no mesh of many devices ----


def test_mesh_spec_parsing_and_errors():
    assert sharding.parse_mesh_spec(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert sharding.parse_mesh_spec("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.parse_mesh_spec("fsdp=-1,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert sharding.parse_mesh_spec({"fsdp": 8}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="has 6 devices but JAX sees 8"):
        sharding.parse_mesh_spec("data=2,fsdp=3", 8)
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        sharding.parse_mesh_spec("model=8", 8)
    with pytest.raises(ValueError, match="must be an integer"):
        sharding.parse_mesh_spec("data=two", 8)
    with pytest.raises(ValueError, match="axis=size"):
        sharding.parse_mesh_spec("data", 8)


def test_one_device_mesh_keeps_every_array_whole():
    from jaxgpt import get_config, init_params

    cfg = get_config("quickstart", vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=2)
    params = init_params(cfg, jax.random.key(0))
    mesh = sharding.make_mesh(None)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    specs = jax.tree_util.tree_leaves(
        sharding.state_specs(params, mesh), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    assert all(spec == jax.sharding.PartitionSpec() for spec in specs)


def test_logical_axes_follow_the_book_names():
    assert sharding.logical_axes(("params", "trf_blocks", "ff", "layers_0", "kernel"), 3) == (
        "layers",
        "embed",
        "mlp",
    )
    assert sharding.logical_axes(("mu", "tok_emb", "embedding"), 2) == ("vocab", "embed")
    assert sharding.logical_axes(("final_norm", "scale"), 1) == ("norm",)
    assert sharding.logical_axes(("count",), 0) is None  # optimizer counters: replicated
    assert sharding.logical_axes(("trf_blocks", "att", "W_query", "kernel"), 2) is None  # rank mismatch
