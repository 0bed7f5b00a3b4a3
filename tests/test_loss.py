import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.loss import calc_loss_batch, calc_loss_loader, cross_entropy
from jaxgpt.model import init_params


def test_cross_entropy_matches_a_hand_computed_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 3))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    assert abs(float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets))) - expected) < 1e-6


def test_uniform_logits_give_log_vocab_size():
    assert (
        abs(float(cross_entropy(jnp.zeros((1, 4, 50257)), jnp.zeros((1, 4), jnp.int32))) - math.log(50257))
        < 1e-5
    )


def test_loader_average_and_batch_cap():
    cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 50, (2, 8)), rng.integers(0, 50, (2, 8))) for _ in range(3)]
    per_batch = [float(calc_loss_batch(params, cfg, x, y)) for x, y in batches]
    assert calc_loss_loader(params, cfg, batches) == pytest.approx(np.mean(per_batch), rel=1e-6)
    assert calc_loss_loader(params, cfg, batches, num_batches=2) == pytest.approx(
        np.mean(per_batch[:2]), rel=1e-6
    )
    assert math.isnan(calc_loss_loader(params, cfg, []))
