"""Low-rank adaptation (book appendix E): frozen weights plus trainable low-rank adapters.

Every kernel W (in, out) that :data:`DEFAULT_RULE` selects gets an adapter ``A`` (in, rank) and
``B`` (rank, out); the adapted layer computes ``x @ W + alpha * (x @ A @ B)``, as the book's
``LinearWithLoRA``. ``A`` starts as the book's ``kaiming_uniform_(a=sqrt(5))`` draws it (for an
(in, rank) tensor PyTorch's fan-in is ``rank``: U(-1/sqrt(rank), 1/sqrt(rank))), ``B`` at zero,
so the adapted model starts equal to the frozen one. The book's code scales by ``alpha`` (not
``alpha / rank`` as the LoRA paper and some libraries do); so does this module, to give the
book's numbers.

Adapters of the stacked transformer blocks are stacked on the same leading layer axis. The
adapted model is a pure function of (frozen params, adapters): :func:`merge_lora` folds the
adapters into plain kernels (``W + alpha * A @ B``), which every jaxgpt function, export to
Hugging Face or the book's format included, takes as it is.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxgpt.classify import ClassifierState, apply_loss_gradients, classification_loss, classifier_logits
from jaxgpt.config import GPTConfig
from jaxgpt.model import Params
from jaxgpt.xla import compiler_options

Array = jax.Array

# the book's replace_linear_with_lora: every nn.Linear of the blocks (query, key, value, output
# projection, both feed-forward layers) and the head; not the embeddings or the norms
DEFAULT_RULE = r"(trf_blocks/att/(W_query|W_key|W_value|out_proj)|trf_blocks/ff/layers_[02]|out_head)/kernel"


def _selected(params: Params, rule: str) -> dict[tuple[str, ...], Array]:
    pattern = re.compile(rule)
    return {path: leaf for path, leaf in flatten_dict(params).items() if pattern.fullmatch("/".join(path))}


def init_lora(params: Params, rank: int, key: Array, rule: str = DEFAULT_RULE) -> Params:
    """Adapters for every kernel of ``params`` whose path ("trf_blocks/att/W_query/kernel")
    matches ``rule``: ``{path minus "kernel": {"A": (..., in, rank), "B": (..., rank, out)}}``.

    Works on shapes alone too (under ``jax.eval_shape``), to count adapter params without
    drawing any weights.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    selected = _selected(params, rule)
    if not selected:
        raise ValueError(f"the rule {rule!r} selects no kernel of the params")
    adapters = {}
    bound = 1.0 / math.sqrt(rank)
    for i, (path, kernel) in enumerate(sorted(selected.items())):
        *lead, d_in, d_out = kernel.shape
        A = jax.random.uniform(jax.random.fold_in(key, i), (*lead, d_in, rank), jnp.float32, -bound, bound)
        adapters[path[:-1] + ("A",)] = A
        adapters[path[:-1] + ("B",)] = jnp.zeros((*lead, rank, d_out), jnp.float32)
    return unflatten_dict(adapters)


def merge_lora(params: Params, adapters: Params, alpha: float) -> Params:
    """Plain params computing what the adapted model computes: each adapted kernel W becomes
    ``W + alpha * A @ B``. Differentiable in both arguments."""
    flat, ab = flatten_dict(params), flatten_dict(adapters)
    for path, A in ab.items():
        if path[-1] != "A":
            continue
        base = path[:-1]
        if base + ("kernel",) not in flat:
            raise ValueError(f"an adapter for {'/'.join(base)}, which the params do not have")
        B = ab[base + ("B",)]  # A (..., in, rank), B (..., rank, out)
        flat[base + ("kernel",)] = flat[base + ("kernel",)] + alpha * jnp.matmul(A, B)
    return unflatten_dict(flat)


def lora_param_count(adapters: Params) -> int:
    """Trainable scalars of the adapters (shapes or arrays)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(adapters))


def create_lora_state(
    params: Params, tx: optax.GradientTransformation, adapters: Params, alpha: float, seed: int = 123
) -> ClassifierState:
    """A fine-tuning state whose trainable part is ``adapters`` and frozen part all of ``params``;
    :func:`jaxgpt.classify.train_classifier_simple` trains it with :func:`lora_train_step`."""
    return ClassifierState(
        trainable=adapters,
        frozen=params,
        opt_state=tx.init(adapters),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.PRNGKey(seed)),
        lora_alpha=float(alpha),
    )


def lora_train_step(
    state: ClassifierState,
    batch: tuple[Array, Array],
    *,
    cfg: GPTConfig,
    tx: optax.GradientTransformation,
    alpha: float,
) -> tuple[ClassifierState, dict[str, Array]]:
    """One optimizer update of the adapters only (the classifier's loss on the last token).

    The adapted layers compute ``x @ W + alpha * (x @ A @ B)`` as the book's ``LinearWithLoRA``
    does, so the backward pass forms no gradient of a frozen kernel, only the small ones of A and B.
    """
    inputs, labels = batch
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(adapters: Params) -> Array:
        logits = classifier_logits(
            state.frozen,
            cfg,
            inputs,
            deterministic=cfg.drop_rate == 0,
            dropout_key=key,
            lora=(adapters, alpha),
        )
        return classification_loss(logits, labels)

    return apply_loss_gradients(state, tx, loss_fn)


@functools.lru_cache(maxsize=8)
def jit_lora_train_step(
    cfg: GPTConfig, tx: optax.GradientTransformation, alpha: float
) -> Callable[[ClassifierState, tuple[Array, Array]], tuple[ClassifierState, dict[str, Array]]]:
    """:func:`lora_train_step` with its settings bound, jitted once."""
    step = functools.partial(lora_train_step, cfg=cfg, tx=tx, alpha=alpha)
    return jax.jit(step, donate_argnums=0, compiler_options=compiler_options(training=True))
