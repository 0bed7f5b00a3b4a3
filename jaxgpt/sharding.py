"""Device meshes and sharding rules: the same train step on one device, a GPU box or a TPU pod.

Nothing here communicates by hand. We only say *where each array lives*, as a
``jax.sharding.NamedSharding`` over a mesh with named axes, and let XLA's SPMD partitioner
insert the all-gathers and reduce-scatters inside the jitted step.

Mesh axes (sizes multiply to the number of devices, every axis is always present):
  data     pure data parallelism: params replicated, batch split
  fsdp     fully-sharded data parallelism: batch split *and* params/optimizer state split
  tensor   tensor parallelism: attention heads, MLP width and vocabulary split; size 1 by default

Params get *logical* axis names from their path in the param tree (the book's module names,
so ``model.py`` needs no annotations), and one table of rules maps logical names to mesh axes:

  tok_emb/embedding                  (vocab, embed)
  pos_emb/embedding                  (context, embed)
  trf_blocks/att/W_query|W_key|W_value/kernel  (layers, embed, heads)     bias (layers, heads)
  trf_blocks/att/out_proj/kernel     (layers, heads, embed)               bias (layers, embed)
  trf_blocks/ff/layers_0/kernel      (layers, embed, mlp)                 bias (layers, mlp)
  trf_blocks/ff/layers_2/kernel      (layers, mlp, embed)                 bias (layers, embed)
  */scale, */shift (LayerNorms)      (layers,) + (norm,)
  out_head/kernel                    (embed, vocab)

``layers`` (the stacked axis of ``nn.scan``) is never sharded: every device runs every layer.
A dimension whose size the mesh axis does not divide stays replicated, so any model runs on any
mesh (only less sharded). Optimizer state (AdamW's ``mu``/``nu``) has the params' paths inside
its own tree, so the same rules shard it; scalars (step, count, rng) are replicated.

With one device every sharding is trivial and the jitted step is exactly today's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxgpt.xla import compiler_options

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over both

# Logical axis name -> mesh axis (or None: replicated). The first rule for a name wins.
RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("context", None),
    ("norm", None),
)

# (parent module, param name) -> logical axes of the param, without the stacked layer axis.
_PARAM_AXES: dict[tuple[str, str], tuple[str, ...]] = {
    ("tok_emb", "embedding"): ("vocab", "embed"),
    ("pos_emb", "embedding"): ("context", "embed"),
    ("out_head", "kernel"): ("embed", "vocab"),
    ("out_head", "bias"): ("vocab",),
    ("W_query", "kernel"): ("embed", "heads"),
    ("W_key", "kernel"): ("embed", "heads"),
    ("W_value", "kernel"): ("embed", "heads"),
    ("W_query", "bias"): ("heads",),
    ("W_key", "bias"): ("heads",),
    ("W_value", "bias"): ("heads",),
    ("out_proj", "kernel"): ("heads", "embed"),
    ("out_proj", "bias"): ("embed",),
    ("layers_0", "kernel"): ("embed", "mlp"),
    ("layers_0", "bias"): ("mlp",),
    ("layers_2", "kernel"): ("mlp", "embed"),
    ("layers_2", "bias"): ("embed",),
}
_STACKED = "trf_blocks"  # params under this module carry a leading n_layers axis


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------


def parse_mesh_spec(spec: str | Mapping[str, int] | None, n_devices: int) -> dict[str, int]:
    """Axis sizes from ``"data=2,fsdp=4"`` (or a dict); missing axes are 1, one axis may be -1.

    ``None`` or ``""`` puts every device on ``data``. A size of -1 takes whatever the other axes
    leave. Raises ValueError naming the problem when the product is not ``n_devices``.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {"data": n_devices, "fsdp": 1, "tensor": 1}
    if isinstance(spec, str):
        items: dict[str, int] = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name:
                raise ValueError(f"bad mesh spec {spec!r}: expected 'axis=size,...' like 'data=2,fsdp=4'")
            if name in items:
                raise ValueError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
            try:
                items[name] = int(value)
            except ValueError:
                raise ValueError(
                    f"bad mesh spec {spec!r}: size of {name!r} must be an integer, got {value!r}"
                ) from None
        spec = items
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {list(MESH_AXES)}")
    sizes = {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive (or -1 for 'the rest'), got {bad}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if n_devices % known:
            raise ValueError(f"mesh {spec}: {n_devices} devices cannot be split into parts of {known}")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        shown = ",".join(f"{a}={s}" for a, s in sizes.items())
        raise ValueError(
            f"mesh {shown} has {math.prod(sizes.values())} devices but JAX sees {n_devices}; "
            f"the axis sizes must multiply to {n_devices}"
        )
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all of them).

    ``spec`` is ``"data=2,fsdp=4"``, ``{"fsdp": 8}`` or None (every device on ``data``).
    With several processes, ``jax.devices()`` lists every process's devices, so the mesh is
    global; ``jax.make_mesh`` orders them for the interconnect (ICI rings on TPU).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: XLA's partitioner propagates shardings through the step (no explicit-sharding types).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def maybe_initialize_distributed() -> bool:
    """Join a multi-process job when the environment describes one; returns True if it did.

    Explicit variables win: ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. Otherwise a cluster JAX detects by itself (SLURM with several tasks,
    Cloud TPU pod slices, Open MPI's ``mpirun``) calls ``jax.distributed.initialize()`` with no
    arguments. A plain single-machine run does nothing. Must run before any other JAX call.
    """
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in env]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not; set all three")
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
        return True
    auto = (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or ("TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"])
        or "MEGASCALE_COORDINATOR_ADDRESS" in env
    )
    if auto:
        jax.distributed.initialize()
        return True
    return False


# ----------------------------------------------------------------------------------------------
# Rules: param path -> logical axes -> PartitionSpec
# ----------------------------------------------------------------------------------------------


def _path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """The string keys along a ``jax.tree_util`` key path (dict keys and attribute names)."""
    names = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            names.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            names.append(entry.name)
    return tuple(names)


def logical_axes(path: Sequence[Any] | Sequence[str], ndim: int) -> tuple[str, ...] | None:
    """Logical axis names of the param at ``path`` with ``ndim`` dims, or None if it is not one.

    ``path`` is a ``jax.tree_util`` key path or a tuple of names like
    ``("params", "trf_blocks", "att", "W_query", "kernel")``; only its end matters, so the same
    call works on the param tree, inside an optimizer state, or inside a whole train state.
    """
    names = tuple(path) if all(isinstance(p, str) for p in path) else _path_names(path)
    if len(names) < 2:
        return None
    parent, leaf = names[-2], names[-1]
    axes = _PARAM_AXES.get((parent, leaf))
    if axes is None and leaf in ("scale", "shift"):
        axes = ("norm",)
    if axes is None:
        return None
    if _STACKED in names:
        axes = ("layers",) + axes
    return axes if len(axes) == ndim else None


def spec_for(axes: Sequence[str] | None, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` with logical ``axes`` under :data:`RULES`.

    A dim stays replicated when its mesh axis has size 1, does not divide it, or is already used
    by an earlier dim of the same array.
    """
    if axes is None:
        return PartitionSpec()
    table: dict[str, str | None] = {}
    for logical, mesh_axis in RULES:
        table.setdefault(logical, mesh_axis)
    used: set[str] = set()
    out: list[str | None] = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = table.get(name)
        if mesh_axis is None or mesh_axis in used or mesh.shape.get(mesh_axis, 1) == 1:
            out.append(None)
        elif size % mesh.shape[mesh_axis]:
            out.append(None)
        else:
            out.append(mesh_axis)
            used.add(mesh_axis)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _shape_of(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def state_specs(tree: Any, mesh: Mesh) -> Any:
    """PartitionSpec for every leaf of ``tree``: params, optimizer state, or a whole train state.

    Leaves may be arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``). A leaf whose path
    ends like a model param (e.g. ``.../mu/trf_blocks/ff/layers_0/kernel``) is sharded by the
    rules; every other leaf (step counters, rng keys, schedules' counts) is replicated.
    """

    def one(path: Any, leaf: Any) -> PartitionSpec:
        shape = _shape_of(leaf)
        return spec_for(logical_axes(path, len(shape)), shape, mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of ``tree`` (see :func:`state_specs`)."""
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec),
        state_specs(tree, mesh),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, rng keys, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches (B, T): rows split over ``data`` x ``fsdp``, replicated over ``tensor``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch_size_multiple(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ----------------------------------------------------------------------------------------------
# Placing things on the mesh
# ----------------------------------------------------------------------------------------------


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """This process's rows of the global batch -> global arrays split over ``data`` x ``fsdp``.

    Each leaf is (B_local, ...) with ``B_local = B / jax.process_count()``: process ``p`` passes
    rows ``p*B_local : (p+1)*B_local`` of the global batch (what ``ShardLoader`` hands out for
    ``process_index=p``). With one process this is simply ``device_put`` of the whole batch.
    """
    sharding = batch_sharding(mesh)
    multiple = global_batch_size_multiple(mesh)

    def one(local: Any) -> jax.Array:
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        if global_shape[0] % multiple:
            raise ValueError(
                f"global batch size {global_shape[0]} is not a multiple of data x fsdp = {multiple} "
                f"(mesh {dict(mesh.shape)}); choose a batch size divisible by {multiple}"
            )
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree_util.tree_map(one, batch)


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Move an existing (e.g. single-device) train state onto the mesh by the rules."""
    return jax.device_put(state, state_shardings(state, mesh))


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args: Any) -> tuple[Any, Any]:
    """Run ``init_fn(*args)`` so that each device only ever holds its own shards.

    ``jax.eval_shape`` gives the state's shapes without computing anything, the rules turn them
    into shardings, and ``jax.jit(init_fn, out_shardings=...)`` creates every array in place
    (a model too big for one device never exists whole). Returns ``(state, shardings)``.
    """
    shapes = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(shapes, mesh)
    state = jax.jit(init_fn, out_shardings=shardings)(*args)
    return state, shardings


def abstract_state(shapes: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying the target shardings: orbax restores onto these.

    Give ``jax.eval_shape`` of the train state (or the state itself) and the shardings of the
    mesh to restore onto; orbax then reads each device's shards directly, whatever mesh wrote them.
    """
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(_shape_of(leaf), leaf.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def shard_train_step(
    step_fn: Callable[..., Any],
    mesh: Mesh,
    state_shardings: Any,
    accumulate: bool = False,
) -> Callable[..., Any]:
    """Jit ``step_fn(state, batch) -> (state, metrics)`` with the mesh's shardings.

    ``step_fn`` is the plain, un-jitted train step (config bound with ``functools.partial``).
    State comes and goes with ``state_shardings``; the batch rows are split over ``data`` x
    ``fsdp`` (with ``accumulate``, batches are (A, B, T) and B is split); the metrics are
    replicated. XLA inserts the collectives: all-gathers of FSDP params before use,
    reduce-scatters / all-reduces of the gradients. The state's buffers are donated;
    :func:`jaxgpt.xla.compiler_options` apply.
    """
    batch = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES)) if accumulate else batch_sharding(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=compiler_options(mesh.devices.flat[0].platform, training=True),
    )


class MeshLoader:
    """Wraps a loader so that its batches come out as global arrays split over the mesh.

    The wrapped loader either yields whole global batches (``jaxgpt.data.DataLoader``: every
    process then keeps only its rows) or already only this process's rows (a ``ShardLoader``
    made with ``process_index``/``process_count``). :func:`shard_batch` joins the processes' rows
    into one global ``jax.Array``; code that calls ``jnp.asarray`` on a batch gets it back
    unchanged, so a train loop and its evaluation run on the mesh without knowing it.

    The batch size must be a multiple of data x fsdp (checked here, before any step). A last
    short batch of an evaluation loader (``drop_last=False``) that the mesh cannot split is
    skipped. ``len``, ``order``, ``batch_size``... pass through to the wrapped loader.
    """

    def __init__(self, loader: Any, mesh: Mesh):
        self.loader, self.mesh = loader, mesh
        self.multiple = global_batch_size_multiple(mesh)
        self.rows_are_local = getattr(loader, "process_count", 1) > 1
        if self.rows_are_local and loader.process_count != jax.process_count():
            raise ValueError(
                f"the loader splits batches over {loader.process_count} processes, "
                f"but JAX runs {jax.process_count()}"
            )
        if loader.batch_size % self.multiple or loader.batch_size % jax.process_count():
            raise ValueError(
                f"batch size {loader.batch_size} cannot be split over the mesh {dict(mesh.shape)} and "
                f"{jax.process_count()} process(es): choose a multiple of data x fsdp = {self.multiple}"
            )

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # batch_size, num_windows, order, ...
        return getattr(self.loader, name)

    def iter_epoch(self, epoch: int = 0, start: int = 0) -> Any:
        n_proc, index = jax.process_count(), jax.process_index()
        for x, y in self.loader.iter_epoch(epoch, start):
            rows = len(x) * n_proc if self.rows_are_local else len(x)
            if rows % self.multiple or rows % n_proc:
                continue  # a last short batch the mesh cannot split
            if not self.rows_are_local and n_proc > 1:
                local = rows // n_proc
                x, y = x[index * local : (index + 1) * local], y[index * local : (index + 1) * local]
            yield shard_batch((x, y), self.mesh)

    def __iter__(self) -> Any:
        return self.iter_epoch(0)
