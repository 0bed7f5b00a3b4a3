"""LoRA (book appendix E) against the book's own code (llms_from_scratch.appendix_e)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from book_reference import BOOK_CFG, book_classifier_step
from flax.traverse_util import flatten_dict

from jaxgpt.classify import (
    add_classification_head,
    calc_accuracy_loader,
    classifier_from_book_state_dict,
    classifier_logits,
    make_classifier_optimizer,
)
from jaxgpt.config import GPTConfig, get_config
from jaxgpt.lora import create_lora_state, init_lora, jit_lora_train_step, lora_param_count, merge_lora
from jaxgpt.model import init_params

BOOK_CFG = {**BOOK_CFG, "qkv_bias": True}
RANK, ALPHA = 4, 8.0
# the book's nn.Linear names -> ours
LINEARS = {
    "att.W_query": ("att", "W_query"),
    "att.W_key": ("att", "W_key"),
    "att.W_value": ("att", "W_value"),
    "att.out_proj": ("att", "out_proj"),
    "ff.layers.0": ("ff", "layers_0"),
    "ff.layers.2": ("ff", "layers_2"),
}


def test_the_books_trainable_count_on_gpt2_small():
    """Rank 16 on gpt2-small with a two-class head: the book's 2,666,528 trainable parameters."""
    cfg = get_config("gpt2-small")

    def adapters():
        key = jax.random.PRNGKey(0)
        params = add_classification_head(init_params(cfg, key), cfg, 2, key)
        return init_lora(params, 16, key)

    assert lora_param_count(jax.eval_shape(adapters)) == 2_666_528


def test_adapters_start_at_zero_and_merge_into_plain_kernels():
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    key = jax.random.PRNGKey(0)
    params = add_classification_head(init_params(cfg, key), cfg, 2, key)
    adapters = init_lora(params, RANK, jax.random.PRNGKey(1))
    A = adapters["trf_blocks"]["att"]["W_query"]["A"]
    assert A.shape == (2, 32, RANK) and float(jnp.abs(A).max()) <= 1 / RANK**0.5
    assert adapters["out_head"]["B"].shape == (RANK, 2)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 8)), jnp.int32)
    same = classifier_logits(merge_lora(params, adapters, ALPHA), cfg, ids)
    np.testing.assert_array_equal(same, classifier_logits(params, cfg, ids))  # B = 0: nothing changes
    adapters = jax.tree.map(lambda a: a + 0.01, adapters)
    merged = merge_lora(params, adapters, ALPHA)
    x = jax.random.normal(key, (3, 32))
    W = params["trf_blocks"]["ff"]["layers_0"]["kernel"][1]
    ab = adapters["trf_blocks"]["ff"]["layers_0"]
    expected = x @ W + ALPHA * (x @ ab["A"][1] @ ab["B"][1])  # the book's LinearWithLoRA
    np.testing.assert_allclose(x @ merged["trf_blocks"]["ff"]["layers_0"]["kernel"][1], expected, atol=1e-5)


def _book_lora_model():
    torch = pytest.importorskip("torch")
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    appendix_e = pytest.importorskip("llms_from_scratch.appendix_e")
    torch.manual_seed(123)
    model = ch04.GPTModel(BOOK_CFG)
    torch.manual_seed(123)
    model.out_head = torch.nn.Linear(in_features=BOOK_CFG["emb_dim"], out_features=2)
    for param in model.parameters():
        param.requires_grad = False
    torch.manual_seed(123)
    appendix_e.replace_linear_with_lora(model, rank=RANK, alpha=ALPHA)
    return model


def _import_book_lora(state):
    """The book's LoRA model state dict -> (cfg, frozen params, adapters)."""
    base = {k.replace(".linear.", "."): v for k, v in state.items() if ".lora." not in k}
    cfg, params = classifier_from_book_state_dict(base, n_heads=BOOK_CFG["n_heads"])
    cfg = cfg.replace(drop_rate=BOOK_CFG["drop_rate"])  # a state dict does not record dropout
    flat = {}
    for book, ours in LINEARS.items():
        for m in ("A", "B"):
            layers = [state[f"trf_blocks.{i}.{book}.lora.{m}"].numpy() for i in range(BOOK_CFG["n_layers"])]
            flat[("trf_blocks", *ours, m)] = jnp.asarray(np.stack(layers))
    for m in ("A", "B"):
        flat[("out_head", m)] = jnp.asarray(state[f"out_head.lora.{m}"].numpy())
    from flax.traverse_util import unflatten_dict

    return cfg, params, unflatten_dict(flat)


def test_lora_training_matches_the_books_step_after_step():
    torch = pytest.importorskip("torch")
    ch06 = pytest.importorskip("llms_from_scratch.ch06")
    model = _book_lora_model()
    n_book = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg, params, adapters = _import_book_lora(model.state_dict())
    assert lora_param_count(adapters) == n_book
    assert jax.tree.structure(init_lora(params, RANK, jax.random.PRNGKey(0))) == jax.tree.structure(adapters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    tx = make_classifier_optimizer(5e-5, 0.1)
    state = create_lora_state(params, tx, adapters, ALPHA)
    step_fn = jit_lora_train_step(cfg, tx, ALPHA)

    rng = np.random.default_rng(3)
    batches = [(rng.integers(0, 97, (4, 12)), rng.integers(0, 2, (4,))) for _ in range(6)]
    eval_batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches[:3]]
    for i, (x, y) in enumerate(batches):
        loss = book_classifier_step(ch06, model, optimizer, x, y)
        state, metrics = step_fn(state, (jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)))
        ours = float(metrics["loss"])
        assert abs(ours - loss) < 1e-4, f"step {i}: loss {ours} vs the book's {loss}"
        book_acc = ch06.calc_accuracy_loader(eval_batches, model, "cpu")
        merged = state.params  # the adapters merged in
        acc = calc_accuracy_loader(merged, cfg, [(np.asarray(a), np.asarray(b)) for a, b in batches[:3]])
        assert acc == book_acc, (i, acc, book_acc)

    _, _, after = _import_book_lora(model.state_dict())
    for name, ours in flatten_dict(state.trainable).items():
        diff = float(np.max(np.abs(np.asarray(ours) - np.asarray(flatten_dict(after)[name]))))
        assert diff < 1e-5, f"{'/'.join(name)} differs from the book's by {diff}"


def _dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The output shape of every matmul a jaxpr runs, nested jaxprs (scan bodies, remat) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    shapes += _dot_output_shapes(getattr(inner, "jaxpr", inner))
    return shapes


def test_the_gradient_forms_no_frozen_kernel_gradient():
    # The book's LinearWithLoRA only reads the frozen weight: the backward pass computes the input
    # gradient through it and the small gradients of A and B, never a kernel-sized gradient. A
    # kernel-sized matmul output (in, out) in the gradient's program would be exactly that waste
    # (merging the adapters first, W + alpha * A @ B, makes one per layer and kernel).
    from jaxgpt.classify import classification_loss
    from jaxgpt.lora import DEFAULT_RULE

    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    key = jax.random.PRNGKey(0)
    params = add_classification_head(init_params(cfg, key), cfg, 2, key)
    adapters = init_lora(params, RANK, jax.random.PRNGKey(1))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (3, 8)), jnp.int32)
    labels = jnp.array([0, 1, 0])

    def loss(adapters):
        logits = classifier_logits(params, cfg, ids, lora=(adapters, ALPHA))
        return classification_loss(logits, labels)

    def merged_loss(adapters):
        return classification_loss(classifier_logits(merge_lora(params, adapters, ALPHA), cfg, ids), labels)

    import re

    kernels = {
        tuple(leaf.shape[-2:])
        for path, leaf in flatten_dict(params).items()
        if re.fullmatch(DEFAULT_RULE, "/".join(path)) and path[0] == "trf_blocks"
    }
    assert kernels == {(32, 32), (32, 128), (128, 32)}
    shapes = _dot_output_shapes(jax.make_jaxpr(jax.grad(loss))(adapters).jaxpr)
    assert not [s for s in shapes if s[-2:] in kernels], shapes
    # the check can fail: the merged form's gradient has them
    merged = _dot_output_shapes(jax.make_jaxpr(jax.grad(merged_loss))(adapters).jaxpr)
    assert [s for s in merged if s[-2:] in kernels]
    np.testing.assert_allclose(
        jax.grad(loss)(jax.tree.map(lambda a: a + 0.01, adapters))["trf_blocks"]["ff"]["layers_0"]["A"],
        jax.grad(merged_loss)(jax.tree.map(lambda a: a + 0.01, adapters))["trf_blocks"]["ff"]["layers_0"][
            "A"
        ],
        rtol=1e-4,
        atol=1e-6,
    )
