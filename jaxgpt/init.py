"""The book's initialisation: PyTorch's default draws for the book's ``GPTModel``, with JAX keys.

The book builds its model from ``nn.Embedding``, ``nn.Linear`` and its own LayerNorm and trains it
from whatever PyTorch's constructors draw (``GPTConfig.init = "book"``):

    tok_emb, pos_emb      nn.Embedding: N(0, 1)
    every Linear kernel   kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), +1/sqrt(fan_in))
    every Linear bias     U(-1/sqrt(fan_in), +1/sqrt(fan_in)), fan_in of its kernel
    LayerNorm             scale ones, shift zeros

The rule of each param is read from its path in jaxgpt's param tree (the names are listed in
``jaxgpt.weights``), so this module needs no model: it maps a tree of shapes to a tree of draws.
Kernels are stored (in, out), so fan_in is the second-last axis; the transformer blocks' params
carry a leading layer axis, and each layer gets its own draw. Padding rows of the vocabulary
(``vocab_pad_multiple``) stay zero, as ``init="gpt2"`` leaves them.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig

Array = jax.Array
Params = dict[str, Any]

# the param tree's vocabulary tables and the axis their vocab_size entries lie along
_VOCAB_AXIS = {("tok_emb", "embedding"): 0, ("out_head", "kernel"): 1}


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _uniform(key: Array, shape: tuple[int, ...], fan_in: int) -> Array:
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _draw(cfg: GPTConfig, names: tuple[str, ...], shape: tuple[int, ...], key: Array, fan_in: int) -> Array:
    """One param's initial value by the rule its name gives (see the module docstring)."""
    kind = names[-1]
    if kind == "scale":
        return jnp.ones(shape, jnp.float32)
    if kind == "shift":
        return jnp.zeros(shape, jnp.float32)
    axis = _VOCAB_AXIS.get(names)
    real = shape if axis is None else shape[:axis] + (cfg.vocab_size,) + shape[axis + 1 :]
    if kind == "embedding":
        value = jax.random.normal(key, real, jnp.float32)
    elif kind in ("kernel", "bias"):
        value = _uniform(key, real, fan_in)
    else:
        raise ValueError(f"no book initialisation rule for param {'/'.join(names)!r} of shape {shape}")
    if axis is not None:  # zero padding up to padded_vocab_size
        widths = [(0, 0)] * len(shape)
        widths[axis] = (0, shape[axis] - cfg.vocab_size)
        value = jnp.pad(value, widths)
    return value


@functools.partial(jax.jit, static_argnums=(0, 1))
def _draw_all(cfg: GPTConfig, specs: tuple[tuple[tuple[str, ...], tuple[int, ...], int], ...], key: Array):
    """The draws of ``specs`` (path names, shape, fan_in), compiled once per config and tree."""
    keys = jax.random.split(key, len(specs))
    return [
        _draw(cfg, names, shape, k, fan_in) for k, (names, shape, fan_in) in zip(keys, specs, strict=True)
    ]


def book_init(cfg: GPTConfig, shapes: Params, key: Array) -> Params:
    """Params shaped like ``shapes`` (a param tree of arrays or ``jax.ShapeDtypeStruct``), drawn as
    PyTorch initialises the book's ``GPTModel``; a pure function of ``key``.

    Each leaf draws with its own key, split from ``key`` in the tree's (sorted) leaf order.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    paths = [_path_names(path) for path, _ in leaves]
    # the fan_in of each Linear, read from its kernel (..., in, out), is also its bias's
    fan_ins = {
        names[:-1]: leaf.shape[-2]
        for names, (_, leaf) in zip(paths, leaves, strict=True)
        if names[-1] == "kernel"
    }
    specs = []
    for names, (_, leaf) in zip(paths, leaves, strict=True):
        fan_in = fan_ins.get(names[:-1], 0)
        if names[-1] == "bias" and not fan_in:
            raise ValueError(f"bias {'/'.join(names)!r} has no kernel beside it to give its fan_in")
        specs.append((names, tuple(leaf.shape), fan_in))
    return jax.tree_util.tree_unflatten(treedef, _draw_all(cfg, tuple(specs), key))
